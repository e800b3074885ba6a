//! `fracture eval`: a trained model on labelled images: table, report.json, predictions.csv, charts.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fracture_infer::TrainedModel;
use fracture_infer::data::{DatasetLayout, Item, LoadOptions, Split, discover_labelled_images};
use fracture_infer::eval::ThresholdRule;
use fracture_infer::model::CamMethod;
use fracture_infer::outputs::{EvalSource, ThresholdChoice, evaluate_items, write_evaluation};

use crate::commands::{fmt_ci, fmt_opt};

/// Arguments of `fracture eval`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    model: crate::commands::ModelArgs,
    /// Labelled images: a dataset root (`<DATA>/<split>/<class>/…`, see `--split`) or a folder whose
    /// children are the class folders.
    #[arg(long)]
    data: PathBuf,
    /// The split to evaluate when `--data` is a dataset root.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Operating threshold on P(fractured) [default: the one stored with the model, chosen on its
    /// validation images during training].
    #[arg(long, conflicts_with = "target_sensitivity")]
    threshold: Option<f64>,
    /// Choose the threshold on these very images to reach this sensitivity (optimistic: the report is
    /// then no longer an independent test).
    #[arg(long)]
    target_sensitivity: Option<f64>,
    /// Folder for report.json, predictions.csv and the charts [default: eval-<split> beside the
    /// model given with --model, or in the current folder for the built-in model].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Test-time augmentation: average P(fractured) over the image and the flips the model was trained
    /// with (its three flips, or only its mirror image for a model trained without vertical flips).
    #[arg(long)]
    tta: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: crate::commands::DeviceArgs,
    /// Radiologists' fracture boxes (a CSV with `id,x,y,w,h` columns, `id` the file name without
    /// extension, boxes in the image's own pixels; the format of FracAtlas's boxes): adds the
    /// pointing game (the map's peak inside a box enlarged by 5% of the image side) and the mean IoU
    /// of the evidence box with the nearest annotated box, with 95% intervals, over the fractured
    /// images that have boxes; writes localization.json and contact_sheet.png (the first 24).
    #[arg(long, value_name = "FILE.csv")]
    boxes: Option<PathBuf>,
    /// The map the evidence is taken on: `head`, the localization head of a model trained with
    /// boxes (the default for such a model); `last`, the activation map on the last feature map
    /// (the default otherwise); `stride16`, for EfficientNet-Lite0 the activation map on the twice
    /// finer output of its last stride-16 stage.
    #[arg(long, value_enum)]
    cam_layer: Option<fracture_infer::model::CamLayer>,
    /// How channel evidence is combined into the map (with `--boxes`): HiResCAM (gradient times
    /// activation per position, the default) or Grad-CAM (channels weighted by their mean gradient).
    #[arg(long, value_enum, default_value_t = CamMethod::HiResCam)]
    cam_method: CamMethod,
    /// Subgroups: a CSV file with an `id` column (file names without extension) and one 0/1
    /// column per group (the layout of `fracatlas-meta.csv`; other columns are ignored). Reports
    /// every group's ROC-AUC, sensitivity and specificity at the threshold with 95% intervals
    /// (groups with fewer than 5 cases of a class say so), in the table, report.json (`groups`) and
    /// groups.png.
    #[arg(long, value_name = "FILE.csv")]
    groups: Option<PathBuf>,
    /// The acquisition-shift suite: the evaluation repeated with every image zoomed in (80%, 60% of
    /// the side), padded to 1.5×, at 1/3 resolution, with gamma 0.7 and 1.4, contrast −30% and
    /// +30%, blurred, noisy, re-encoded as JPEG q30 and at a portrait aspect ratio; ΔROC-AUC and the
    /// sensitivity at the stored threshold per shift, in the table, report.json (`shifts`) and
    /// shifts.png. Takes about 12 times as long as the plain evaluation.
    #[arg(long)]
    shifts: bool,
    /// The share of the map's maximum that bounds the evidence box (with `--boxes`).
    #[arg(long, default_value_t = fracture_infer::evidence::EVIDENCE_LEVEL)]
    evidence_level: f32,
}

