//! `fracture export`: a trained model as one compact file (half-precision weights), with its
//! training fingerprints beside it, named after it (`<stem>.fingerprints.bin`) and tied to it by
//! their SHA-256 in the model's metadata; or as an ONNX graph for other runtimes.

use std::path::PathBuf;

use anyhow::Context;
use fracture_infer::TrainedModel;

/// Arguments of `fracture export`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The trained model: a run folder (its model.safetensors) or a weight file. Without it, the
    /// model built into the binary.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The file to write: `.safetensors` (our format, read by every `fracture` command), or `.onnx`
    /// with `--format onnx`. For safetensors, the run's training fingerprints, when it has them,
    /// are copied beside it as `<stem>.fingerprints.bin`, their SHA-256 recorded in the model.
    #[arg(long)]
    out: PathBuf,
    /// What to write: `safetensors`, or `onnx` (opset 13; input `image` (B, 1, S, S) gray values
    /// in [0, 1], outputs `p_fractured`, `fractured` and, with a localization head, `fracture_map`).
    #[arg(long, value_enum, default_value_t = ExportFormat::Safetensors)]
    format: ExportFormat,
    /// Keep the weights in single precision (F32) instead of half (F16, half the size). ONNX files
    /// always hold F32 weights.
    #[arg(long)]
    full_precision: bool,
    /// A new operating threshold on P(fractured), in [0, 1], for when the stored one was chosen on
    /// the F32 scores and half precision moves a validation image across it (`cargo xtask
    /// default-model` chooses it again on val with the exported weights). The stored validation
    /// report at the old threshold is dropped.
    #[arg(long)]
    threshold: Option<f64>,
}

/// The file formats `fracture export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ExportFormat {
    /// Our safetensors model file.
    Safetensors,
    /// An ONNX model (opset 13) for ONNX Runtime, TensorRT, tract and other runtimes.
    Onnx,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let device = fracture_infer::candle_core::Device::Cpu;
    let mut model = super::load_model(args.model.as_deref(), &device, super::PrecisionArg::Fp32)?;
    if let Some(t) = args.threshold {
        if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
            anyhow::bail!("--threshold {t} is not a probability in [0, 1]");
        }
        model.meta.threshold = t;
        model.meta.operating_point = None;
    }
    let extension = args.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    let expected = match args.format {
        ExportFormat::Safetensors => "safetensors",
        ExportFormat::Onnx => "onnx",
    };
    if !extension.eq_ignore_ascii_case(expected) {
        anyhow::bail!(
            "--out {}: --format {expected} writes a `.{expected}` file (pass --format to match the name)",
            args.out.display()
        );
    }
    let dir = args.out.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if args.format == ExportFormat::Onnx {
        return write_onnx(&model, &args.out);
    }
    // The bytes themselves: they are hashed into the model and copied beside it, not parsed.
    let fingerprint_bytes = match &args.model {
        Some(path) => fracture_infer::audit::training_fingerprints_file(
            path,
            model.meta.training_fingerprints.as_deref(),
        )?
        .map(|(_, bytes)| bytes),
        None => super::bundled_fingerprints(),
    };
    if let Some(bytes) = &fingerprint_bytes {
        model.meta.training_fingerprints = Some(fracture_infer::audit::sha256_hex(bytes));
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
        let dest = fracture_infer::audit::fingerprints_file_for(&args.out);
        fracture_fs::write_atomic(&dest, &bytes)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        println!("wrote {}", dest.display());
    }
    Ok(())
}

/// Writes the ONNX graph of `model` atomically and says what it holds.
fn write_onnx(model: &TrainedModel, out: &std::path::Path) -> anyhow::Result<()> {
    let bytes = model.to_onnx().context("cannot export the model to ONNX")?;
    fracture_fs::write_atomic(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    let size = model.preprocess().size;
    let map = if model.model.net.has_localization_head() {
        ", fracture_map"
    } else {
        ""
    };
    println!(
        "wrote {} ({:.2} MB, ONNX opset {}): input `image` (B, 1, {size}, {size}) gray values / 255; outputs p_fractured, fractured (threshold {:.4}){map}",
        out.display(),
        bytes.len() as f64 / 1e6,
        fracture_infer::model::onnx::OPSET,
        model.meta.threshold,
    );
    Ok(())
}
