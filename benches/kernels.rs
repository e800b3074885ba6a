//! Criterion benchmarks of the seed CNN's CPU kernels (one per layer, forward and forward+backward,
//! throughput in FLOP/s), a full training step and inference at 128 and 224 px, each beside candle's
//! own operations where that finishes in reasonable time; and EfficientNet-Lite0's depthwise
//! convolutions (`cargo bench -p fracture-benches --bench kernels -- depthwise`).
//!
//! `cargo bench -p fracture-benches --bench kernels`. Throughputs are printed as `elem/s`, where one
//! element is one floating-point operation (a multiply-add counts two): `Gelem/s` reads as GFLOP/s.
#![allow(clippy::print_stderr, clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fracture_kernels::{self as kernels, ConvSpec, Kernels};
use fracture_model::{Model, ModelConfig};
use fracture_train::config::AdamConfig;
use fracture_train::loss::bce_with_logits;
use fracture_train::optim::Adam;

#[global_allocator]
static ALLOCATOR: fracture_alloc::MiMalloc = fracture_alloc::MiMalloc;

const SEED_CONV: ConvSpec = ConvSpec {
    kernel: 3,
    stride: 1,
    padding: 0,
    relu: true,
};

fn var(shape: &[usize], scale: f32) -> Var {
    Var::from_tensor(&Tensor::rand(-scale, scale, shape, &Device::Cpu).unwrap()).unwrap()
}

/// FLOPs of a valid 3×3 convolution (2 per multiply-add).
fn conv_flops(b: usize, cin: usize, cout: usize, h: usize) -> u64 {
    let o = h - 2;
    (2 * b * cout * cin * 9 * o * o) as u64
}

fn layers(c: &mut Criterion) {
    fracture_alloc::keep_freed_memory();
    let mut group = c.benchmark_group("kernels_128px_batch32");
    group.sample_size(10).measurement_time(Duration::from_secs(4));
    let (b, s) = (32usize, 128usize);
    let x = Tensor::rand(0f32, 1.0, (b, 1, s, s), &Device::Cpu).unwrap();
    let (w1, b1) = (var(&[32, 1, 3, 3], 0.3), var(&[32], 0.1));
    let p1 = Var::from_tensor(&kernels::conv2d_relu_pool2x2(&x, &w1, &b1, SEED_CONV, Kernels::Fast).unwrap())
        .unwrap();
    let (w2, b2) = (var(&[64, 32, 3, 3], 0.06), var(&[64], 0.1));
    let p2 = kernels::conv2d_relu_pool2x2(&p1, &w2, &b2, SEED_CONV, Kernels::Fast).unwrap();
    let f = Var::from_tensor(&p2.flatten_from(1).unwrap()).unwrap();
    let n = f.dim(1).unwrap();
    let (wf, bf) = (var(&[128, n], 0.004), var(&[128], 0.01));

    let conv1 = conv_flops(b, 1, 32, s);
    group.throughput(Throughput::Elements(conv1));
    group.bench_function("conv1+relu+pool forward", |bench| {
        bench
            .iter(|| kernels::conv2d_relu_pool2x2(black_box(&x), &w1, &b1, SEED_CONV, Kernels::Fast).unwrap())
    });
    // Backward of a first layer: dW only (2 × forward FLOPs counted for forward + dW).
    group.throughput(Throughput::Elements(2 * conv1));
    group.bench_function("conv1+relu+pool forward+backward", |bench| {
        bench.iter(|| {
            let y = kernels::conv2d_relu_pool2x2(&x, &w1, &b1, SEED_CONV, Kernels::Fast).unwrap();
            y.sum_all().unwrap().backward().unwrap()
        })
    });
    let conv2 = conv_flops(b, 32, 64, 63);
    group.throughput(Throughput::Elements(conv2));
    group.bench_function("conv2+relu+pool forward", |bench| {
        bench.iter(|| {
            kernels::conv2d_relu_pool2x2(black_box(&p1), &w2, &b2, SEED_CONV, Kernels::Fast).unwrap()
        })
    });
    group.throughput(Throughput::Elements(3 * conv2));
    group.bench_function("conv2+relu+pool forward+backward", |bench| {
        bench.iter(|| {
            let y = kernels::conv2d_relu_pool2x2(&p1, &w2, &b2, SEED_CONV, Kernels::Fast).unwrap();
            y.sum_all().unwrap().backward().unwrap()
        })
    });
    let dense = (2 * b * n * 128) as u64;
    group.throughput(Throughput::Elements(dense));
    group.bench_function("dense+relu forward", |bench| {
        bench.iter(|| kernels::linear(black_box(&f), &wf, &bf, true, Kernels::Fast).unwrap())
    });
    group.throughput(Throughput::Elements(3 * dense));
    group.bench_function("dense+relu forward+backward", |bench| {
        bench.iter(|| {
            let y = kernels::linear(&f, &wf, &bf, true, Kernels::Fast).unwrap();
            y.sum_all().unwrap().backward().unwrap()
        })
    });
    let c1 = kernels::conv2d(&x, &w1, &b1, SEED_CONV, Kernels::Fast).unwrap();
    group.throughput(Throughput::Elements(c1.elem_count() as u64));
    group.bench_function("max-pool 2x2 forward (elements)", |bench| {
        bench.iter(|| kernels::max_pool2x2(black_box(&c1), Kernels::Fast).unwrap())
    });
    group.throughput(Throughput::Elements(f.elem_count() as u64));
    group.bench_function("dropout forward+backward (elements)", |bench| {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        bench.iter(|| {
            let y = kernels::dropout(&f, 0.5, &mut rng, Kernels::Fast).unwrap();
            y.sum_all().unwrap().backward().unwrap()
        })
    });
    let params: Vec<(String, Var)> = vec![("w".into(), wf.clone())];
    let mut adam = Adam::new(params, AdamConfig::default()).unwrap();
    let g = (wf.as_tensor() * 1e-3)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    group.throughput(Throughput::Elements(wf.elem_count() as u64));
    group.bench_function("adam step (parameters)", |bench| {
        bench.iter(|| adam.step(&g, 1e-3).unwrap())
    });
    group.finish();
}