/// Warns when evaluated images have near duplicates among the model's training images (from the
/// fingerprints stored with the run): such metrics overstate performance on new patients. Returns
/// them (path, hash distance in bits), for the evaluation folder's near-duplicates file.
fn warn_of_leaks(
    model: Option<&std::path::Path>,
    recorded: Option<&str>,
    items: &[fracture_infer::data::Item],
) -> Vec<(PathBuf, u32)> {
    match crate::commands::model_fingerprints(model, recorded) {
        Ok(Some((file, known))) => {
            let files: Vec<std::path::PathBuf> = items.iter().map(|i| i.path.clone()).collect();
            let near = fracture_infer::audit::near_training_images(
                &known,
                &files,
                &fracture_infer::data::DecodeLimits::default(),
            );
            if near.is_empty() {
                eprintln!(
                    "note: none of the {} images is a near duplicate of the model's {} training images ({})",
                    files.len(),
                    known.len(),
                    file
                );
                return near;
            }
            eprintln!(
                "warning: {} of the {} evaluated images have a near duplicate among the model's training \
                 images ({}): these metrics overstate performance on new patients; `fracture audit` lists them",
                near.len(),
                files.len(),
                file
            );
            for (path, d) in near.iter().take(5) {
                eprintln!("  {} (distance {d})", fracture_infer::data::path_shown(path));
            }
            if near.len() > 5 {
                eprintln!(
                    "  … and {} more (all {} are listed in {} of the evaluation folder)",
                    near.len() - 5,
                    near.len(),
                    fracture_infer::audit::NEAR_DUPLICATES_CSV
                );
            }
            near
        }
        Ok(None) => {
            eprintln!(
                "note: the model has no training fingerprints: leakage into these images is not checked"
            );
            Vec::new()
        }
        Err(e) => {
            eprintln!("warning: {e}: leakage into these images is not checked");
            Vec::new()
        }
    }
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let model = args.model.load(&device)?;
    let (items, split, skipped) = labelled_images(&args.data, args.split)?;
    for s in &skipped {
        eprintln!("warning: skipped {s}");
    }
    let near = warn_of_leaks(
        args.model.path(),
        model.meta.training_fingerprints.as_deref(),
        &items,
    );
    let choice = threshold_choice(args);
    let mut evaluation = evaluate_items(
        &model,
        &items,
        choice,
        args.tta,
        args.batch_size,
        &LoadOptions::default(),
    )
    .context("evaluation failed")?;
    for s in &evaluation.skipped {
        eprintln!("warning: skipped {s}");
    }
    if let Some(file) = &args.groups {
        let table = fracture_infer::robustness::read_groups(file).context("cannot read the groups file")?;
        if table.groups.is_empty() {
            bail!(
                "{}: no 0/1 group column (columns: id, {})",
                file.display(),
                table.ignored.join(", ")
            );
        }
        evaluation.robustness.groups = Some(
            fracture_infer::robustness::evaluate_groups(&evaluation.baseline(), &table, file)
                .context("subgroup evaluation failed")?,
        );
    }
    if args.shifts {
        let suite = fracture_infer::data::Shift::suite();
        eprintln!(
            "acquisition shifts: {} evaluations of {} images",
            suite.len(),
            evaluation.items.len()
        );
        let results = fracture_infer::robustness::evaluate_shifts(
            &model,
            &evaluation.baseline(),
            &suite,
            args.batch_size,
            &LoadOptions::default(),
            &mut |done, total| eprintln!("  shift {done}/{total} done"),
        )
        .context("shift evaluation failed")?;
        evaluation.robustness.shifts = Some(results);
    }
    let model_dir = model.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let default_name = format!(
        "eval-{}",
        split.map_or("folder".to_string(), |s| s.name().to_string())
    );
    // Beside a trained model (its run folder); for the built-in model, in the current folder,
    // never next to the repository's `models/`.
    let out = args.out.clone().unwrap_or_else(|| match args.model.path() {
        Some(_) => model_dir.join(&default_name),
        None => PathBuf::from(&default_name),
    });
    let metrics = fracture_infer::RunLayout::new(&model_dir).metrics();
    let source = EvalSource {
        model: &model.path,
        data: &args.data,
        split,
    };
    let mut written = write_evaluation(
        &out,
        &evaluation,
        source,
        metrics.is_file().then_some(metrics.as_path()),
    )
    .context("cannot write the evaluation")?;
    print_table(&evaluation.report, split, args.tta);
    print_calibration(&model);
    if let Some(groups) = &evaluation.robustness.groups {
        print_groups(groups);
    }
    if let Some(shifts) = &evaluation.robustness.shifts {
        print_shifts(shifts, &evaluation.report);
    }
    if let Some(boxes) = &args.boxes {
        let layer = super::cam_layer(args.cam_layer, &model.model.net);
        let method = args.cam_method;
        let cam = (method, layer);
        written.extend(localization(
            &model,
            &items,
            boxes,
            cam,
            args.evidence_level,
            &out,
        )?);
    }
    written.extend(fracture_infer::audit::write_near_duplicates(&out, &near)?);
    println!("wrote:");
    for f in written {
        println!("  {}", f.display());
    }
    Ok(())
}

