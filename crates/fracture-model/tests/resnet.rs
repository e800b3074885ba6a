//! The residual architecture: shapes, gradients (with batch statistics), both kernel choices,
//! running statistics in weight files, and a short fit.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

mod common;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use common::input;
use fracture_model::{
    ArchConfig, CamMethod, FractureNet, Kernels, Model, ModelConfig, ResNetConfig, seeded_var_builder,
};

fn tiny(image_size: usize, dropout: f32) -> ModelConfig {
    ModelConfig {
        image_size,
        arch: ArchConfig::Resnet(ResNetConfig {
            widths: vec![4, 6, 8],
            blocks: 1,
            dropout,
        }),
    }
}

/// Moves every batch-norm scale away from its initial value (1, or 0 for the last of a block), so
/// that no branch of the network has a trivially zero gradient.
fn spread_bn_scales(vars: &[(String, Var)]) {
    for (i, (name, var)) in vars.iter().enumerate() {
        if name.ends_with("bn1.weight") || name.ends_with("bn2.weight") || name.ends_with("bn.weight") {
            let n = var.elem_count();
            let v: Vec<f64> = (0..n).map(|k| 0.6 + 0.1 * ((k + i) % 5) as f64).collect();
            let t = Tensor::from_vec(v, n, var.device()).unwrap();
            var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
        }
    }
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

#[test]
fn logits_have_shape_b_and_running_stats_are_not_trainable() {
    for (size, batch) in [(16, 1), (32, 3), (45, 2), (64, 2)] {
        let model = Model::new(&tiny(size, 0.2), 1, &Device::Cpu).unwrap();
        for train in [false, true] {
            let logits = model
                .net
                .forward_t(&input(batch, size, 2, DType::F32), train)
                .unwrap();
            assert_eq!(logits.dims(), &[batch], "size {size}");
        }
    }
    assert!(Model::new(&tiny(15, 0.0), 1, &Device::Cpu).is_err(), "too small");
    let model = Model::new(&ModelConfig::resnet(256), 0, &Device::Cpu).unwrap();
    let all = model.named_vars();
    let trainable = model.trainable_vars();
    let stats: Vec<&String> = all
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".running_mean") || n.ends_with(".running_var"))
        .collect();
    // Stem + 4 stages × 2 + 3 shortcuts = 12 batch norms, two statistics each.
    assert_eq!(stats.len(), 24);
    assert_eq!(trainable.len() + stats.len(), all.len());
    assert!(trainable.iter().all(|(n, _)| !n.contains("running_")));
    // Per stage: two 3×3 convolutions with bias, a 1×1 shortcut (stages 2-4) and their batch-norm
    // scales and shifts; plus the stem and the head.
    let conv = |cin: usize, cout: usize, k: usize| cin * cout * k * k + cout;
    let stem = conv(1, 24, 3) + 2 * 24;
    let stage = |cin: usize, c: usize, down: bool| {
        conv(cin, c, 3) + conv(c, c, 3) + 4 * c + if down { conv(cin, c, 1) + 2 * c } else { 0 }
    };
    let expected =
        stem + stage(24, 24, false) + stage(24, 48, true) + stage(48, 96, true) + stage(96, 192, true) + 193;
    assert_eq!(model.param_count(), expected);
    assert_eq!(expected, 691_393);
}

/// Central finite differences in f64 through every layer, in training mode (batch statistics), with
/// every batch-norm scale moved away from its initial value so no branch is trivially zero.
#[test]
fn backward_matches_finite_differences_with_batch_statistics() {
    let dev = Device::Cpu;
    let cfg = tiny(16, 0.0);
    let varmap = VarMap::new();
    let net = FractureNet::new(&cfg, seeded_var_builder(&varmap, 5, DType::F64, &dev)).unwrap();
    let vars = sorted_vars(&varmap);
    spread_bn_scales(&vars);
    let x = input(4, 16, 3, DType::F64);
    let r = Tensor::new(&[0.7f64, -1.3, 0.4, 1.1], &dev).unwrap();
    let loss = |net: &FractureNet| -> Tensor {
        (net.forward_t(&x, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&net).backward().unwrap();
    let params: Vec<(String, Var)> = vars
        .into_iter()
        .filter(|(n, _)| !n.contains("running_"))
        .collect();
    let checked = common::assert_backward_matches_finite_differences(
        &params,
        &grads,
        || loss(&net).to_scalar::<f64>().unwrap(),
        6,
    );
    assert!(checked >= 80, "checked {checked} elements");
}

/// Our kernels and candle's own operations give the same logits and gradients for the whole network.
#[test]
fn fast_and_reference_kernels_agree() {
    let dev = Device::Cpu;
    let mut model = Model::new(&tiny(37, 0.0), 3, &dev).unwrap();
    spread_bn_scales(&model.named_vars());
    let x = input(3, 37, 9, DType::F32);
    let mut run = |k: Kernels| {
        model.net.set_kernels(k);
        let logits = model.net.forward_t(&x, true).unwrap();
        let grads = logits.sum_all().unwrap().backward().unwrap();
        let g: Vec<Vec<f32>> = model
            .trainable_vars()
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (logits.to_vec1::<f32>().unwrap(), g)
    };
    let (fast, gf) = run(Kernels::Fast);
    let (reference, gr) = run(Kernels::Reference);
    for (a, b) in fast.iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "logit {a} vs {b}");
    }
    // Relative to the largest gradient anywhere: a convolution bias followed by batch normalization
    // has a gradient of exactly zero in exact arithmetic and of rounding noise in practice.
    let global = gr.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in gf.iter().zip(&gr) {
        let scale = b.iter().fold(1e-2 * global, |m, v| m.max(v.abs()));
        for (u, v) in a.iter().zip(b) {
            assert!(
                (u - v).abs() <= 1e-4 * scale,
                "gradient {u} vs {v} (scale {scale})"
            );
        }
    }
}

