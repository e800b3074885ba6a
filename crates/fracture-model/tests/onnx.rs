//! ONNX export of every architecture, checked by running the file in tract (an independent, pure
//! Rust runtime) against our own forward pass: P(fractured), the decision and the localization map.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, ModuleT, Tensor};
use common::input;
use fracture_model::onnx::{OnnxOptions, export};
use fracture_model::{ArchConfig, EfficientNetConfig, Model, ModelConfig, ResNetConfig, SeedConfig};

/// Gives every batch norm running statistics and scales away from their initial 0, 1 (so that the
/// export's use of them is tested), deterministically.
fn spread_batch_norms(model: &Model) {
    let data = model.varmap.data().lock().unwrap();
    // By name: the map's own order changes from one process to the next.
    let mut vars: Vec<_> = data.iter().collect();
    vars.sort_by(|a, b| a.0.cmp(b.0));
    for (i, (name, var)) in vars.into_iter().enumerate() {
        let n = var.elem_count();
        let wave = |base: f64, step: f64| -> Vec<f32> {
            (0..n)
                .map(|k| (base + step * ((k * 7 + i) % 11) as f64) as f32)
                .collect()
        };
        let values = if name.ends_with("running_mean") {
            wave(-0.25, 0.05)
        } else if name.ends_with("running_var") {
            wave(0.5, 0.1)
        } else if name.ends_with("bn0.weight") || name.ends_with("bn1.weight") || name.ends_with("bn2.weight")
        {
            wave(0.7, 0.06)
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(values, n, &Device::Cpu).unwrap())
            .unwrap();
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Exports `config`'s network (seeded weights, spread batch norms) with a standardization and a
/// calibration, runs it in tract on a batch, and compares with our forward pass.
fn matches_tract(config: ModelConfig, batch: usize, seed: u64) {
    let s = config.image_size;
    let model = Model::new(&config, seed, &Device::Cpu).unwrap();
    spread_batch_norms(&model);
    let x = input(batch, s, seed, DType::F32);
    let (mean, std) = (0.4f32, 0.3f32);
    let standardized = ((&x - f64::from(mean)).unwrap() * f64::from(1.0 / std)).unwrap();
    let logits = model
        .net
        .forward_t(&standardized, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // A calibration that keeps P away from 0 and 1, so that the comparison is sensitive.
    let spread = logits.iter().fold(0f32, |m, z| m.max(z.abs())).max(1e-3);
    let (a, b) = (f64::from(2.0 / spread), 0.1);
    let ours: Vec<f32> = logits
        .iter()
        .map(|&z| sigmoid((a as f32) * z + b as f32))
        .collect();
    let options = OnnxOptions {
        standardize: Some((mean, std)),
        calibration: Some((a, b)),
        threshold: 0.5,
        metadata: vec![("test".into(), "yes".into())],
        doc: "test".into(),
    };
    let bytes = export(&model.net, &options).unwrap();
    let outputs = fracture_testkit::onnx::run(
        &bytes,
        &[batch, 1, s, s],
        x.flatten_all().unwrap().to_vec1().unwrap(),
    );
    let (shape, theirs) = &outputs[0];
    assert_eq!(shape, &vec![batch], "p_fractured is (B,)");
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (o - t).abs() <= 1e-4,
            "{config:?}: image {i}: ours {o}, tract {t}"
        );
    }
    let (_, decisions) = &outputs[1];
    for (t, d) in theirs.iter().zip(decisions) {
        assert_eq!(*d == 1.0, *t >= 0.5, "the decision is p >= threshold");
    }
    if model.net.has_localization_head() {
        let (_, map) = model.net.forward_with_map(&standardized, false).unwrap();
        let (cells, _, _) = model.net.localization_grid().unwrap();
        let ours: Vec<f32> = map
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(sigmoid)
            .collect();
        let (shape, theirs) = &outputs[2];
        assert_eq!(shape, &vec![batch, cells, cells]);
        for (o, t) in ours.iter().zip(theirs) {
            assert!((o - t).abs() <= 1e-4, "map: ours {o}, tract {t}");
        }
    } else {
        assert_eq!(outputs.len(), 2);
    }
}

#[test]
fn the_seed_network_exports_and_tract_agrees() {
    let config = ModelConfig {
        image_size: 29,
        arch: ArchConfig::Seed(SeedConfig {
            conv1_channels: 4,
            conv2_channels: 6,
            dense_units: 8,
            ..SeedConfig::default()
        }),
    };
    matches_tract(config, 3, 1);
}

#[test]
fn the_residual_network_exports_and_tract_agrees() {
    let config = ModelConfig {
        image_size: 37,
        arch: ArchConfig::Resnet(ResNetConfig {
            widths: vec![4, 6, 8],
            blocks: 2,
            dropout: 0.2,
        }),
    };
    matches_tract(config, 2, 2);
}

#[test]
fn efficientnet_with_either_localization_head_exports_and_tract_agrees() {
    for (size, head, stride) in [(67, false, 16), (64, true, 16), (75, true, 8)] {
        let config = ModelConfig {
            image_size: size,
            arch: ArchConfig::EfficientNetLite0(EfficientNetConfig {
                localization_head: head,
                localization_stride: stride,
                ..EfficientNetConfig::default()
            }),
        };
        matches_tract(config, 2, 3);
    }
}

#[test]
fn out_of_range_options_are_refused_by_name() {
    let model = Model::new(&ModelConfig::seed(16), 1, &Device::Cpu).unwrap();
    let base = OnnxOptions {
        standardize: None,
        calibration: None,
        threshold: 0.5,
        metadata: vec![],
        doc: String::new(),
    };
    for (options, needle) in [
        (
            OnnxOptions {
                threshold: 1.5,
                ..base.clone()
            },
            "threshold",
        ),
        (
            OnnxOptions {
                standardize: Some((0.5, 0.0)),
                ..base.clone()
            },
            "std",
        ),
        (
            OnnxOptions {
                calibration: Some((-1.0, 0.0)),
                ..base.clone()
            },
            "slope",
        ),
    ] {
        let e = export(&model.net, &options).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    assert!(export(&model.net, &base).is_ok());
}