/// The threshold the report is taken at: `--threshold`, one chosen on these images for
/// `--target-sensitivity` (noted as optimistic), or the model's own.
fn threshold_choice(args: &Args) -> ThresholdChoice {
    match (args.threshold, args.target_sensitivity) {
        (Some(value), _) => ThresholdChoice::Fixed { value },
        (None, Some(target)) => {
            eprintln!("note: choosing the threshold on the evaluated images makes the report optimistic");
            ThresholdChoice::OnTheseImages {
                rule: ThresholdRule::TargetSensitivity { target },
            }
        }
        (None, None) => ThresholdChoice::Stored,
    }
}

/// The labelled images of `data`: a split of a dataset root, or a folder of class folders.
pub(crate) fn labelled_images(
    data: &Path,
    split: Split,
) -> anyhow::Result<(Vec<Item>, Option<Split>, Vec<fracture_infer::data::Skipped>)> {
    match DatasetLayout::discover(data) {
        Ok(layout) => match layout.split(split) {
            Some(items) => Ok((items.to_vec(), Some(split), layout.skipped.clone())),
            None => {
                let present: Vec<&str> = layout.splits.keys().map(|s| s.name()).collect();
                bail!(
                    "{} has no {split} split (it has: {}); pass --split {}",
                    layout.root.display(),
                    present.join(", "),
                    present.last().copied().unwrap_or("val")
                )
            }
        },
        Err(layout_err) => match discover_labelled_images(data) {
            Ok((items, skipped)) => Ok((items, None, skipped)),
            Err(_) => Err(layout_err).context("cannot read the labelled images"),
        },
    }
}

fn print_table(r: &fracture_infer::eval::EvalReport, split: Option<Split>, tta: bool) {
    let what = split.map_or("folder".to_string(), |s| s.name().to_string());
    println!(
        "{what}: {} images, {} fractured; threshold {:.4}{}",
        r.n,
        r.positives,
        r.threshold,
        if tta { "; TTA over the trained flips" } else { "" }
    );
    let rows = [
        ("ROC-AUC", r.roc_auc, fmt_ci(r.ci95.roc_auc)),
        ("PR-AUC (AP)", r.pr_auc, fmt_ci(r.ci95.pr_auc)),
        ("sensitivity", r.sensitivity, fmt_ci(r.ci95.sensitivity)),
        ("specificity", r.specificity, fmt_ci(r.ci95.specificity)),
        ("precision (PPV)", r.precision, String::new()),
        ("NPV", r.npv, String::new()),
        ("F1", r.f1, fmt_ci(r.ci95.f1)),
        ("accuracy", r.accuracy, fmt_ci(r.ci95.accuracy)),
        ("balanced accuracy", r.balanced_accuracy, String::new()),
        ("Brier score", r.brier, String::new()),
        ("ECE (10 bins)", r.ece, String::new()),
    ];
    for (name, value, ci) in rows {
        println!("  {name:<18} {:>6}  {ci}", fmt_opt(value));
    }
    let c = &r.confusion;
    println!(
        "  confusion          TP {}  FN {}  FP {}  TN {}",
        c.tp, c.fn_, c.fp, c.tn
    );
    if r.positives == 0 || r.positives == r.n {
        println!(
            "  n/a: undefined on images of one class only ({}); the others are measured",
            if r.positives == 0 {
                "no fractures"
            } else {
                "fractures only"
            }
        );
    }
}

/// Says whether the probabilities are calibrated, and how the calibration did where it was fitted.
fn print_calibration(model: &TrainedModel) {
    match &model.meta.calibration {
        Some(c) => println!(
            "  probabilities calibrated (Platt a {:.3}, b {:.3}, fitted on {} validation images; \
             cross-fitted ECE there {})",
            c.platt.a,
            c.platt.b,
            c.images,
            fmt_opt(c.ece_cross_fitted)
        ),
        None => println!("  probabilities not calibrated: read them as scores and use the threshold"),
    }
    if let Some(s) = &model.meta.threshold_stability {
        println!(
            "  threshold chosen for sensitivity >= {} on validation; its bootstrap interval there {}",
            s.target,
            fmt_ci(s.interval)
        );
    }
}

