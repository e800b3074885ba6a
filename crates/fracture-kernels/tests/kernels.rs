//! Our CPU kernels against candle's reference operations: values and gradients within 1e-4
//! (relative to the largest magnitude), over random shapes, strides, batch sizes and odd sizes.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{Device, Tensor, Var};
use common::random;
use fracture_kernels::{self as kernels, Activation, ConvSpec, DepthwiseSpec, Kernels, MbConvSpec, Padding};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rand::SeedableRng;

fn config() -> Config {
    Config {
        cases: 24,
        rng_seed: RngSeed::Fixed(20261127),
        failure_persistence: None,
        ..Config::default()
    }
}

fn activation() -> impl Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::None),
        Just(Activation::Relu),
        Just(Activation::Relu6)
    ]
}

/// max |a − b| ≤ 1e-4 · max(1, max |b|).
fn close(a: &Tensor, b: &Tensor, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.dims(), b.dims(), "{} shapes", what);
    let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = bv.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = av.iter().zip(&bv).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    prop_assert!(
        diff <= 1e-4 * scale,
        "{}: max difference {} at scale {}",
        what,
        diff,
        scale
    );
    Ok(())
}

/// Runs `f` on both kernel choices with fresh variables for `inputs`, and compares the outputs and
/// the gradients of `Σ out · r` with respect to every input.
fn check(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor], Kernels) -> Tensor,
    what: &str,
) -> Result<(), TestCaseError> {
    let mut results = Vec::new();
    for k in [Kernels::Fast, Kernels::Reference] {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts, k);
        let r = random(out.dims(), 99);
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
        results.push((out, gs));
    }
    close(&results[0].0, &results[1].0, &format!("{what} values"))?;
    for (i, (a, b)) in results[0].1.iter().zip(&results[1].1).enumerate() {
        close(a, b, &format!("{what} gradient of input {i}"))?;
    }
    Ok(())
}

/// The inference path of the fused block (plain tensors: nothing kept for a backward pass, the
/// first batch norm applied in the depthwise store when running statistics are used, the second
/// in place on the projection) against the single ops.
fn untracked_matches(
    x: &Tensor,
    params: &Tensor,
    spec: MbConvSpec,
    running: &Option<kernels::BlockStats>,
) -> Result<(), TestCaseError> {
    let (x, params) = (x.detach(), params.detach());
    let fast = kernels::mbconv(&x, &params, spec, running.clone(), Kernels::Fast)
        .unwrap()
        .0;
    let reference = kernels::mbconv(&x, &params, spec, running.clone(), Kernels::Reference)
        .unwrap()
        .0;
    close(&fast, &reference, "untracked inverted bottleneck values")
}

/// The fused block's backward pass with only the parameters tracked (as for the folded stem,
/// whose input is the image's patches): the parameters' gradient equals the one computed with the
/// input tracked too, value for value, and the reference path's within tolerance, and the input
/// gets none.
fn params_only_matches(
    x: &Tensor,
    params: &Tensor,
    spec: MbConvSpec,
    running: &Option<kernels::BlockStats>,
) -> Result<(), TestCaseError> {
    let grads = |x: &Tensor, p: &Var, k: Kernels| {
        let (y, _) = kernels::mbconv(x, p.as_tensor(), spec, running.clone(), k).unwrap();
        let weights = random(y.dims(), 9);
        (y * weights).unwrap().sum_all().unwrap().backward().unwrap()
    };
    let p = Var::from_tensor(&params.detach()).unwrap();
    let plain = x.detach();
    let only = grads(&plain, &p, Kernels::Fast);
    prop_assert!(only.get(&plain).is_none(), "an untracked input got a gradient");
    let xv = Var::from_tensor(&plain).unwrap();
    let both = grads(xv.as_tensor(), &p, Kernels::Fast);
    let (a, b) = (only.get(&p).unwrap(), both.get(&p).unwrap());
    prop_assert_eq!(
        a.to_vec1::<f32>().unwrap(),
        b.to_vec1::<f32>().unwrap(),
        "parameter gradient with and without the input tracked"
    );
    let reference = grads(&plain, &p, Kernels::Reference);
    close(
        a,
        reference.get(&p).unwrap(),
        "parameter gradient, input untracked",
    )
}

