//! `fracture calibrate`: fit a model's probability calibration and operating threshold on
//! labelled validation images and write the model with them.

use std::path::PathBuf;

use anyhow::Context;
use fracture_infer::data::{FolderDataset, LoadOptions, Split};
use fracture_infer::eval::ThresholdRule;
use fracture_infer::{Tta, predict_dataset, truth};

use crate::commands::{fmt_ci, fmt_opt};

/// Arguments of `fracture calibrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The trained model: a run folder (its model.safetensors) or a weight file. Without it, the
    /// model built into the binary.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Labelled images: a dataset root (its `--split`) or a folder whose children are the class
    /// folders. Use the validation images the model was selected on, never a test set.
    #[arg(long)]
    data: PathBuf,
    /// The split to fit on when `--data` is a dataset root.
    #[arg(long, default_value = "val")]
    split: Split,
    /// The sensitivity the stored threshold must reach on these images.
    #[arg(long, default_value_t = fracture_infer::record::DEFAULT_TARGET_SENSITIVITY)]
    target_sensitivity: f64,
    /// The model file to write (the weights unchanged, in the precision they were stored in).
    #[arg(long)]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: crate::commands::DeviceArgs,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if !(args.target_sensitivity > 0.0 && args.target_sensitivity <= 1.0) {
        anyhow::bail!(
            "--target-sensitivity {} must lie in (0, 1]",
            args.target_sensitivity
        );
    }
    let device = args.device.open()?;
    let mut model = crate::commands::load_model(args.model.as_deref(), &device, super::PrecisionArg::Fp32)?;
    let (items, _, skipped) = crate::commands::eval::labelled_images(&args.data, args.split)?;
    for s in &skipped {
        eprintln!("warning: skipped {s}");
    }
    let dataset = FolderDataset::load(&items, model.preprocess(), &LoadOptions::default())
        .context("cannot load the images")?;
    for s in dataset.skipped() {
        eprintln!("warning: skipped {s}");
    }
    // The network's own probabilities: any calibration the file already has is fitted anew.
    let raw = predict_dataset(&model.model.net, &dataset, args.batch_size, Tta::Off, &device)?;
    let actual = truth(&dataset);
    let rule = ThresholdRule::TargetSensitivity {
        target: args.target_sensitivity,
    };
    let op = fracture_infer::calibrate::operating_point(&raw, &actual, rule)
        .context("cannot choose the operating point")?;
    let Some(cal) = op.calibration else {
        anyhow::bail!(
            "no increasing calibration fits these {} images ({} fractured): too few of a class, or \
             the model ranks them backwards",
            actual.len(),
            actual.iter().filter(|&&a| a).count()
        );
    };
    let dtype = fracture_infer::model::Model::stored_dtype(&model.path)
        .unwrap_or(fracture_infer::candle_core::DType::F16);
    model.meta.calibration = Some(cal);
    model.meta.threshold = op.threshold;
    model.meta.threshold_rule = Some(rule);
    model.meta.operating_point = Some(op.report.clone());
    model.meta.threshold_stability = op.stability;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    model
        .save_as(&args.out, dtype)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "calibrated on {} images ({} fractured): P = sigmoid({:.4} · logit + {:.4})",
        cal.images, cal.positives, cal.platt.a, cal.platt.b
    );
    println!(
        "  ECE (10 bins)      {} uncalibrated, {} calibrated (cross-fitted over {} folds)",
        fmt_opt(cal.ece_uncalibrated),
        fmt_opt(cal.ece_cross_fitted),
        fracture_infer::calibrate::CALIBRATION_FOLDS
    );
    if let Some(s) = op.stability {
        println!(
            "  threshold          {:.4} (the rule's cut {:.4}; its bootstrap interval {}); sensitivity ≥ {} holds in {:.0}% of resamples",
            s.threshold,
            s.point,
            fmt_ci(s.interval),
            s.target,
            100.0 * s.holds_in
        );
    }
    let r = &op.report;
    println!(
        "  sensitivity        {}  {}",
        fmt_opt(r.sensitivity),
        fmt_ci(r.ci95.sensitivity)
    );
    println!(
        "  specificity        {}  {}",
        fmt_opt(r.specificity),
        fmt_ci(r.ci95.specificity)
    );
    println!("wrote {} ({dtype:?} weights)", args.out.display());
    Ok(())
}
