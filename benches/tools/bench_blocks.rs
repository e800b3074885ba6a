//! Times each inverted bottleneck of EfficientNet-Lite0 as the training step runs it (the fused
//! op, forward with batch statistics and backward), at the input size and batch given, and prints
//! milliseconds per block, so the expensive stages are visible. With `--infer` it times the
//! forward pass as inference runs it instead (the block prepared once with fixed statistics,
//! `FrozenMbConv`, no input tracked, so nothing is kept for a backward pass, on the kernels' pool); `--bf16` gives the products BF16 operands, as `--precision bf16` does;
//! `--block 2.1` times that block alone (stage 2, first block).
//!
//! ```text
//! cargo run --release -p fracture-benches --example bench_blocks -- [SIZE] [BATCH] [ITERS] [--reference] [--infer] [--bf16] [--block S.R]
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use anyhow::Context;
use fracture_kernels::{self as kernels, Kernels, MbConvSpec};
use fracture_train::candle_core::{Device, Tensor, Var};

#[global_allocator]
static ALLOCATOR: fracture_alloc::MiMalloc = fracture_alloc::MiMalloc;

// EfficientNet-Lite0's stages: (kernel, first stride, expansion, channels, blocks).
use fracture_model::{LITE0_STAGES as STAGES, STEM_CHANNELS};

fn main() -> anyhow::Result<()> {
    // As bench_step and training run: freed memory stays mapped, so no block pays page faults.
    fracture_alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let kernels = if flag("--reference") {
        Kernels::Reference
    } else if flag("--bf16") {
        Kernels::Bf16
    } else {
        Kernels::Fast
    };
    let infer = flag("--infer");
    // `--block 2.1`: that block alone (stage 2, first block).
    let only = args
        .iter()
        .position(|a| a == "--block")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let nums: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--block"))
        .map(|(_, a)| a)
        .map(|a| a.parse().context("SIZE, BATCH and ITERS are numbers"))
        .collect::<anyhow::Result<_>>()?;
    let (size, batch, iters) = (
        nums.first().copied().unwrap_or(224),
        nums.get(1).copied().unwrap_or(32),
        nums.get(2).copied().unwrap_or(3),
    );
    let dev = Device::Cpu;
    let (mut side, mut cin) = (size.div_ceil(2), STEM_CHANNELS);
    let mut total = (0.0, 0.0);
    if infer {
        println!("block  in            out  k s  forward ms  (inference)");
    } else {
        println!("block  in            out  k s  forward ms  backward ms");
    }
    for (kernel, stride, expansion, cout, repeats) in STAGES {
        for r in 0..repeats {
            let s = if r == 0 { stride } else { 1 };
            let spec = MbConvSpec {
                cin,
                mid: cin * expansion,
                cout,
                kernel,
                stride: s,
                expand: expansion != 1,
                eps: 1e-3,
            };
            let name = format!(
                "{}.{}",
                STAGES.iter().position(|st| st.3 == cout).unwrap_or(0) + 1,
                r + 1
            );
            let out = side.div_ceil(s);
            if only.is_some_and(|o| o != name) {
                (side, cin) = (out, cout);
                continue;
            }
            let x = Var::from_tensor(&Tensor::rand(0f32, 1.0, (batch, cin, side, side), &dev)?)?;
            let lay = spec.layout();
            let p = Var::from_tensor(&Tensor::rand(0.5f32, 1.5, lay.len, &dev)?)?;
            // Inference: plain tensors (nothing tracked) and fixed statistics (mean 0, variance 1).
            let running = vec![(vec![0.0f32; spec.mid], vec![1.0f32; spec.mid]); 2]
                .into_iter()
                .chain([(vec![0.0f32; cout], vec![1.0f32; cout])])
                .skip(usize::from(!spec.expand))
                .collect::<Vec<_>>();
            let xi = x.as_tensor().detach();
            // As the inference net runs a block: prepared once, on the pool.
            let frozen = kernels::FrozenMbConv::new(p.as_tensor(), spec, running)?;
            let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
            for i in 0..iters + 1 {
                let t = Instant::now();
                if infer {
                    let y = kernels::on_pool(|| kernels::mbconv_frozen(&xi, &frozen, kernels))?;
                    drop(y);
                    if i > 0 {
                        fwd.push(t.elapsed().as_secs_f64());
                        bwd.push(0.0);
                    }
                    continue;
                }
                let (y, _) = kernels::mbconv(x.as_tensor(), p.as_tensor(), spec, None, kernels)?;
                let t_f = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let g = y.sum_all()?.backward()?;
                drop(g);
                let t_b = t.elapsed().as_secs_f64();
                if i > 0 {
                    fwd.push(t_f);
                    bwd.push(t_b);
                }
            }
            fwd.sort_by(f64::total_cmp);
            bwd.sort_by(f64::total_cmp);
            let (f, b) = (fwd[fwd.len() / 2] * 1e3, bwd[bwd.len() / 2] * 1e3);
            total = (total.0 + f, total.1 + b);
            println!(
                "{name:>5}  {cin:>4}×{side:<4} → {cout:>4}×{out:<4} {kernel} {s}  {f:>10.1}  {}",
                if infer {
                    String::new()
                } else {
                    format!("{b:>11.1}")
                }
            );
            side = out;
            cin = cout;
        }
    }
    if infer {
        println!("all blocks: forward {:.1} ms (inference)", total.0);
    } else {
        println!(
            "all blocks: forward {:.1} ms, backward {:.1} ms",
            total.0, total.1
        );
    }
    Ok(())
}
