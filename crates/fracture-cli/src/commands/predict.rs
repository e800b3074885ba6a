//! `fracture predict`: P(fractured) and the label for image files and folders.

use std::path::PathBuf;

use anyhow::{Context, bail};
use fracture_train::TrainedModel;
use fracture_train::data::{DecodeLimits, Label, list_image_files, path_text};
use fracture_train::outputs::{CsvColumns, Prediction, predict_files, predictions_csv};

use crate::commands::pick_device;

/// Arguments of `fracture predict`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A trained model: a run folder (its model.safetensors) or a weight file. Without it, the
    /// model built into the binary (`models/fracture-lite0.safetensors`, see `models/README.md`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Image files or folders (searched recursively).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Test-time augmentation: average P(fractured) over the image and the flips the model was trained
    /// with (its three flips, or only its mirror image for a model trained without vertical flips).
    #[arg(long)]
    tta: bool,
    /// Also write, per image, a PNG of the image with the heatmap of the evidence laid over it
    /// (`<DIR>/<name>.heatmap.png`).
    #[arg(long, value_name = "DIR")]
    heatmap: Option<PathBuf>,
    /// Leave out where the evidence lies (the `evidence` of the JSON and the peak and box columns of
    /// the CSV, which cost one more pass through the network's head per image).
    #[arg(long)]
    no_evidence: bool,
    /// The map the evidence is taken on: `head`, the localization head of a model trained with
    /// boxes (the default for such a model); `last`, the activation map on the last feature map
    /// (the default otherwise); `stride16`, for EfficientNet-Lite0 the activation map on the twice
    /// finer output of its last stride-16 stage.
    #[arg(long, value_enum)]
    cam_layer: Option<LayerArg>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Run on the CPU even in a GPU build.
    #[arg(long)]
    cpu: bool,
    /// Predict JPEGs that decode only in part (truncated or damaged; the missing area is gray)
    /// instead of reporting them as unreadable.
    #[arg(long)]
    allow_partial: bool,
    /// Exit with status 0 when at least one image was predicted, even if others could not be read
    /// (by default any unreadable input makes the exit status 1; the readable ones are still
    /// predicted and printed).
    #[arg(long)]
    keep_going: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LayerArg {
    Last,
    Stride16,
    Head,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let device = pick_device(args.cpu)?;
    let model = crate::commands::load_model(args.model.as_deref(), &device)?;
    let mut files = Vec::new();
    let mut unreadable = 0usize;
    for path in &args.paths {
        match list_image_files(path) {
            Ok((found, skipped)) => {
                files.extend(found);
                for s in skipped {
                    eprintln!("warning: skipped {s}");
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                unreadable += 1;
            }
        }
    }
    let limits = DecodeLimits {
        allow_partial: args.allow_partial,
        ..DecodeLimits::default()
    };
    let with_evidence = !args.no_evidence && !matches!(args.format, Format::Table);
    let layer = match args.cam_layer {
        None => model.model.net.default_cam_layer(),
        Some(LayerArg::Last) => fracture_train::model::CamLayer::Last,
        Some(LayerArg::Stride16) => fracture_train::model::CamLayer::Stride16,
        Some(LayerArg::Head) => fracture_train::model::CamLayer::Head,
    };
    let (predictions, skipped) = predict_files(
        &model,
        &files,
        args.tta,
        with_evidence.then_some(layer),
        args.batch_size,
        &limits,
    )?;
    for s in &skipped {
        eprintln!("error: {}", s.reason);
    }
    unreadable += skipped.len();
    let partial = if args.allow_partial {
        partial_files(&predictions)
    } else {
        Default::default()
    };
    for p in predictions.iter().filter(|p| partial.contains(&p.path)) {
        eprintln!(
            "warning: {}: truncated or damaged, predicted from the part that decodes (--allow-partial)",
            path_text(&p.path)
        );
    }
    match args.format {
        Format::Table => print_table(&predictions, model.threshold()),
        Format::Json => println!(
            "{}",
            serde_json_lines(&predictions, with_evidence, model.threshold(), &partial)?
        ),
        Format::Csv => {
            let rows: Vec<_> = predictions.iter().map(Prediction::row).collect();
            let columns = CsvColumns {
                truth: false,
                evidence: with_evidence,
            };
            print!("{}", predictions_csv(&rows, columns)?);
        }
    }
    if predictions.is_empty() {
        bail!("no image could be read ({unreadable} unreadable)");
    }
    if let Some(dir) = &args.heatmap {
        write_heatmaps(&model, &predictions, dir, &limits)?;
    }
    if unreadable > 0 {
        eprintln!("{} predicted, {unreadable} unreadable", predictions.len());
        if !args.keep_going {
            bail!(
                "{unreadable} input(s) could not be read (pass --keep-going to exit 0 when some images were predicted)"
            );
        }
    }
    Ok(())
}

/// One overlay PNG per predicted image; names collide-free within a run.
fn write_heatmaps(
    model: &TrainedModel,
    predictions: &[Prediction],
    dir: &std::path::Path,
    limits: &DecodeLimits,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut used = std::collections::HashSet::new();
    for p in predictions {
        let bytes = std::fs::read(&p.path).with_context(|| format!("cannot read {}", p.path.display()))?;
        let explained = model.explain_bytes(&bytes, &p.path, limits, Default::default())?;

        let stem = p
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let mut name = format!("{stem}.heatmap.png");
        let mut k = 1;
        while !used.insert(name.clone()) {
            k += 1;
            name = format!("{stem}-{k}.heatmap.png");
        }
        let out = dir.join(&name);
        // The evidence box only on a fractured call, as on the page.
        std::fs::write(&out, explained.overlay_png(768, 0.6, p.fractured)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    eprintln!("wrote {} heatmaps to {}", predictions.len(), dir.display());
    Ok(())
}

fn print_table(predictions: &[Prediction], threshold: f64) {
    println!(
        "{:>12}  {:<13}  path   (threshold {threshold:.4})",
        "P(fractured)", "label"
    );
    for p in predictions {
        println!(
            "{:>12.4}  {:<13}  {}",
            p.p_fractured,
            Label::from_fractured(p.fractured).name(),
            fracture_train::data::path_shown(&p.path)
        );
    }
}

/// The files among `predictions` that decode only in part (checked again strictly; only asked for
/// with `--allow-partial`, where such files are predicted).
fn partial_files(predictions: &[Prediction]) -> std::collections::HashSet<PathBuf> {
    let strict = DecodeLimits::default();
    predictions
        .iter()
        .filter(|p| {
            fracture_train::data::read_file_limited(&p.path, &strict)
                .and_then(|bytes| fracture_train::data::decode_gray(&bytes, &p.path, &strict))
                .is_err_and(|e| matches!(e, fracture_train::data::Error::Partial { .. }))
        })
        .map(|p| p.path.clone())
        .collect()
}

/// The technical attributes of a DICOM file (decoded again: only for DICOM files, only for the JSON
/// output); `None` for other formats and for files that no longer decode.
fn dicom_info(path: &std::path::Path) -> Option<fracture_train::data::DicomInfo> {
    let limits = DecodeLimits::default();
    let bytes = fracture_train::data::read_file_limited(path, &limits).ok()?;
    if !fracture_train::data::is_dicom(&bytes) {
        return None;
    }
    fracture_train::data::decode_dicom(&bytes, path, &limits)
        .ok()
        .map(|(_, info)| info)
}

fn serde_json_lines(
    predictions: &[Prediction],
    with_evidence: bool,
    threshold: f64,
    partial: &std::collections::HashSet<PathBuf>,
) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Out {
        threshold: f64,
        predictions: Vec<Row>,
    }
    #[derive(serde::Serialize)]
    struct Row {
        path: String,
        p_fractured: f64,
        label: &'static str,
        /// `null` when the map is empty (no region raises the score); absent with `--no-evidence`.
        #[serde(skip_serializing_if = "Option::is_none")]
        evidence: Option<Option<fracture_train::evidence::Evidence>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        warning: Option<&'static str>,
        /// A DICOM file's technical attributes (modality, body part, bits stored, photometric
        /// interpretation, transfer syntax, frames, the window used); never a patient attribute.
        #[serde(skip_serializing_if = "Option::is_none")]
        dicom: Option<fracture_train::data::DicomInfo>,
    }
    let out = Out {
        threshold,
        predictions: predictions
            .iter()
            .map(|p| Row {
                path: path_text(&p.path),
                p_fractured: p.p_fractured,
                label: Label::from_fractured(p.fractured).name(),
                evidence: with_evidence.then_some(p.evidence),
                warning: partial
                    .contains(&p.path)
                    .then_some("the image is truncated or damaged: only part of it was decoded"),
                dicom: dicom_info(&p.path),
            })
            .collect(),
    };
    Ok(serde_json::to_string_pretty(&out)?)
}
