//! Times a network's training step (forward in training mode, BCE, backward, Adam) and inference
//! on random data, the way `../shared/bench/torch_seed_cnn.py` and `torch_effnet_lite.py` time
//! PyTorch, and prints one `RESULT` line per measurement in the same format.
//!
//! ```text
//! cargo run --release -p fracture-benches --example bench_step -- {train|infer} SIZE BATCH ITERS [--reference] [--precision fp32|bf16] [--arch seed|resnet|efficientnet-lite0] [--device cpu|cuda[:N]]
//! ```
//! `--reference` uses candle's own operations instead of our CPU kernels; `--precision bf16` runs the
//! matrix products with BF16 operands (`Kernels::Bf16`, on the backend `FRACTURE_BF16` or the
//! processor picks, printed on stderr); `--arch` picks the network
//! (default `seed`; `--resnet` is short for `--arch resnet`); `--device cuda` runs on a GPU (built
//! with `--features cuda`; our CPU kernels then give way to candle's operations). `cargo xtask bench-compare` runs this
//! beside the PyTorch scripts and prints the ratios.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use anyhow::{Context, bail};
use fracture_train::candle_core::{ModuleT, Tensor};
use fracture_train::config::AdamConfig;
use fracture_train::loss::bce_with_logits;
use fracture_train::model::{Kernels, Model, ModelConfig, Precision};
use fracture_train::optim::Adam;

#[global_allocator]
static ALLOCATOR: fracture_alloc::MiMalloc = fracture_alloc::MiMalloc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    fracture_alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reference = args.iter().any(|a| a == "--reference");
    let arch = match args.iter().position(|a| a == "--arch") {
        Some(i) => args.get(i + 1).context("--arch needs a name")?.clone(),
        None if args.iter().any(|a| a == "--resnet") => "resnet".into(),
        None => "seed".into(),
    };
    let precision = match args.iter().position(|a| a == "--precision") {
        Some(i) => args.get(i + 1).context("--precision needs fp32 or bf16")?.clone(),
        None => "fp32".into(),
    };
    let device = match args.iter().position(|a| a == "--device") {
        Some(i) => args.get(i + 1).context("--device needs cpu or cuda[:N]")?.clone(),
        None => "cpu".into(),
    };
    let pos: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with("--") && **a != arch && **a != precision && **a != device)
        .collect();
    let [mode, size, batch, iters] = pos.as_slice() else {
        bail!(
            "usage: bench_step {{train|infer}} SIZE BATCH ITERS [--reference] [--precision fp32|bf16] [--arch seed|resnet|efficientnet-lite0] [--device cpu|cuda[:N]]"
        );
    };
    let (size, batch, iters): (usize, usize, usize) = (
        size.parse().context("SIZE")?,
        batch.parse().context("BATCH")?,
        iters.parse().context("ITERS")?,
    );
    let dev = device
        .parse::<fracture_model::DeviceChoice>()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .open()?;
    let config = match arch.as_str() {
        "seed" => ModelConfig::seed(size),
        "resnet" => ModelConfig::resnet(size),
        "efficientnet-lite0" => ModelConfig::efficientnet_lite0(size),
        other => bail!("unknown architecture `{other}` (seed, resnet, efficientnet-lite0)"),
    };
    let mut model = Model::new(&config, 0, &dev)?;
    let wanted = match precision.as_str() {
        "fp32" => Precision::Fp32,
        "bf16" => {
            let status = fracture_train::kernels::bf16_status();
            eprintln!("  bf16 products on {} ({})", status.backend, status.reason);
            Precision::Bf16
        }
        other => bail!("unknown precision `{other}` (fp32, bf16)"),
    };
    let kernels = if reference {
        Kernels::Reference
    } else {
        Kernels::Fast
    };
    model
        .net
        .set_kernels(kernels.with_precision(wanted).map_err(anyhow::Error::msg)?);
    let x = Tensor::rand(0f32, 1.0, (batch, 1, size, size), &dev)?;
    let y = Tensor::rand(0f32, 1.0, batch, &dev)?
        .ge(0.5)?
        .to_dtype(fracture_train::candle_core::DType::F32)?;
    let mut adam = Adam::new(model.trainable_vars(), AdamConfig::default())?;
    if mode.as_str() == "infer" {
        // As a loaded model predicts (`TrainedModel` freezes its network): no autograd graph.
        model.freeze()?;
    }
    let mut times = Vec::new();
    let warmup = 2;
    for i in 0..warmup + iters {
        let t = Instant::now();
        match mode.as_str() {
            "train" => {
                model.net.set_dropout_seed(i as u64);
                let loss = bce_with_logits(&model.net.forward_t(&x, true)?, &y, None)?;
                let _ = loss.to_scalar::<f32>()?;
                let t_fwd = t.elapsed();
                let grads = loss.backward()?;
                let t_bwd = t.elapsed();
                adam.step(&grads, 1e-3)?;
                // A GPU runs the step asynchronously: the time is the step's only once it is done.
                dev.synchronize()?;
                if std::env::var_os("FRACTURE_BENCH_SPLIT").is_some() {
                    eprintln!(
                        "  forward {:?}, backward {:?}, adam {:?}",
                        t_fwd,
                        t_bwd - t_fwd,
                        t.elapsed() - t_bwd
                    );
                }
            }
            "infer" => {
                let _ = model.net.forward_t(&x, false)?.to_vec1::<f32>()?;
            }
            other => bail!("unknown mode {other}"),
        }
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let med = median(times.clone());
    eprintln!(
        "  per-iter ms: {}",
        times
            .iter()
            .map(|t| format!("{:.1}", t * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let fw = if reference { "candle-reference" } else { "fracture" };
    println!(
        "RESULT fw={fw} model={arch} precision={precision} device={device} mode={mode} size={size} batch={batch} ms_per_iter={:.3} img_per_s={:.2}",
        med * 1e3,
        batch as f64 / med
    );
    Ok(())
}
