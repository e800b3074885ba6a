//! EfficientNet-Lite0: the ImageNet weights from `../shared/pretrained` (Apache-2.0) reproduce the
//! PyTorch definition's known answers; both file formats read the same tensors; shapes, names and
//! errors of the pretrained import; gradients through a whole block against finite differences.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use candle_core::{DType, Device, ModuleT, Tensor};
use fracture_model::{Kernels, Model, ModelConfig, PretrainedWeights};

fn reference(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("reference-outputs.json")).unwrap()).unwrap()
}

/// A 224×224 8-bit gray PNG as the network input `(1, 1, 224, 224)`, scaled as `(v − 127) / 128`.
fn input(path: &Path) -> Tensor {
    let img = image::open(path).unwrap().to_luma8();
    let (w, h) = img.dimensions();
    let v: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| (f32::from(v) - 127.0) / 128.0)
        .collect();
    Tensor::from_vec(v, (1, 1, h as usize, w as usize), &Device::Cpu).unwrap()
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).abs())
        .fold(0.0, f64::max)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
#[ignore = "needs the pretrained weights at ../shared/pretrained; `cargo test -- --include-ignored` runs it"]
fn imagenet_weights_reproduce_the_known_answers() {
    let dir = fracture_testkit::pretrained();
    let weights = PretrainedWeights::read(&dir.join("efficientnet-lite0-57934424.pth")).unwrap();
    assert_eq!(weights.format, "pytorch-legacy");
    assert_eq!(
        weights.sha256,
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    );
    // The safetensors copy holds the same names and values.
    let copy = PretrainedWeights::read(&dir.join("efficientnet-lite0.safetensors")).unwrap();
    assert_eq!(copy.format, "safetensors");
    assert_eq!(
        weights.tensors.keys().collect::<Vec<_>>(),
        copy.tensors.keys().collect::<Vec<_>>()
    );
    assert_eq!(weights.tensors.len(), 296);
    for (name, t) in &weights.tensors {
        let c = &copy.tensors[name];
        assert_eq!(t.dims(), c.dims(), "{name}");
        let d = (t.to_dtype(DType::F64).unwrap() - c.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap_or(0.0);
        assert_eq!(d, 0.0, "{name} differs between the two files");
    }

    let model = Model::new(&ModelConfig::efficientnet_lite0(224), 7, &Device::Cpu).unwrap();
    let origin = model.load_pretrained(&weights).unwrap();
    assert_eq!(origin.file, "efficientnet-lite0-57934424.pth");
    assert!(origin.ignored.contains(&"_fc.weight".to_string()));
    // Every tensor is used but the classifier and the step counters.
    let counters = weights
        .tensors
        .keys()
        .filter(|k| k.ends_with("num_batches_tracked"))
        .count();
    assert_eq!(origin.loaded + origin.ignored.len(), 296);
    assert_eq!(origin.ignored.len(), counters + 2);

    let fc_w = weights.tensors["_fc.weight"].clone();
    let fc_b = weights.tensors["_fc.bias"].clone();
    let answers = reference(&dir);
    for kernels in [Kernels::Fast, Kernels::Reference] {
        let mut model = Model::new(&ModelConfig::efficientnet_lite0(224), 7, &Device::Cpu).unwrap();
        model.load_pretrained(&weights).unwrap();
        model.net.set_kernels(kernels);
        for name in ["reference-ramp.png", "reference-xray.png"] {
            let want = &answers["outputs"][name];
            let features = model.net.pooled_features(&input(&dir.join(name))).unwrap();
            let logits = features
                .matmul(&fc_w.t().unwrap())
                .unwrap()
                .broadcast_add(&fc_b)
                .unwrap();
            let f = features.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let l = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (df, dl) = (
                max_diff(&f, &floats(&want["pooled_features_1280"])),
                max_diff(&l, &floats(&want["logits_1000"])),
            );
            eprintln!("{name} ({kernels:?}): max |Δ| pooled features {df:.2e}, logits {dl:.2e}");
            assert!(
                df < 1e-3 && dl < 1e-3,
                "{name} ({kernels:?}): features {df}, logits {dl}"
            );
            let top: Vec<i64> = want["top5_classes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let mut order: Vec<usize> = (0..l.len()).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
            assert_eq!(order[0] as i64, top[0], "{name}: top class");
        }
    }
}

#[test]
fn shapes_parameters_and_training_mode() {
    let model = Model::new(&ModelConfig::efficientnet_lite0(64), 3, &Device::Cpu).unwrap();
    let x = common::input(2, 64, 5, DType::F32);
    let logits = model.net.forward_t(&x, true).unwrap();
    assert_eq!(logits.dims(), &[2]);
    assert_eq!(model.net.pooled_features(&x).unwrap().dims(), &[2, 1280]);
    // The ImageNet network has 4,652,008 trainable values with its 3-channel stem and 1000-class
    // classifier: 4,652,008 − 32·2·9 (stem) − 1,281,000 (classifier) + 1,281 (fracture head).
    assert_eq!(model.param_count(), 4_652_008 - 576 - 1_281_000 + 1_281);
    let names: Vec<String> = model.named_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"_blocks.15._project_conv.weight".to_string()));
    assert!(names.contains(&"_bn1.running_var".to_string()));
    assert!(names.contains(&"head.fc.weight".to_string()));
}