fn print_groups(section: &fracture_infer::robustness::GroupsSection) {
    println!(
        "subgroups ({}; {} images in no group):",
        section.file, section.unmatched
    );
    println!(
        "  {:<12} {:>5} {:>4}  {:<22} {:<22} {:<22}",
        "group", "n", "fx", "ROC-AUC", "sensitivity", "specificity"
    );
    let cell = |v: Option<f64>, i: Option<fracture_infer::eval::Interval>| match (v, i) {
        (Some(v), Some(i)) => format!("{v:.3} ({:.3}-{:.3})", i.lower, i.upper),
        (Some(v), None) => format!("{v:.3}"),
        _ => "n/a".to_string(),
    };
    for g in &section.groups {
        println!(
            "  {:<12} {:>5} {:>4}  {:<22} {:<22} {:<22}",
            g.name,
            g.n,
            g.positives,
            cell(g.roc_auc, g.ci95.roc_auc),
            cell(g.sensitivity, g.ci95.sensitivity),
            cell(g.specificity, g.ci95.specificity)
        );
        if let Some(note) = &g.note {
            println!("  {:<12} {note}", "");
        }
    }
}

fn print_shifts(shifts: &[fracture_infer::robustness::ShiftResult], base: &fracture_infer::eval::EvalReport) {
    println!(
        "acquisition shifts (threshold {:.4}; unshifted ROC-AUC {}, sensitivity {}):",
        base.threshold,
        fmt_opt(base.roc_auc),
        fmt_opt(base.sensitivity)
    );
    println!(
        "  {:<20} {:>8} {:>8} {:>12} {:>12} {:>8}",
        "shift", "ROC-AUC", "ΔAUC", "sensitivity", "specificity", "mean P+"
    );
    for s in shifts {
        println!(
            "  {:<20} {:>8} {:>8} {:>12} {:>12} {:>8}",
            s.name,
            fmt_opt(s.roc_auc),
            s.delta_roc_auc.map_or("n/a".into(), |d| format!("{d:+.3}")),
            fmt_opt(s.sensitivity),
            fmt_opt(s.specificity),
            fmt_opt(s.mean_p_fractured)
        );
    }
}

/// Scores the evidence of the fractured images against `boxes`, prints the pointing game and IoU,
/// and writes `localization.json` and `contact_sheet.png` into `out`.
fn localization(
    model: &TrainedModel,
    items: &[Item],
    boxes: &Path,
    (method, layer): (CamMethod, fracture_infer::model::CamLayer),
    level: f32,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    use fracture_infer::localize::{contact_sheet, localize_items, read_boxes};
    if !(level > 0.0 && level <= 1.0) {
        bail!("--evidence-level {level} must lie in (0, 1]");
    }
    let index = read_boxes(boxes).context("cannot read the boxes")?;
    let limits = fracture_infer::data::DecodeLimits::default();
    let found =
        localize_items(model, items, &index, &limits, method, layer, level).context("localization failed")?;
    let r = &found.report;
    println!(
        "localization: {} fractured images with boxes ({} without), map {}, evidence boxes at {:.2} of its maximum",
        r.n, found.without_boxes, found.map, level
    );
    println!(
        "  {:<18} {:>6}  {}",
        "pointing game",
        fmt_opt(r.pointing_game),
        fmt_ci(r.pointing_game_ci)
    );
    println!(
        "  {:<18} {:>6}  {}",
        "mean IoU",
        fmt_opt(r.mean_iou),
        fmt_ci(r.mean_iou_ci)
    );
    let json = out.join("localization.json");
    fracture_fs::write_atomic(&json, serde_json::to_string_pretty(&found)?.as_bytes())
        .with_context(|| format!("cannot write {}", json.display()))?;
    let sheet = out.join("contact_sheet.png");
    let png = contact_sheet(&found, &limits, 24).context("cannot draw the contact sheet")?;
    fracture_fs::write_atomic(&sheet, &png).with_context(|| format!("cannot write {}", sheet.display()))?;
    Ok(vec![json, sheet])
}