/// Training mode moves the running statistics; a saved and reloaded model carries them, so its
/// inference-mode logits are identical.
#[test]
fn running_statistics_are_updated_and_saved() {
    let dev = Device::Cpu;
    let model = Model::new(&tiny(32, 0.2), 4, &dev).unwrap();
    let x = input(4, 32, 1, DType::F32);
    let before = model.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap();
    for _ in 0..3 {
        model.net.forward_t(&x, true).unwrap();
    }
    let after = model.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(before, after, "running statistics moved");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resnet-roundtrip.safetensors");
    model.save(&path, &BTreeMap::new()).unwrap();
    let loaded = Model::load(&path, &dev).unwrap();
    assert_eq!(loaded.config(), model.config());
    let reloaded = loaded.net.forward_t(&x, false).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(after, reloaded);
}

/// A seeded short fit on a separable toy task lowers the loss, and the activation map of a
/// positive lies on its evidence (a bright patch in the top-left quarter).
#[test]
fn a_short_fit_learns_and_the_map_points_at_the_evidence() {
    let dev = Device::Cpu;
    // 64 px through three stages leaves a 4 × 4 map: coarse, but enough to tell the quarters apart.
    let size = 64usize;
    let model = Model::new(&tiny(size, 0.0), 7, &dev).unwrap();
    let image = |i: usize, patch: Option<(usize, usize)>| common::patch_image(size, i, patch, 10);
    let mut data = Vec::new();
    let mut targets = Vec::new();
    for i in 0..32 {
        let positive = i % 2 == 0;
        data.extend(image(i, positive.then_some((2 + i % 18, 2 + (i * 5) % 18))));
        targets.push(if positive { 1f32 } else { 0.0 });
    }
    let x = Tensor::from_vec(data, (32, 1, size, size), &dev).unwrap();
    let y = Tensor::from_vec(targets, 32, &dev).unwrap();
    let bce = |logits: &Tensor| common::bce(logits, &y);
    let vars: Vec<Var> = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let params = candle_nn::ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vars, params).unwrap();
    let initial = bce(&model.net.forward_t(&x, false).unwrap())
        .to_scalar::<f32>()
        .unwrap();
    for _ in 0..120 {
        let loss = bce(&model.net.forward_t(&x, true).unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let last = bce(&model.net.forward_t(&x, false).unwrap())
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        last.is_finite() && last < 0.3 * initial,
        "loss {initial} -> {last}"
    );

    let probe = Tensor::from_vec(image(999, Some((8, 8))), (1, 1, size, size), &dev).unwrap();
    let cam = model.net.grad_cam(&probe, CamMethod::HiResCam).unwrap();
    assert!(cam.logit > 0.0, "called fractured (logit {})", cam.logit);
    let up = cam.upsample(size);
    // A quarter of the mass would be no localisation at all; the 4 × 4 map blurs the rest.
    let mass = common::corner_mass(&up, size, size / 2);
    assert!(mass > 0.5, "{mass:.2} of the map on the patch's quarter");
    let peak = (0..cam.map.len())
        .max_by(|&a, &b| cam.map[a].total_cmp(&cam.map[b]))
        .unwrap();
    let (py, px) = (peak / cam.width, peak % cam.width);
    assert!(
        py < cam.height / 2 && px < cam.width / 2,
        "peak at feature ({py}, {px})"
    );
}
