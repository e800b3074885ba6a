//! What evidence costs: a batch of 16 inputs at 256 px through EfficientNet-Lite0 (the finetune
//! preset's network, with the localization head a `--boxes` run adds), plain inference against
//! inference with each map: the localization head's (`head`, the forward pass alone), HiResCAM on
//! the last feature map (`last`) and on the last stride-16 stage (`stride16`, a backward pass
//! through five blocks). The target is a ratio below 1.5 against `plain` in the same run.
//!
//! `cargo bench -p fracture-benches --bench evidence`. The cost does not depend on the weights, so
//! the network is seeded, not trained.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, ModuleT, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fracture_model::{ArchConfig, CamLayer, CamMethod, Model, ModelConfig};

#[global_allocator]
static ALLOCATOR: fracture_alloc::MiMalloc = fracture_alloc::MiMalloc;

const BATCH: usize = 16;
const SIZE: usize = 256;

fn evidence(c: &mut Criterion) {
    let mut config = ModelConfig::efficientnet_lite0(SIZE);
    if let ArchConfig::EfficientNetLite0(e) = &mut config.arch {
        e.localization_head = true;
    }
    let model = Model::new(&config, 7, &Device::Cpu).unwrap();
    let x = Tensor::rand(-1f32, 1f32, (BATCH, 1, SIZE, SIZE), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("evidence");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("plain", |b| {
        b.iter(|| {
            model
                .net
                .forward_t(black_box(&x), false)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
    });
    for (name, layer) in [
        ("head", CamLayer::Head),
        ("last", CamLayer::Last),
        ("stride16", CamLayer::Stride16),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                model
                    .net
                    .grad_cams_at(black_box(&x), CamMethod::HiResCam, layer)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, evidence);
criterion_main!(benches);
