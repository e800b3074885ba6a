//! The whole seed network on our kernels and on candle's own operations: logits and every
//! parameter's gradient within 1e-4 (relative to the largest magnitude).

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{DType, Device, ModuleT, Tensor};
use fracture_model::{ArchConfig, Kernels, Model, ModelConfig, SeedConfig};

/// max |a − b| ≤ 1e-4 · max(1, max |b|).
fn close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what} shapes");
    let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = bv.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = av.iter().zip(&bv).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max difference {diff} at scale {scale}"
    );
}

/// The whole seed network, forward and backward, on both kernel choices.
#[test]
fn the_network_agrees_on_both_kernel_choices() {
    for size in [32usize, 37] {
        let cfg = ModelConfig {
            image_size: size,
            arch: ArchConfig::Seed(SeedConfig {
                conv1_channels: 8,
                conv2_channels: 12,
                dense_units: 16,
                ..SeedConfig::default()
            }),
        };
        let mut logits = Vec::new();
        let mut grads = Vec::new();
        for k in [Kernels::Fast, Kernels::Reference] {
            let mut model = Model::new(&cfg, 7, &Device::Cpu).unwrap();
            model.net.set_kernels(k);
            model.net.set_dropout_seed(3);
            let x = common::input(3, size, 11, DType::F32);
            let out = model.net.forward_t(&x, true).unwrap();
            let g = out.sum_all().unwrap().backward().unwrap();
            grads.push(
                model
                    .named_vars()
                    .into_iter()
                    .map(|(n, v)| (n, g.get(&v).unwrap().clone()))
                    .collect::<Vec<_>>(),
            );
            logits.push(out);
        }
        close(&logits[0], &logits[1], "logits");
        for ((name, a), (_, b)) in grads[0].iter().zip(&grads[1]) {
            close(a, b, name);
        }
    }
}
