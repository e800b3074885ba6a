//! BF16 matrix products: every backend this processor can run against the exact product (within
//! BF16 rounding) and the hardware ones against the emulated one (within FP32 summation order),
//! over random odd shapes; then the networks' ops in `Kernels::Bf16` against `Kernels::Fast`,
//! values and gradients, under each backend this processor has (each in a child process, since the
//! backend is chosen once per process by `FRACTURE_BF16`).

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{Device, Tensor, Var};
use fracture_kernels::{self as kernels, Bf16Backend, ConvSpec, Kernels, MbConvSpec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config() -> Config {
    Config {
        cases: 32,
        rng_seed: RngSeed::Fixed(20261203),
        failure_persistence: None,
        ..Config::default()
    }
}

/// `n` pseudo-random values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    common::values(n, seed).into_iter().map(|v| v * 2.0).collect()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

/// The exact product (f64) and, per element, Σ|a||b| (the scale rounding errors are relative to).
fn exact(a: &[f32], b: &[f32], [m, k, n]: [usize; 3]) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let (x, y) = (f64::from(a[i * k + p]), f64::from(b[p * n + j]));
                out[i * n + j] += x * y;
                scale[i * n + j] += (x * y).abs();
            }
        }
    }
    (out, scale)
}

fn check_backends(m: usize, k: usize, n: usize, seed: u64) -> Result<(), TestCaseError> {
    let (a, b) = (values(m * k, seed), values(k * n, seed ^ 7));
    let (want, scale) = exact(&a, &b, [m, k, n]);
    let emulated = kernels::matmul_bf16(&a, &b, [m, k, n], Bf16Backend::Emulated).unwrap();
    for backend in Bf16Backend::available() {
        let got = kernels::matmul_bf16(&a, &b, [m, k, n], backend).unwrap();
        prop_assert_eq!(got.len(), m * n);
        for idx in 0..m * n {
            // Each operand rounded to BF16 moves a product by at most 2·2⁻⁹ of its size.
            let err = (f64::from(got[idx]) - want[idx]).abs();
            prop_assert!(
                err <= scale[idx] / 128.0 + 1e-5,
                "{} {}×{}·{}×{} at {}: {} vs exact {} (scale {})",
                backend,
                m,
                k,
                k,
                n,
                idx,
                got[idx],
                want[idx],
                scale[idx]
            );
            if matches!(backend, Bf16Backend::Amx | Bf16Backend::Avx512) {
                // The same rounded operands: only the order of the FP32 sums differs (a few
                // units in the last place of the scale, typically; a wrong layout or tile would be
                // off by the scale itself).
                let err = (got[idx] - emulated[idx]).abs();
                prop_assert!(
                    f64::from(err) <= scale[idx] * 1e-4 + 1e-6,
                    "{} vs emulated at {}: {} vs {}",
                    backend,
                    idx,
                    got[idx],
                    emulated[idx]
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_backend_is_within_bf16_rounding_of_the_exact_product(
        m in 1usize..50, k in 1usize..80, n in 1usize..70, seed: u64,
    ) {
        check_backends(m, k, n, seed)?;
    }
}

/// Sizes past one tile in every direction, `k` past one 32-wide step with an odd remainder, past
/// the AVX-512 kernel's 512-value step, and enough columns that the product is split between
/// threads.
#[test]
fn large_odd_products_are_within_bf16_rounding() {
    for (m, k, n) in [
        (67, 301, 133),
        (16, 32, 16),
        (33, 65, 17),
        (1, 1280, 1),
        (130, 9, 700),
        (40, 1100, 70),
    ] {
        check_backends(m, k, n, 11).unwrap();
    }
}

#[test]
fn emulation_really_rounds_and_wrong_shapes_are_errors() {
    // 1 + 2⁻¹⁰ is not a BF16 value: emulated, 1·(1 + 2⁻¹⁰) becomes 1.
    let got = kernels::matmul_bf16(&[1.0], &[1.0 + 1.0 / 1024.0], [1, 1, 1], Bf16Backend::Emulated).unwrap();
    assert_eq!(got, vec![1.0]);
    let fp32 = kernels::matmul_bf16(&[1.0], &[1.0 + 1.0 / 1024.0], [1, 1, 1], Bf16Backend::Fp32).unwrap();
    assert_eq!(fp32, vec![1.0 + 1.0 / 1024.0]);
    let err = kernels::matmul_bf16(&[1.0; 5], &[1.0; 6], [2, 3, 2], Bf16Backend::Emulated).unwrap_err();
    assert!(err.to_string().contains("2×3·3×2"), "{err}");
    for b in [Bf16Backend::Amx, Bf16Backend::Avx512] {
        if !b.is_supported() {
            let err = kernels::matmul_bf16(&[1.0], &[1.0], [1, 1, 1], b).unwrap_err();
            assert!(err.to_string().contains("cannot run"), "{err}");
        }
    }
}

/// ‖a − b‖ / ‖b‖.
fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(av.len(), bv.len());
    let diff: f32 = av.iter().zip(&bv).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = bv.iter().map(|y| y * y).sum();
    (diff / norm.max(1e-30)).sqrt()
}

type Op = Box<dyn Fn(&[Tensor], Kernels) -> Tensor>;

/// The ops with matrix products, each with its inputs and the relative error allowed.
///
/// Products alone move values and gradients by ~0.2%. Two ops get 8% for their gradients: the fused
/// convolution + ReLU + 2×2 pooling (where a window's two largest values lie within BF16 rounding
/// of each other the pool picks the other, and the window's whole gradient moves to another pixel)
/// and the inverted bottleneck (its batch-statistics normalization subtracts nearly equal terms).
/// Both are properties of the ops, not of the products: rounding just the inputs to BF16 and
/// running in FP32 moves those gradients by the same ~5% (measured while writing this test).
fn ops() -> Vec<(&'static str, Vec<Tensor>, Op, f32)> {
    let conv = ConvSpec {
        kernel: 3,
        stride: 2,
        padding: 1,
        relu: true,
    };
    let pool = ConvSpec {
        kernel: 3,
        stride: 1,
        padding: 0,
        relu: true,
    };
    let block = MbConvSpec {
        cin: 8,
        mid: 48,
        cout: 8,
        kernel: 3,
        stride: 1,
        expand: true,
        eps: 1e-3,
    };
    let mut params = random(&[block.layout().len], 5).to_vec1::<f32>().unwrap();
    let lay = block.layout();
    for (g, _) in lay.bn0.iter().chain([&lay.bn1, &lay.bn2]) {
        params[g.clone()].iter_mut().for_each(|v| *v = 1.0 + *v * 0.25);
    }
    let params = Tensor::new(params, &Device::Cpu).unwrap();
    vec![
        (
            "conv1x1",
            vec![random(&[3, 24, 9, 11], 1), random(&[40, 24, 1, 1], 2)],
            Box::new(|t: &[Tensor], k| kernels::conv1x1(&t[0], &t[1], k).unwrap()),
            0.02,
        ),
        (
            "conv2d 3×3 stride 2",
            vec![
                random(&[2, 5, 13, 12], 3),
                random(&[17, 5, 3, 3], 4),
                random(&[17], 5),
            ],
            Box::new(move |t: &[Tensor], k| kernels::conv2d(&t[0], &t[1], &t[2], conv, k).unwrap()),
            0.02,
        ),
        (
            "conv2d + ReLU + pool",
            vec![
                random(&[2, 3, 14, 15], 6),
                random(&[32, 3, 3, 3], 7),
                random(&[32], 8),
            ],
            Box::new(move |t: &[Tensor], k| {
                kernels::conv2d_relu_pool2x2(&t[0], &t[1], &t[2], pool, k).unwrap()
            }),
            0.08,
        ),
        (
            "linear",
            vec![random(&[5, 300], 9), random(&[37, 300], 10), random(&[37], 11)],
            Box::new(|t: &[Tensor], k| kernels::linear(&t[0], &t[1], &t[2], false, k).unwrap()),
            0.02,
        ),
        (
            "inverted bottleneck",
            vec![random(&[3, 8, 10, 9], 12), params],
            Box::new(move |t: &[Tensor], k| kernels::mbconv(&t[0], &t[1], block, None, k).unwrap().0),
            0.08,
        ),
    ]
}

/// Values and gradients of every op in `Kernels::Bf16` against `Kernels::Fast`, under the backend
/// this process chose. With the fp32 backend they must be identical; otherwise the values differ (the
/// operands really were rounded) but within each op's allowance (relative L2, see [`ops`]). Then
/// [`frozen_blocks_match_the_unfrozen_op`] and [`frozen_input_norm_matches_the_separate_ops`] under
/// the same backend.
#[test]
fn bf16_ops_track_the_fp32_ops() {
    let status = kernels::bf16_status();
    if let Ok(forced) = std::env::var("FRACTURE_BF16") {
        assert_eq!(status.backend.name(), forced, "{}", status.reason);
    }
    for (what, inputs, f, allowed) in ops() {
        let mut runs = Vec::new();
        for k in [Kernels::Fast, Kernels::Bf16] {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let out = f(&ts, k);
            let r = random(out.dims(), 99);
            let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
            runs.push((out, gs));
        }
        let (fast, bf16) = (&runs[0], &runs[1]);
        let mut pairs = vec![(format!("{what} values"), &bf16.0, &fast.0)];
        for (i, (b, f)) in bf16.1.iter().zip(&fast.1).enumerate() {
            pairs.push((format!("{what} gradient of input {i}"), b, f));
        }
        for (name, b, f) in pairs {
            let err = relative(b, f);
            if status.backend == Bf16Backend::Fp32 {
                assert_eq!(err, 0.0, "{name}: the fp32 backend must give the fp32 result");
            } else {
                // A bias gradient (a sum of the output gradient) may come out identical.
                if name.ends_with("values") {
                    assert!(err > 0.0, "{name}: identical to fp32, so nothing was rounded");
                }
                let allowed = if name.ends_with("values") { 0.02 } else { allowed };
                assert!(
                    err <= allowed,
                    "{name}: relative error {err} on {}",
                    status.backend
                );
            }
        }
    }
    frozen_blocks_match_the_unfrozen_op();
    frozen_input_norm_matches_the_separate_ops();
}

/// A [`kernels::FrozenMbConv`] gives exactly the values and input gradients of [`kernels::mbconv`]
/// with the same parameters and running statistics, in FP32 and BF16 under this process's backend,
/// on a batch of one (the whole-batch pass) and of three (band by band where there are at most
/// three threads), on its first call (which packs the weights) and on later ones (which reuse
/// them); and it keeps its own copy of the parameters.
fn frozen_blocks_match_the_unfrozen_op() {
    let spec = MbConvSpec {
        cin: 8,
        mid: 48,
        cout: 8,
        kernel: 3,
        stride: 1,
        expand: true,
        eps: 1e-3,
    };
    let lay = spec.layout();
    let mut flat_params = random(&[lay.len], 31).to_vec1::<f32>().unwrap();
    for (g, _) in lay.bn0.iter().chain([&lay.bn1, &lay.bn2]) {
        flat_params[g.clone()]
            .iter_mut()
            .for_each(|v| *v = 1.0 + *v * 0.25);
    }
    let params = Var::new(flat_params.as_slice(), &Device::Cpu).unwrap();
    let running: kernels::BlockStats = [spec.mid, spec.mid, spec.cout]
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            (
                values(c, 40 + i as u64),
                values(c, 50 + i as u64).iter().map(|v| v.abs() + 0.5).collect(),
            )
        })
        .collect();
    let frozen = kernels::FrozenMbConv::new(params.as_tensor(), spec, running.clone()).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let differing = |a: &Tensor, b: &Tensor| flat(a).iter().zip(flat(b)).filter(|(x, y)| *x != y).count();
    for k in [Kernels::Fast, Kernels::Bf16] {
        for b in [1, 3] {
            let x = random(&[b, spec.cin, 10, 9], 60 + b as u64);
            let want = kernels::mbconv(&x, &params.as_tensor().detach(), spec, Some(running.clone()), k)
                .unwrap()
                .0;
            for call in 0..2 {
                let got = kernels::mbconv_frozen(&x, &frozen, k).unwrap();
                let n = differing(&got, &want);
                assert_eq!(n, 0, "{k:?}, batch {b}, call {call}: {n} values differ");
            }
            let xv = Var::from_tensor(&x).unwrap();
            let r = random(want.dims(), 70);
            let grad = |y: Tensor| {
                (&y * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
                    .get(&xv)
                    .unwrap()
                    .clone()
            };
            let gw = grad(
                kernels::mbconv(
                    xv.as_tensor(),
                    &params.as_tensor().detach(),
                    spec,
                    Some(running.clone()),
                    k,
                )
                .unwrap()
                .0,
            );
            let gf = grad(kernels::mbconv_frozen(xv.as_tensor(), &frozen, k).unwrap());
            let n = differing(&gf, &gw);
            assert_eq!(n, 0, "{k:?}, batch {b}: {n} input gradients differ");
        }
    }
    // Changing the variables afterwards (as an optimizer's in-place step does) leaves it alone.
    let x = random(&[1, spec.cin, 10, 9], 80);
    let before = flat(&kernels::mbconv_frozen(&x, &frozen, Kernels::Bf16).unwrap());
    params.set(&(params.as_tensor() * 2.0).unwrap()).unwrap();
    let after = kernels::mbconv_frozen(&x, &frozen, Kernels::Bf16).unwrap();
    assert!(flat(&after) == before, "the frozen block followed its variables");
    // Parameters or statistics that do not fit the shape are errors that say so.
    let short = params.as_tensor().narrow(0, 0, lay.len - 1).unwrap();
    let err = kernels::FrozenMbConv::new(&short, spec, running.clone()).unwrap_err();
    assert!(err.to_string().contains("parameters of shape"), "{err}");
    let err = kernels::FrozenMbConv::new(params.as_tensor(), spec, running[..2].to_vec()).unwrap_err();
    assert!(err.to_string().contains("running statistics"), "{err}");
}

/// A [`kernels::FrozenMbConv`] with an input normalization gives the block applied to
/// `ReLU6(x · scale + shift)`: against [`kernels::affine_act`] then [`kernels::mbconv`], on wide and
/// narrow planes, batches of one and three, FP32 and BF16, values (the fused pass within rounding)
/// and input gradients (the separate ops, exactly); and it is refused where it cannot apply.
fn frozen_input_norm_matches_the_separate_ops() {
    let spec = MbConvSpec {
        cin: 32,
        mid: 32,
        cout: 16,
        kernel: 3,
        stride: 1,
        expand: false,
        eps: 1e-3,
    };
    let lay = spec.layout();
    let params = random(&[lay.len], 90);
    let running: kernels::BlockStats = [spec.mid, spec.cout]
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            (
                values(c, 91 + i as u64),
                values(c, 93 + i as u64).iter().map(|v| v.abs() + 0.5).collect(),
            )
        })
        .collect();
    let (scale, shift) = (values(spec.cin, 95), values(spec.cin, 96));
    let frozen = kernels::FrozenMbConv::new(&params, spec, running.clone())
        .unwrap()
        .with_input_norm(scale.clone(), shift.clone())
        .unwrap();
    let (st, sh) = (
        Tensor::new(scale.as_slice(), &Device::Cpu).unwrap(),
        Tensor::new(shift.as_slice(), &Device::Cpu).unwrap(),
    );
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let separate = |x: &Tensor, k| {
        let a = kernels::affine_act(x, &st, &sh, kernels::Activation::Relu6, k).unwrap();
        kernels::mbconv(&a, &params, spec, Some(running.clone()), k)
            .unwrap()
            .0
    };
    for k in [Kernels::Fast, Kernels::Bf16] {
        for (b, w) in [(1, 21), (3, 21), (1, 9), (3, 9)] {
            let x = (random(&[b, spec.cin, 10, w], 97) * 3.0).unwrap();
            let (got, want) = (
                flat(&kernels::mbconv_frozen(&x, &frozen, k).unwrap()),
                flat(&separate(&x, k)),
            );
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-4, "{k:?}, batch {b}, width {w}: off by {worst}");
            let xv = Var::from_tensor(&x).unwrap();
            let r = random(&[b, spec.cout, 10, w], 98);
            let grad = |y: Tensor| {
                (&y * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
                    .get(&xv)
                    .unwrap()
                    .clone()
            };
            let (gf, gs) = (
                grad(kernels::mbconv_frozen(xv.as_tensor(), &frozen, k).unwrap()),
                grad(separate(xv.as_tensor(), k)),
            );
            assert!(
                flat(&gf) == flat(&gs),
                "{k:?}, batch {b}, width {w}: input gradients differ"
            );
        }
    }
    let expanding = MbConvSpec {
        expand: true,
        mid: 64,
        ..spec
    };
    let block = kernels::FrozenMbConv::new(
        &random(&[expanding.layout().len], 99),
        expanding,
        vec![
            (vec![0.0; 64], vec![1.0; 64]),
            (vec![0.0; 64], vec![1.0; 64]),
            (vec![0.0; 16], vec![1.0; 16]),
        ],
    )
    .unwrap();
    let err = block.with_input_norm(scale.clone(), shift.clone()).unwrap_err();
    assert!(err.to_string().contains("without expansion or skip"), "{err}");
    let block = kernels::FrozenMbConv::new(&params, spec, running).unwrap();
    let err = block.with_input_norm(scale[..3].to_vec(), shift).unwrap_err();
    assert!(err.to_string().contains("for 32 channels"), "{err}");
}

