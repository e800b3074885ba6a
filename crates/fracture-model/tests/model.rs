//! Model behaviour: shapes, weight files, gradients and a short fit.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

mod common;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use common::{bce, input};
use fracture_model::{
    ArchConfig, CamMethod, Error, FractureNet, Model, ModelConfig, SeedConfig, seeded_var_builder,
};

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracture-model-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn small(image_size: usize) -> ModelConfig {
    ModelConfig {
        image_size,
        arch: ArchConfig::Seed(SeedConfig {
            conv1_channels: 4,
            conv2_channels: 6,
            dense_units: 8,
            dropout_flatten: 0.5,
            dropout_dense: 0.5,
        }),
    }
}

#[test]
fn logits_have_shape_b_for_several_sizes() {
    for (size, batch) in [(10, 1), (32, 3), (37, 2), (64, 4)] {
        let model = Model::new(&small(size), 1, &Device::Cpu).unwrap();
        let logits = model
            .net
            .forward_t(&input(batch, size, 2, DType::F32), false)
            .unwrap();
        assert_eq!(logits.dims(), &[batch], "size {size}");
        let p = model
            .net
            .probabilities(&input(batch, size, 2, DType::F32))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    // The original widths at the original size: dense layer of 64·30·30 inputs.
    let model = Model::new(&ModelConfig::seed(128), 0, &Device::Cpu).unwrap();
    assert_eq!(
        model.param_count(),
        32 * 9 + 32 + 64 * 32 * 9 + 64 + 57_600 * 128 + 128 + 128 + 1
    );
    let logits = model.net.forward_t(&input(2, 128, 3, DType::F32), false).unwrap();
    assert_eq!(logits.dims(), &[2]);
}

#[test]
fn wrong_input_shapes_are_errors() {
    let model = Model::new(&small(32), 1, &Device::Cpu).unwrap();
    for bad in [
        input(2, 31, 0, DType::F32),
        Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap(),
    ] {
        let err = model.net.forward_t(&bad, false).unwrap_err().to_string();
        assert!(err.contains("expected input of shape (B, 1, 32, 32)"), "{err}");
    }
}

#[test]
fn same_seed_same_weights_and_dropout_is_seeded() {
    let x = input(3, 32, 5, DType::F32);
    let a = Model::new(&small(32), 9, &Device::Cpu).unwrap();
    let b = Model::new(&small(32), 9, &Device::Cpu).unwrap();
    let c = Model::new(&small(32), 10, &Device::Cpu).unwrap();
    let la = a.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(la, b.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap());
    assert_ne!(la, c.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap());
    a.net.set_dropout_seed(4);
    let t1 = a.net.forward_t(&x, true).unwrap().to_vec1::<f32>().unwrap();
    a.net.set_dropout_seed(4);
    let t2 = a.net.forward_t(&x, true).unwrap().to_vec1::<f32>().unwrap();
    let t3 = a.net.forward_t(&x, true).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(t1, t2);
    assert_ne!(t1, t3, "the generator advances between steps");
    assert_ne!(t1, la, "dropout is active in training mode");
}

#[test]
fn save_then_load_gives_identical_logits_and_keeps_metadata() {
    let model = Model::new(&small(40), 3, &Device::Cpu).unwrap();
    let path = tmp("roundtrip.safetensors");
    let extra = BTreeMap::from([("fracture.preprocess".to_string(), r#"{"size":40}"#.to_string())]);
    model.save(&path, &extra).unwrap();
    let loaded = Model::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), model.config());
    assert_eq!(
        loaded.metadata.get("fracture.preprocess").map(String::as_str),
        Some(r#"{"size":40}"#)
    );
    let x = input(4, 40, 8, DType::F32);
    let a = model.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap();
    let b = loaded.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_weight_files_are_clear_errors() {
    let model = Model::new(&small(40), 3, &Device::Cpu).unwrap();
    let bytes = model.to_safetensors(&BTreeMap::new()).unwrap();

    let garbage = tmp("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    let err = Model::load(&garbage, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::BadWeights { .. }) && err.to_string().contains("garbage.safetensors"),
        "{err}"
    );

    let missing = Model::load(&tmp("does-not-exist.safetensors"), &Device::Cpu).unwrap_err();
    assert!(matches!(missing, Error::Io(_)), "{missing}");

    // A plain safetensors file without our metadata.
    let w = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let plain = safetensors::serialize([("w", &w)], None).unwrap();
    let err = Model::from_safetensors(&plain, &tmp("plain"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a fracture model file"), "{err}");

    // Weights of another input size: the dense layer's shape no longer matches the stored config.
    let other = Model::new(&small(48), 3, &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, Tensor)> = other
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone();
    let mismatched =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), meta.clone()).unwrap();
    let err = Model::from_safetensors(&mismatched, &tmp("mismatch"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fc1.weight") && err.contains("shape"), "{err}");

    // An extra tensor: written by a different architecture.
    let mut with_extra: Vec<(String, Tensor)> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    with_extra.push(("bn1.running_mean".into(), w.clone()));
    let extra = safetensors::serialize(with_extra.iter().map(|(n, t)| (n.as_str(), t)), meta).unwrap();
    let err = Model::from_safetensors(&extra, &tmp("extra"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bn1.running_mean"), "{err}");
}

#[test]
fn saving_over_an_existing_file_is_atomic() {
    let path = tmp("atomic.safetensors");
    let a = Model::new(&small(32), 1, &Device::Cpu).unwrap();
    a.save(&path, &BTreeMap::new()).unwrap();
    let b = Model::new(&small(32), 2, &Device::Cpu).unwrap();
    b.save(&path, &BTreeMap::new()).unwrap();
    let dir = path.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let loaded = Model::load(&path, &Device::Cpu).unwrap();
    let x = input(1, 32, 1, DType::F32);
    assert_eq!(
        loaded.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap(),
        b.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap()
    );
}

/// Central finite differences in f64 for every parameter tensor (a sample of its elements) against
/// the backward pass. This is the check that catches a wrong backward such as candle's CPU
/// `max_pool2d` (see `fracture_model::max_pool2x2`).
#[test]
fn backward_matches_finite_differences() {
    let dev = Device::Cpu;
    let cfg = small(14);
    let varmap = VarMap::new();
    let net = FractureNet::new(&cfg, seeded_var_builder(&varmap, 11, DType::F64, &dev)).unwrap();
    let x = input(3, 14, 17, DType::F64);
    let r = Tensor::new(&[0.7f64, -1.3, 0.4], &dev).unwrap();
    let loss = |net: &FractureNet| -> Tensor {
        (net.forward_t(&x, false).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&net).backward().unwrap();
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let checked = common::assert_backward_matches_finite_differences(
        &vars,
        &grads,
        || loss(&net).to_scalar::<f64>().unwrap(),
        12,
    );
    assert!(checked >= 60, "checked {checked} elements");
}

#[test]
fn a_seeded_short_fit_lowers_the_loss() {
    let dev = Device::Cpu;
    let cfg = ModelConfig {
        image_size: 32,
        arch: ArchConfig::Seed(SeedConfig {
            conv1_channels: 8,
            conv2_channels: 16,
            dense_units: 32,
            ..SeedConfig::default()
        }),
    };
    let model = Model::new(&cfg, 5, &dev).unwrap();
    // Eight images: fractured ones carry a bright diagonal line.
    let mut data = Vec::new();
    let mut targets = Vec::new();
    for i in 0..8 {
        let fractured = i % 2 == 0;
        for y in 0..32i32 {
            for x in 0..32i32 {
                let line = fractured && (x - y).abs() <= 1;
                data.push(if line {
                    0.9f32
                } else {
                    0.2 + 0.01 * ((x + y + i) % 5) as f32
                });
            }
        }
        targets.push(if fractured { 1f32 } else { 0.0 });
    }
    let x = Tensor::from_vec(data, (8, 1, 32, 32), &dev).unwrap();
    let y = Tensor::from_vec(targets, 8, &dev).unwrap();
    let vars: Vec<Var> = model.named_vars().into_iter().map(|(_, v)| v).collect();
    let params = candle_nn::ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vars, params).unwrap();
    let initial = bce(&model.net.forward_t(&x, false).unwrap(), &y)
        .to_scalar::<f32>()
        .unwrap();
    for step in 0..30 {
        model.net.set_dropout_seed(step);
        let loss = bce(&model.net.forward_t(&x, true).unwrap(), &y);
        opt.backward_step(&loss).unwrap();
    }
    let last = bce(&model.net.forward_t(&x, false).unwrap(), &y)
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        last.is_finite() && last < initial * 0.5,
        "loss {initial} -> {last}"
    );
}

/// A constructed case with a known answer: a network trained to call an image "fractured" exactly
/// when a bright patch sits in its top-left quarter. The activation map of such an image must light
/// up that patch and leave the rest dark.
#[test]
fn grad_cam_points_at_the_evidence() {
    let dev = Device::Cpu;
    let size = 32usize;
    let cfg = ModelConfig {
        image_size: size,
        arch: ArchConfig::Seed(SeedConfig {
            conv1_channels: 8,
            conv2_channels: 16,
            dense_units: 32,
            dropout_flatten: 0.0,
            dropout_dense: 0.0,
        }),
    };
    let model = Model::new(&cfg, 3, &dev).unwrap();
    // Deterministic noise plus, for positives, a 6×6 patch at a varying place in the top-left quarter.
    let image = |i: usize, patch: Option<(usize, usize)>| common::patch_image(size, i, patch, 6);
    let mut data = Vec::new();
    let mut targets = Vec::new();
    for i in 0..32 {
        let positive = i % 2 == 0;
        let patch = positive.then_some((1 + i % 9, 1 + (i * 5) % 9));
        data.extend(image(i, patch));
        targets.push(if positive { 1f32 } else { 0.0 });
    }
    let x = Tensor::from_vec(data, (32, 1, size, size), &dev).unwrap();
    let y = Tensor::from_vec(targets, 32, &dev).unwrap();
    let vars: Vec<Var> = model.named_vars().into_iter().map(|(_, v)| v).collect();
    let params = candle_nn::ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vars, params).unwrap();
    for _ in 0..60 {
        let loss = bce(&model.net.forward_t(&x, true).unwrap(), &y);
        opt.backward_step(&loss).unwrap();
    }
    let loss = bce(&model.net.forward_t(&x, false).unwrap(), &y)
        .to_scalar::<f32>()
        .unwrap();
    assert!(loss < 0.1, "the network learned the task (loss {loss})");

    // A new positive with the patch at rows/columns 4..10.
    let probe = Tensor::from_vec(image(999, Some((4, 4))), (1, 1, size, size), &dev).unwrap();
    let cam = model.net.grad_cam(&probe, CamMethod::HiResCam).unwrap();
    assert!(cam.logit > 0.0, "called fractured (logit {})", cam.logit);
    let up = cam.upsample(size);
    let mass = common::corner_mass(&up, size, 14);
    assert!(mass > 0.8, "{mass:.2} of the map lies on the patch's quarter");
    let (peak, _) = up.iter().enumerate().fold(
        (0, f32::MIN),
        |best, (k, &v)| if v > best.1 { (k, v) } else { best },
    );
    let (py, px) = (peak / size, peak % size);
    assert!(
        (2..12).contains(&py) && (2..12).contains(&px),
        "peak at ({py}, {px})"
    );
    // A negative image has no evidence worth showing in that quarter.
    let empty = Tensor::from_vec(image(998, None), (1, 1, size, size), &dev).unwrap();
    let cam = model.net.grad_cam(&empty, CamMethod::HiResCam).unwrap();
    assert!(cam.logit < 0.0);
    // Classic Grad-CAM runs too and stays in [0, 1]; on this dense-head network its averaged channel
    // weights do not localise (see fracture_model::CamMethod), which is why HiResCAM is the default.
    let classic = model.net.grad_cam(&probe, CamMethod::GradCam).unwrap();
    assert!(classic.map.iter().all(|v| (0.0..=1.0).contains(v)));
    // Batches are refused: a map explains one image.
    assert!(model.net.grad_cam(&x, CamMethod::HiResCam).is_err());
}