#[test]
fn pretrained_import_names_what_does_not_fit() {
    let model = Model::new(&ModelConfig::efficientnet_lite0(64), 3, &Device::Cpu).unwrap();
    // A weight file of our own for this architecture, with the classifier renamed: every tensor is
    // there under its name, and the import takes it.
    let mut tensors: Vec<(String, Tensor)> = model
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("head."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pretrained_import");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, ts: &[(String, Tensor)]| {
        let path = dir.join(name);
        safetensors::serialize_to_file(ts.iter().map(|(n, t)| (n.as_str(), t)), None, &path).unwrap();
        PretrainedWeights::read(&path).unwrap()
    };
    let ok = write("ok.safetensors", &tensors);
    assert_eq!(model.load_pretrained(&ok).unwrap().loaded, tensors.len());

    let idx = tensors
        .iter()
        .position(|(n, _)| n == "_blocks.3._depthwise_conv.weight")
        .unwrap();
    let saved = tensors[idx].1.clone();
    tensors[idx].1 = Tensor::zeros((144, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let err = model
        .load_pretrained(&write("shape.safetensors", &tensors))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("_blocks.3._depthwise_conv.weight")
            && err.contains("[144, 1, 3, 3]")
            && err.contains("[144, 1, 5, 5]"),
        "{err}"
    );
    tensors[idx].1 = saved;
    let removed = tensors.remove(idx);
    let err = model
        .load_pretrained(&write("missing.safetensors", &tensors))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("_blocks.3._depthwise_conv.weight") && err.contains("missing"),
        "{err}"
    );
    tensors.insert(idx, removed);
    tensors.push((
        "_blocks.16._bn0.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    ));
    let err = model
        .load_pretrained(&write("extra.safetensors", &tensors))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("_blocks.16._bn0.weight") && err.contains("not part of"),
        "{err}"
    );

    // Other architectures have no pretrained weights.
    let resnet = Model::new(&ModelConfig::resnet(32), 3, &Device::Cpu).unwrap();
    let err = resnet.load_pretrained(&ok).unwrap_err().to_string();
    assert!(err.contains("efficientnet-lite0 only"), "{err}");
}

/// Finite differences through a whole inverted bottleneck: the fused kernel's gradients (f32) for
/// the input and every parameter against central differences (f64, step 1e-5) of the same block
/// computed with candle's own operations, with batch and with fixed statistics, stride 1 (with the
/// skip connection) and stride 2.
#[test]
fn fused_block_gradients_match_finite_differences() {
    use fracture_kernels::{self as kernels, MbConvSpec};
    for (stride, batch_stats) in [(1usize, true), (2, true), (1, false), (2, false)] {
        let spec = MbConvSpec {
            cin: 3,
            mid: 9,
            cout: 3,
            kernel: 3,
            stride,
            expand: true,
            eps: 1e-3,
        };
        let lay = spec.layout();
        let x64 = common::input(2, 6, 3, DType::F64).affine(2.0, -0.7).unwrap();
        let x64 = Tensor::cat(&[&x64, &(&x64 * 0.5).unwrap(), &x64.sqr().unwrap()], 1).unwrap();
        let mut p: Vec<f64> = (0..lay.len)
            .map(|i| ((i * 37 % 23) as f64 / 23.0 - 0.5) * 0.8)
            .collect();
        for (g, _) in lay.bn0.iter().chain([&lay.bn1, &lay.bn2]) {
            p[g.clone()].iter_mut().for_each(|v| *v += 1.2);
        }
        let p64 = Tensor::new(p.clone(), &Device::Cpu).unwrap();
        let running: Option<kernels::BlockStats> = (!batch_stats).then(|| {
            [spec.mid, spec.mid, spec.cout]
                .iter()
                .map(|&c| {
                    (
                        (0..c).map(|i| 0.1 * i as f32 - 0.2).collect(),
                        (0..c).map(|i| 0.5 + 0.1 * i as f32).collect(),
                    )
                })
                .collect()
        });
        let weights = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            Tensor::from_vec(
                (0..n)
                    .map(|i| ((i * 13 % 17) as f64 - 8.0) / 8.0)
                    .collect::<Vec<_>>(),
                shape,
                &Device::Cpu,
            )
            .unwrap()
        };
        // The reference loss in f64: Σ out · r.
        let loss64 = |x: &Tensor, p: &Tensor| -> f64 {
            let (y, _) = kernels::mbconv(x, p, spec, running.clone(), Kernels::Reference).unwrap();
            (y.clone() * weights(y.dims()))
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        // The fused kernel's gradients in f32.
        let xv = candle_core::Var::from_tensor(&x64.to_dtype(DType::F32).unwrap()).unwrap();
        let pv = candle_core::Var::from_tensor(&p64.to_dtype(DType::F32).unwrap()).unwrap();
        let (y, _) = kernels::mbconv(
            xv.as_tensor(),
            pv.as_tensor(),
            spec,
            running.clone(),
            Kernels::Fast,
        )
        .unwrap();
        let r = weights(y.dims()).to_dtype(DType::F32).unwrap();
        let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads
            .get(&xv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gp = grads.get(&pv).unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-5;
        let mut worst = 0.0f64;
        let mut check = |analytic: f32, plus: f64, minus: f64, what: String| {
            let numeric = (plus - minus) / (2.0 * eps);
            let err = (numeric - f64::from(analytic)).abs();
            worst = worst.max(err / (1e-2 + numeric.abs()));
            assert!(
                err <= 2e-3 + 2e-3 * numeric.abs(),
                "stride {stride}, batch statistics {batch_stats}: {what}: fused {analytic} vs finite difference {numeric}"
            );
        };
        let xs = x64.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in (0..xs.len()).step_by(7) {
            let at = |d: f64| {
                let mut v = xs.clone();
                v[i] += d;
                loss64(&Tensor::from_vec(v, x64.shape(), &Device::Cpu).unwrap(), &p64)
            };
            check(gx[i], at(eps), at(-eps), format!("input[{i}]"));
        }
        for i in (0..lay.len).step_by(3) {
            let at = |d: f64| {
                let mut v = p.clone();
                v[i] += d;
                loss64(&x64, &Tensor::new(v, &Device::Cpu).unwrap())
            };
            check(gp[i], at(eps), at(-eps), format!("parameter[{i}]"));
        }
        eprintln!("stride {stride}, batch statistics {batch_stats}: worst relative error {worst:.2e}");
    }
}

#[test]
fn the_inference_net_matches_the_trained_one_and_keeps_its_own_copy() {
    let mut model = Model::new(&ModelConfig::efficientnet_lite0(64), 3, &Device::Cpu).unwrap();
    let flat = |t: &Tensor| t.to_vec1::<f32>().unwrap();
    for k in [Kernels::Fast, Kernels::Bf16] {
        model.net.set_kernels(k);
        let frozen = model.inference_net().unwrap();
        for b in [1, 3] {
            let x = common::input(b, 64, 11 + b as u64, DType::F32);
            let want = flat(&model.net.forward_t(&x, false).unwrap());
            // Twice: the first pass prepares the blocks, the second reuses them.
            for _ in 0..2 {
                let got = flat(&frozen.forward_t(&x, false).unwrap());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst <= 1e-4, "{k:?}, batch {b}: logits differ by {worst}");
            }
        }
    }
    // The inference net holds copies: changing a variable afterwards does not reach it.
    model.net.set_kernels(Kernels::Fast);
    let frozen = model.inference_net().unwrap();
    let x = common::input(2, 64, 21, DType::F32);
    let before = flat(&frozen.forward_t(&x, false).unwrap());
    let vars = model.named_vars();
    let (_, w) = vars
        .iter()
        .find(|(n, _)| n == "_blocks.3._project_conv.weight")
        .unwrap();
    w.set(&(w.as_tensor() * 3.0).unwrap()).unwrap();
    assert!(flat(&frozen.forward_t(&x, false).unwrap()) == before);
    let moved = flat(&model.inference_net().unwrap().forward_t(&x, false).unwrap());
    assert!(
        moved != before,
        "the variable's change did not reach a new inference net"
    );
    // A batch-statistics pass moves the inference net's running statistics; the next pass with
    // running statistics must use the moved ones, not the blocks prepared before it: the same as
    // a twin that never prepared them.
    let twin = model.inference_net().unwrap();
    let prepared = model.inference_net().unwrap();
    prepared.forward_t(&x, false).unwrap();
    for net in [&twin, &prepared] {
        net.set_dropout_seed(5);
        net.forward_t(&x, true).unwrap();
    }
    let (a, b) = (
        flat(&twin.forward_t(&x, false).unwrap()),
        flat(&prepared.forward_t(&x, false).unwrap()),
    );
    assert!(a == b, "stale prepared blocks: {a:?} against {b:?}");
}
