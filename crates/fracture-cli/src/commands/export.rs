//! `fracture export`: a trained model as one compact file (half-precision weights), with its
//! training fingerprints beside it, named after it (`<stem>.fingerprints.bin`) and tied to it by
//! their SHA-256 in the model's metadata.

use std::path::PathBuf;

use anyhow::Context;
use fracture_train::TrainedModel;

/// Arguments of `fracture export`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The trained model: a run folder (its model.safetensors) or a weight file.
    #[arg(long)]
    model: PathBuf,
    /// The file to write (`.safetensors`). The run's training fingerprints, when it has them, are
    /// copied beside it as `<stem>.fingerprints.bin`, their SHA-256 recorded in the model.
    #[arg(long)]
    out: PathBuf,
    /// Keep the weights in single precision (F32) instead of half (F16, half the size).
    #[arg(long)]
    full_precision: bool,
    /// A new operating threshold on P(fractured), in [0, 1], for when the stored one was chosen on
    /// the F32 scores and half precision moves a validation image across it (`cargo xtask
    /// default-model` chooses it again on val with the exported weights). The stored validation
    /// report at the old threshold is dropped.
    #[arg(long)]
    threshold: Option<f64>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let device = fracture_train::candle_core::Device::Cpu;
    let mut model = TrainedModel::load(&args.model, &device).context("cannot load the model")?;
    if let Some(t) = args.threshold {
        if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
            anyhow::bail!("--threshold {t} is not a probability in [0, 1]");
        }
        model.meta.threshold = t;
        model.meta.operating_point = None;
    }
    let dir = args.out.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // The bytes themselves: they are hashed into the model and copied beside it, not parsed.
    let fingerprint_bytes = fracture_train::audit::training_fingerprints_file(
        &args.model,
        model.meta.training_fingerprints.as_deref(),
    )?
    .map(|(_, bytes)| bytes);
    if let Some(bytes) = &fingerprint_bytes {
        model.meta.training_fingerprints = Some(fracture_train::audit::sha256_hex(bytes));
    }
    if args.full_precision {
        model.save(&args.out)?;
    } else {
        model.save_half(&args.out)?;
    }
    let size = std::fs::metadata(&args.out)?.len();
    println!(
        "wrote {} ({:.2} MB, {} weights)",
        args.out.display(),
        size as f64 / 1e6,
        if args.full_precision { "F32" } else { "F16" }
    );
    if let Some(bytes) = fingerprint_bytes {
        let dest = fracture_train::audit::fingerprints_file_for(&args.out);
        fracture_fs::write_atomic(&dest, &bytes)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        println!("wrote {}", dest.display());
    }
    Ok(())
}