/// Runs [`bf16_ops_track_the_fp32_ops`] in a child process for each backend this processor can
/// run, forced with `FRACTURE_BF16`: the fp32 fallback and the emulated backend on any processor,
/// AVX-512 BF16 and AMX where present.
#[test]
fn every_backend_runs_the_ops_when_forced() {
    if std::env::var_os("FRACTURE_BF16").is_some() {
        return; // already a child
    }
    for backend in Bf16Backend::available() {
        common::passes_in_child_with("bf16_ops_track_the_fp32_ops", "FRACTURE_BF16", backend.name());
    }
}

#[test]
fn a_precision_maps_onto_kernels_by_one_rule() {
    use kernels::Precision;
    assert_eq!(Kernels::Fast.with_precision(Precision::Bf16), Ok(Kernels::Bf16));
    assert_eq!(Kernels::Bf16.with_precision(Precision::Bf16), Ok(Kernels::Bf16));
    assert_eq!(Kernels::Bf16.with_precision(Precision::Fp32), Ok(Kernels::Fast));
    assert_eq!(Kernels::Fast.with_precision(Precision::Fp32), Ok(Kernels::Fast));
    assert_eq!(
        Kernels::Reference.with_precision(Precision::Fp32),
        Ok(Kernels::Reference)
    );
    let err = Kernels::Reference.with_precision(Precision::Bf16).unwrap_err();
    assert!(err.contains("fp32 only"), "{err}");
    for k in [Kernels::Fast, Kernels::Bf16] {
        for p in [Precision::Fp32, Precision::Bf16] {
            assert_eq!(k.with_precision(p).unwrap().precision(), p);
        }
    }
}
