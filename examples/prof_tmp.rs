#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]
use fracture_train::candle_core::{Device, Tensor, Var};
use fracture_train::model::kernels::{self, ConvSpec, Kernels};
use std::time::Instant;
fn t<F: FnMut() -> R, R>(name: &str, mut f: F) -> R {
    let mut best = f64::MAX;
    let mut r = None;
    for _ in 0..20 {
        let s = Instant::now();
        r = Some(f());
        best = best.min(s.elapsed().as_secs_f64());
    }
    println!("{name:28} {:8.2} ms", best * 1e3);
    r.unwrap()
}
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if std::env::var_os("ONLY_CONV2").is_some() {
        let dev = Device::Cpu;
        let spec = ConvSpec {
            kernel: 3,
            stride: 1,
            padding: 0,
            relu: true,
        };
        let x = Var::from_tensor(&Tensor::rand(0f32, 1.0, (32, 32, 63, 63), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, (64, 32, 3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, 64, &dev).unwrap()).unwrap();
        for _ in 0..40 {
            let o = kernels::conv2d_relu_pool2x2(&x, &w, &b, spec, Kernels::Fast).unwrap();
            o.sum_all().unwrap().backward().unwrap();
        }
        return;
    }
    if std::env::var_os("ONLY_CONV1").is_some() {
        let dev = Device::Cpu;
        let spec = ConvSpec {
            kernel: 3,
            stride: 1,
            padding: 0,
            relu: true,
        };
        let x = Tensor::rand(0f32, 1.0, (32, 1, 128, 128), &dev).unwrap();
        let w1 = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, (32, 1, 3, 3), &dev).unwrap()).unwrap();
        let b1 = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, 32, &dev).unwrap()).unwrap();
        for _ in 0..100 {
            let o = kernels::conv2d_relu_pool2x2(&x, &w1, &b1, spec, Kernels::Fast).unwrap();
            if std::env::var_os("WITH_BWD").is_some() {
                o.sum_all().unwrap().backward().unwrap();
            }
        }
        return;
    }
    let size: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(128);
    let batch: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let dev = Device::Cpu;
    let k = Kernels::Fast;
    let spec = ConvSpec {
        kernel: 3,
        stride: 1,
        padding: 0,
        relu: true,
    };
    let x = Tensor::rand(0f32, 1.0, (batch, 1, size, size), &dev).unwrap();
    let w1 = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, (32, 1, 3, 3), &dev).unwrap()).unwrap();
    let b1 = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, 32, &dev).unwrap()).unwrap();
    let p1 = t("conv1 fused fwd", || {
        kernels::conv2d_relu_pool2x2(&x, &w1, &b1, spec, k).unwrap()
    });
    t("conv1 fused fwd+bwd", || {
        let o = kernels::conv2d_relu_pool2x2(&x, &w1, &b1, spec, k).unwrap();
        o.sum_all().unwrap().backward().unwrap()
    });
    let w2 = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, (64, 32, 3, 3), &dev).unwrap()).unwrap();
    let b2 = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, 64, &dev).unwrap()).unwrap();
    let p1v = Var::from_tensor(&p1).unwrap();
    let p2 = t("conv2 fused fwd", || {
        kernels::conv2d_relu_pool2x2(&p1v, &w2, &b2, spec, k).unwrap()
    });
    t("conv2 fused fwd+bwd", || {
        let o = kernels::conv2d_relu_pool2x2(&p1v, &w2, &b2, spec, k).unwrap();
        o.sum_all().unwrap().backward().unwrap()
    });
    let f = p2.flatten_from(1).unwrap();
    let fv = Var::from_tensor(&f).unwrap();
    let n = f.dim(1).unwrap();
    let wf = Var::from_tensor(&Tensor::rand(-0.01f32, 0.01, (128, n), &dev).unwrap()).unwrap();
    let bf = Var::from_tensor(&Tensor::rand(-0.01f32, 0.01, 128, &dev).unwrap()).unwrap();
    t("fc1 fwd", || kernels::linear(&fv, &wf, &bf, true, k).unwrap());
    t("fc1 fwd+bwd", || {
        let o = kernels::linear(&fv, &wf, &bf, true, k).unwrap();
        o.sum_all().unwrap().backward().unwrap()
    });
    let fc = Tensor::rand(0f32, 1.0, (32, n), &dev).unwrap();
    t("fc1 fwd+bwd (input no grad)", || {
        let o = kernels::linear(&fc, &wf, &bf, true, k).unwrap();
        o.sum_all().unwrap().backward().unwrap()
    });
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    t("dropout flatten fwd", || {
        kernels::dropout(&fv, 0.5, &mut rng, k).unwrap()
    });
    t("dropout fwd+bwd", || {
        let o = kernels::dropout(&fv, 0.5, &mut rng, k).unwrap();
        o.sum_all().unwrap().backward().unwrap()
    });
    t("mask bytes (fill)", || {
        let mut b = vec![0u8; 2 * n * 32];
        rand::RngCore::fill_bytes(&mut rng, &mut b);
        b
    });
    t("zeros_like + add", || {
        let z = fv.as_tensor().zeros_like().unwrap();
        (z + fv.as_tensor()).unwrap()
    });
    t("sum_all+backward", || {
        fv.as_tensor().sum_all().unwrap().backward().unwrap()
    });
}