fn steps(c: &mut Criterion) {
    fracture_alloc::keep_freed_memory();
    let mut group = c.benchmark_group("seed_cnn_batch32");
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    for size in [128usize, 224] {
        for kernels in [Kernels::Fast, Kernels::Reference] {
            let name = if kernels == Kernels::Fast {
                "fracture"
            } else {
                "candle-reference"
            };
            let mut model = Model::new(&ModelConfig::seed(size), 0, &Device::Cpu).unwrap();
            model.net.set_kernels(kernels);
            let x = Tensor::rand(0f32, 1.0, (32, 1, size, size), &Device::Cpu).unwrap();
            let y = Tensor::rand(0f32, 1.0, 32, &Device::Cpu)
                .unwrap()
                .ge(0.5)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            group.throughput(Throughput::Elements(32));
            group.bench_function(BenchmarkId::new(format!("inference/{name}"), size), |bench| {
                bench.iter(|| {
                    model
                        .net
                        .forward_t(black_box(&x), false)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
            });
            if kernels == Kernels::Reference && size == 224 {
                continue; // a reference train step at 224 px takes several seconds: measured by bench-compare
            }
            let mut adam = Adam::new(model.trainable_vars(), AdamConfig::default()).unwrap();
            let mut step = 0u64;
            group.bench_function(BenchmarkId::new(format!("train-step/{name}"), size), |bench| {
                bench.iter(|| {
                    step += 1;
                    model.net.set_dropout_seed(step);
                    let loss = bce_with_logits(&model.net.forward_t(&x, true).unwrap(), &y, None).unwrap();
                    adam.backward_step(&loss, 1e-3).unwrap();
                })
            });
        }
    }
    group.finish();
}

/// The depthwise convolutions of EfficientNet-Lite0 at 224 px, batch 32, forward only (as inference
/// runs them; plain tensors): the stage at half, quarter, eighth and sixteenth resolution, the last
/// two on the channel-interleaved path.
fn depthwise(c: &mut Criterion) {
    fracture_alloc::keep_freed_memory();
    let mut group = c.benchmark_group("depthwise_lite0_224px_batch32");
    group.sample_size(10).measurement_time(Duration::from_secs(4));
    let b = 32;
    for (ch, side, k, s) in [
        (96, 112, 3, 2),
        (144, 56, 3, 1),
        (240, 28, 5, 1),
        (672, 14, 5, 1),
        (1152, 7, 5, 1),
    ] {
        let x = Tensor::rand(0f32, 1.0, (b, ch, side, side), &Device::Cpu).unwrap();
        let w = Tensor::rand(-0.5f32, 0.5, (ch, 1, k, k), &Device::Cpu).unwrap();
        let spec = kernels::DepthwiseSpec {
            kernel: k,
            stride: s,
            padding: kernels::Padding::same(side, side, k, s),
        };
        let o = side.div_ceil(s);
        group.throughput(Throughput::Elements((2 * b * ch * o * o * k * k) as u64));
        group.bench_function(format!("{ch}x{side}x{side} k{k} s{s} forward"), |bench| {
            bench.iter(|| black_box(kernels::depthwise_conv2d(&x, &w, spec, Kernels::Fast).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, layers, steps, depthwise);
criterion_main!(benches);