/// Inputs of an inverted-bottleneck check: `x (b, cin, h, w)`, the flat parameters with batch-norm
/// scales near 1.5 and inputs off-centre (so ReLU6 cuts at both ends), and running statistics when
/// the block does not use batch statistics.
fn bottleneck_inputs(
    spec: MbConvSpec,
    b: usize,
    h: usize,
    w: usize,
    batch_stats: bool,
    seed: u64,
) -> (Tensor, Tensor, Option<kernels::BlockStats>) {
    let lay = spec.layout();
    let mut params = random(&[lay.len], seed ^ 1).to_vec1::<f32>().unwrap();
    for (g, _) in lay.bn0.iter().chain([&lay.bn1, &lay.bn2]) {
        params[g.clone()].iter_mut().for_each(|v| *v += 1.5);
    }
    let params = Tensor::new(params, &Device::Cpu).unwrap();
    let x = (random(&[b, spec.cin, h, w], seed) * 2.0)
        .unwrap()
        .affine(1.0, 0.3)
        .unwrap();
    let running = (!batch_stats).then(|| {
        (0..spec.norms())
            .map(|i| {
                let c = if i + 1 == spec.norms() {
                    spec.cout
                } else {
                    spec.mid
                };
                let m = random(&[c], seed ^ (10 + i as u64)).to_vec1::<f32>().unwrap();
                let v = random(&[c], seed ^ (20 + i as u64))
                    .affine(0.5, 1.0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (m, v)
            })
            .collect()
    });
    (x, params, running)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn conv2d_matches_candle(
        b in 1usize..3, cin in 1usize..4, cout in 1usize..5, kernel in prop_oneof![Just(1usize), Just(3), Just(5)],
        stride in 1usize..3, padding in 0usize..2, extra_h in 0usize..8, extra_w in 0usize..8, relu: bool, seed: u64,
    ) {
        let (h, w) = (kernel + extra_h, kernel + extra_w);
        let spec = ConvSpec { kernel, stride, padding, relu };
        let inputs = [random(&[b, cin, h, w], seed), random(&[cout, cin, kernel, kernel], seed ^ 1), random(&[cout], seed ^ 2)];
        check(&inputs, |t, k| kernels::conv2d(&t[0], &t[1], &t[2], spec, k).unwrap(), "conv2d")?;
    }

    #[test]
    fn conv2d_takes_strided_inputs(b in 1usize..3, h in 4usize..9, w in 4usize..9, seed: u64) {
        // The input is a transposed view (non-contiguous strides).
        let x = random(&[b, 2, w, h], seed);
        let spec = ConvSpec { kernel: 3, stride: 1, padding: 1, relu: true };
        let inputs = [x, random(&[3, 2, 3, 3], seed ^ 1), random(&[3], seed ^ 2)];
        check(&inputs, |t, k| kernels::conv2d(&t[0].transpose(2, 3).unwrap(), &t[1], &t[2], spec, k).unwrap(), "strided conv2d")?;
    }

    #[test]
    fn max_pool_matches_candle(b in 1usize..3, c in 1usize..4, h in 2usize..12, w in 2usize..12, seed: u64) {
        check(&[random(&[b, c, h, w], seed)], |t, k| kernels::max_pool2x2(&t[0], k).unwrap(), "max_pool2x2")?;
    }

    #[test]
    fn the_pooled_head_matches_the_three_ops(
        b in 1usize..5, cin in 1usize..40, cout in 1usize..50, h in 1usize..9, w in 1usize..9, act in activation(), seed: u64,
    ) {
        let x = random(&[b, cin, h, w], seed);
        let wt = random(&[cout, cin, 1, 1], seed ^ 1);
        let scale = random(&[cout], seed ^ 2);
        let shift = random(&[cout], seed ^ 3);
        let head = kernels::FrozenHead::new(&wt, &scale, &shift, act).unwrap();
        let want = kernels::affine_act(&kernels::conv1x1(&x, &wt, Kernels::Reference).unwrap(), &scale, &shift, act, Kernels::Reference)
            .unwrap()
            .mean(3)
            .unwrap()
            .mean(2)
            .unwrap();
        for k in [Kernels::Fast, Kernels::Reference] {
            close(&kernels::head_pooled(&x, &head, k).unwrap(), &want, "pooled head")?;
        }
    }

    #[test]
    fn patches_match_the_reference_and_make_the_convolution(
        b in 1usize..3, c in 1usize..3, k in 1usize..4, s in 1usize..3, extra_h in 0usize..7, extra_w in 0usize..7, seed: u64,
    ) {
        let (h, w) = (k + extra_h, k + extra_w);
        let x = random(&[b, c, h, w], seed);
        check(std::slice::from_ref(&x), |t, kn| kernels::patches(&t[0], k, s, kn).unwrap(), "patches")?;
        // The 1×1 product of the weights with the patches is the strided convolution.
        let wt = random(&[3, c, k, k], seed ^ 1);
        let p = kernels::patches(&x, k, s, Kernels::Fast).unwrap();
        let (oh, ow) = (p.dim(2).unwrap(), p.dim(3).unwrap());
        let via = wt
            .reshape((3, c * k * k))
            .unwrap()
            .broadcast_matmul(&p.reshape((b, c * k * k, oh * ow)).unwrap())
            .unwrap()
            .reshape((b, 3, oh, ow))
            .unwrap();
        let spec = ConvSpec { kernel: k, stride: s, padding: 0, relu: false };
        let zero = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let conv = kernels::conv2d(&x, &wt, &zero, spec, Kernels::Reference).unwrap();
        close(&via, &conv, "patches · w against conv2d")?;
    }

    #[test]
    fn linear_matches_candle(b in 1usize..9, i in 1usize..40, o in 1usize..20, relu: bool, seed: u64) {
        let inputs = [random(&[b, i], seed), random(&[o, i], seed ^ 1), random(&[o], seed ^ 2)];
        check(&inputs, |t, k| kernels::linear(&t[0], &t[1], &t[2], relu, k).unwrap(), "linear")?;
    }

    #[test]
    fn batch_norm_matches_candle(
        b in 1usize..4, c in 1usize..5, h in 1usize..9, w in 1usize..9, act in activation(), seed: u64,
    ) {
        // Inputs off-centre and scaled, so the normalization has work to do; B·H·W ≥ 2 keeps the
        // variance defined. A wide scale puts some outputs above ReLU6's cap.
        prop_assume!(b * h * w >= 2);
        let x = (random(&[b, c, h, w], seed) * 3.0).unwrap().affine(1.0, 0.5).unwrap();
        let inputs = [x, random(&[c], seed ^ 1).affine(4.0, 1.5).unwrap(), random(&[c], seed ^ 2)];
        check(&inputs, |t, k| kernels::batch_norm_train(&t[0], &t[1], &t[2], 1e-5, act, k).unwrap().0, "batch norm")?;
        let (_, mf, vf) = kernels::batch_norm_train(&inputs[0], &inputs[1], &inputs[2], 1e-5, act, Kernels::Fast).unwrap();
        let (_, mr, vr) = kernels::batch_norm_train(&inputs[0], &inputs[1], &inputs[2], 1e-5, act, Kernels::Reference).unwrap();
        close(&mf, &mr, "batch mean")?;
        close(&vf, &vr, "batch variance")?;
    }

    #[test]
    fn affine_activation_matches_candle(
        b in 1usize..4, c in 1usize..5, h in 1usize..9, w in 1usize..9, act in activation(), seed: u64,
    ) {
        let x = (random(&[b, c, h, w], seed) * 4.0).unwrap();
        let inputs = [x, random(&[c], seed ^ 1).affine(3.0, 0.5).unwrap(), random(&[c], seed ^ 2).affine(3.0, 1.0).unwrap()];
        check(&inputs, |t, k| kernels::affine_act(&t[0], &t[1], &t[2], act, k).unwrap(), "affine + activation")?;
    }

    #[test]
    fn depthwise_conv_matches_the_reference(
        b in 1usize..3, c in 1usize..5, kernel in prop_oneof![Just(3usize), Just(5)], stride in 1usize..3,
        extra_h in 0usize..9, extra_w in prop_oneof![0usize..9, 9usize..40], same: bool, pads in proptest::array::uniform4(0usize..3), seed: u64,
    ) {
        let (h, w) = (1 + extra_h, 1 + extra_w);
        let padding = if same {
            Padding::same(h, w, kernel, stride)
        } else {
            Padding { top: pads[0], bottom: pads[1], left: pads[2], right: pads[3] }
        };
        prop_assume!(h + padding.top + padding.bottom >= kernel && w + padding.left + padding.right >= kernel);
        let spec = DepthwiseSpec { kernel, stride, padding };
        let inputs = [random(&[b, c, h, w], seed), random(&[c, 1, kernel, kernel], seed ^ 1)];
        check(&inputs, |t, k| kernels::depthwise_conv2d(&t[0], &t[1], spec, k).unwrap(), "depthwise")?;
    }

    #[test]
    fn depthwise_reference_is_candles_grouped_conv2d(
        b in 1usize..3, c in 1usize..5, kernel in prop_oneof![Just(3usize), Just(5)], stride in 1usize..3,
        extra_h in 0usize..7, extra_w in 0usize..7, seed: u64,
    ) {
        // The reference path sums shifted slices; candle's grouped conv2d (one convolution per
        // channel) is the definition it must meet, in values and in both gradients.
        let (h, w) = (kernel + extra_h, kernel + extra_w);
        let padding = Padding::same(h, w, kernel, stride);
        let spec = DepthwiseSpec { kernel, stride, padding };
        let x = Var::from_tensor(&random(&[b, c, h, w], seed)).unwrap();
        let wt = Var::from_tensor(&random(&[c, 1, kernel, kernel], seed ^ 1)).unwrap();
        let ours = kernels::depthwise_conv2d(x.as_tensor(), wt.as_tensor(), spec, Kernels::Reference).unwrap();
        let xp = x.as_tensor()
            .pad_with_zeros(2, padding.top, padding.bottom).unwrap()
            .pad_with_zeros(3, padding.left, padding.right).unwrap();
        let full = xp.conv2d(wt.as_tensor(), 0, 1, 1, c).unwrap();
        let (oh, ow) = spec.out_dims(h, w);
        let pick = |n: usize| Tensor::new((0..n).map(|i| (i * stride) as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let theirs = full.index_select(&pick(oh), 2).unwrap().index_select(&pick(ow), 3).unwrap();
        close(&ours, &theirs, "depthwise reference")?;
        let r = random(ours.dims(), seed ^ 2);
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (v, what) in [(&x, "d input"), (&wt, "d weights")] {
            close(g_ours.get(v).unwrap(), g_theirs.get(v).unwrap(), what)?;
        }
    }

    #[test]
    fn conv1x1_matches_candle(b in 1usize..4, cin in 1usize..9, cout in 1usize..9, h in 1usize..7, w in 1usize..7, seed: u64) {
        let inputs = [random(&[b, cin, h, w], seed), random(&[cout, cin, 1, 1], seed ^ 1)];
        check(&inputs, |t, k| kernels::conv1x1(&t[0], &t[1], k).unwrap(), "conv1x1")?;
    }

    #[test]
    fn fused_inverted_bottleneck_matches_the_single_ops(
        b in 1usize..4, cin in 1usize..6, expansion in prop_oneof![Just(1usize), Just(3), Just(6)],
        cout in 1usize..6, kernel in prop_oneof![Just(3usize), Just(5)], stride in 1usize..3,
        h in 1usize..10, w in 1usize..10, batch_stats: bool, same_width: bool, seed: u64,
    ) {
        // Stride 1 with cin = cout exercises the skip connection.
        let cout = if same_width { cin } else { cout };
        prop_assume!(!batch_stats || b * h * w >= 2);
        let spec = MbConvSpec { cin, mid: cin * expansion, cout, kernel, stride, expand: expansion != 1, eps: 1e-3 };
        let (x, params, running) = bottleneck_inputs(spec, b, h, w, batch_stats, seed);
        check(&[x.clone(), params.clone()], |t, k| kernels::mbconv(&t[0], &t[1], spec, running.clone(), k).unwrap().0, "inverted bottleneck")?;
        untracked_matches(&x, &params, spec, &running)?;
        params_only_matches(&x, &params, spec, &running)?;
        if batch_stats {
            let (_, sf) = kernels::mbconv(&x, &params, spec, None, Kernels::Fast).unwrap();
            let (_, sr) = kernels::mbconv(&x, &params, spec, None, Kernels::Reference).unwrap();
            prop_assert_eq!(sf.len(), spec.norms());
            for ((mf, vf), (mr, vr)) in sf.iter().zip(&sr) {
                let t = |v: &Vec<f32>| Tensor::new(v.clone(), &Device::Cpu).unwrap();
                close(&t(mf), &t(mr), "block batch mean")?;
                close(&t(vf), &t(vr), "block batch variance")?;
            }
        }
    }

    /// Widths of the middle stage that are whole groups of 16 channels, on planes at most 16 wide:
    /// the channel-interleaved depthwise path (EfficientNet-Lite0's late stages).
    #[test]
    fn fused_inverted_bottleneck_in_channel_groups_matches_the_single_ops(
        b in 1usize..3, cin in prop_oneof![Just(8usize), Just(16)], expansion in prop_oneof![Just(1usize), Just(2), Just(6)],
        kernel in prop_oneof![Just(3usize), Just(5)], stride in 1usize..3, h in 1usize..12, w in 1usize..12,
        wide: bool, batch_stats: bool, seed: u64,
    ) {
        let w = if wide { w + 16 } else { w };
        prop_assume!(expansion != 1 || cin == 16);
        prop_assume!(!batch_stats || b * h * w >= 2);
        let spec = MbConvSpec { cin, mid: cin * expansion, cout: cin, kernel, stride, expand: expansion != 1, eps: 1e-3 };
        let (x, params, running) = bottleneck_inputs(spec, b, h, w, batch_stats, seed);
        check(&[x.clone(), params.clone()], |t, k| kernels::mbconv(&t[0], &t[1], spec, running.clone(), k).unwrap().0, "grouped inverted bottleneck")?;
        untracked_matches(&x, &params, spec, &running)?;
    }

    #[test]
    fn dropout_matches_candle(
n in 1usize..300, p in 0.0f32..0.9, seed: u64) {
        check(&[random(&[n], seed)], |t, k| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            kernels::dropout(&t[0], p, &mut rng, k).unwrap()
        }, "dropout")?;
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fused_conv_relu_pool_matches_candle(
        b in 1usize..3, cin in 1usize..4, cout in 1usize..5, stride in 1usize..3, padding in 0usize..2,
        extra_h in 1usize..9, extra_w in 1usize..9, seed: u64,
    ) {
        let (h, w) = (3 + extra_h, 3 + extra_w);
        let spec = ConvSpec { kernel: 3, stride, padding, relu: true };
        if spec.out_len(h) < 2 || spec.out_len(w) < 2 {
            return Ok(());
        }
        let inputs = [random(&[b, cin, h, w], seed), random(&[cout, cin, 3, 3], seed ^ 1), random(&[cout], seed ^ 2)];
        check(&inputs, |t, k| kernels::conv2d_relu_pool2x2(&t[0], &t[1], &t[2], spec, k).unwrap(), "conv-relu-pool")?;
    }

    #[test]
    fn long_reductions_in_linear_match_candle(b in 1usize..5, i in 4096usize..9000, o in 1usize..4, seed: u64) {
        let inputs = [random(&[b, i], seed), random(&[o, i], seed ^ 1), random(&[o], seed ^ 2)];
        check(&inputs, |t, k| kernels::linear(&t[0], &t[1], &t[2], true, k).unwrap(), "split-k linear")?;
    }
}

/// Images large enough that the fused kernel cuts them into several cache-sized bands of rows, in
/// both the forward and the backward pass, with an odd size and padding.
#[test]
fn fused_conv_relu_pool_matches_candle_across_bands() {
    let spec = ConvSpec {
        kernel: 3,
        stride: 1,
        padding: 1,
        relu: true,
    };
    for (b, cin, h, w) in [(3usize, 8usize, 91usize, 88usize), (1, 16, 70, 75)] {
        let inputs = [
            random(&[b, cin, h, w], 5),
            random(&[4, cin, 3, 3], 6),
            random(&[4], 7),
        ];
        check(
            &inputs,
            |t, k| kernels::conv2d_relu_pool2x2(&t[0], &t[1], &t[2], spec, k).unwrap(),
            "banded conv-relu-pool",
        )
        .unwrap();
    }
}

#[test]
fn on_pool_runs_on_a_pool_thread_and_returns_the_result() {
    assert_eq!(
        rayon::current_thread_index(),
        None,
        "the test harness thread is not a worker"
    );
    let (index, sum) = kernels::on_pool(|| (rayon::current_thread_index(), (1..=10).sum::<i32>()));
    assert!(index.is_some(), "on_pool ran its closure outside the pool");
    assert_eq!(sum, 55);
    // From inside the pool it stays on the calling worker.
    let (outer, inner) = kernels::on_pool(|| {
        let outer = rayon::current_thread_index();
        (outer, kernels::on_pool(rayon::current_thread_index))
    });
    assert_eq!(outer, inner);
    // A kernel's result and error come back through it: a mismatched product is an error.
    let x = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(kernels::on_pool(|| x.matmul(&x)).is_err());
}

/// The channels-last blocks on the `gemm` crate's products, as on a processor with neither
/// AVX-512F nor AVX2: [`fused_inverted_bottleneck_in_channel_groups_matches_the_single_ops`] again
/// in a child process with `FRACTURE_FP32_KERNEL=gemm` (here it ran on the packed AVX-512 or AVX2
/// kernels, whichever the processor has).
#[test]
fn the_gemm_fallback_of_the_packed_kernels_runs_when_forced() {
    if std::env::var_os("FRACTURE_FP32_KERNEL").is_some() {
        return; // already a child
    }
    common::passes_in_child_with(
        "fused_inverted_bottleneck_in_channel_groups_matches_the_single_ops",
        "FRACTURE_FP32_KERNEL",
        "gemm",
    );
}
