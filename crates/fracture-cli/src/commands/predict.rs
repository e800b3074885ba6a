//! `fracture predict`: P(fractured) and the label for image files and folders.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fracture_infer::TrainedModel;
use fracture_infer::archive::{ResultsFile, RowFormat, Shard, shard_key};
use fracture_infer::data::{DecodeLimits, Label, list_image_files, path_text};
use fracture_infer::model::CamLayer;
use fracture_infer::outputs::{CsvColumns, spreadsheet_safe};
use fracture_infer::{Prediction, Predictor};

/// Arguments of `fracture predict`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    model: crate::commands::ModelArgs,
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
    cam_layer: Option<fracture_infer::model::CamLayer>,
    /// Files decoded (in parallel) and written out at a time; the network itself takes at most 8
    /// images per pass, which keeps memory near 300 MB whatever the number of files.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: crate::commands::DeviceArgs,
    /// Predict JPEGs that decode only in part (truncated or damaged; the missing area is gray)
    /// instead of reporting them as unreadable.
    #[arg(long)]
    allow_partial: bool,
    /// Exit with status 0 when at least one image was predicted, even if others could not be read
    /// (by default any unreadable input makes the exit status 1; the readable ones are still
    /// predicted and printed).
    #[arg(long)]
    keep_going: bool,
    /// For each DICOM input, also write a DICOM Secondary Capture to DIR (`<name>.fracture.dcm`):
    /// the radiograph with the evidence heatmap (and box, on a fractured call) and the decision,
    /// P(fractured) and "not for diagnostic use" burned in, filed in the source's study (its
    /// Study Instance UID and patient attributes, in the file only), referring to the source image,
    /// in a new series.
    #[arg(long, value_name = "DIR")]
    dicom_out: Option<PathBuf>,
    /// Predict only this shard of the images: `I/N` (0 ≤ I < N), or `auto/N`, whose index comes
    /// from the job scheduler (`JOB_COMPLETION_INDEX` of a Kubernetes Indexed Job, or
    /// `SLURM_ARRAY_TASK_ID` of a Slurm array). An image's shard follows from its path below the
    /// folder given, so shards agree across machines; rows then carry their shard for `fracture
    /// merge`.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Write the rows to FILE instead of standard output, each flushed as it is predicted (JSON
    /// Lines or CSV: `--format`, or the file's extension `.jsonl`/`.csv`). An existing FILE is
    /// refused unless `--resume` is given.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// With `--out`: keep the rows FILE already holds (a row cut off by a crash is removed) and
    /// predict only the images it lacks.
    #[arg(long, requires = "out")]
    resume: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    /// JSON Lines: one object per image and line.
    Jsonl,
    Csv,
}

impl Format {
    /// The result-file format of `--out` in this format: CSV rows for csv, JSON Lines otherwise.
    fn rows(self) -> RowFormat {
        if self == Format::Csv {
            RowFormat::Csv
        } else {
            RowFormat::JsonLines
        }
    }
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let shard = args
        .shard
        .as_deref()
        .map(|spec| Shard::parse(spec, |name| std::env::var(name).ok()))
        .transpose()?;
    let format = output_format(args)?;
    let device = args.device.open()?;
    let model = args.model.load(&device)?;
    let (mut files, mut unreadable, other_shards) = input_files(&args.paths, shard);
    let limits = DecodeLimits {
        allow_partial: args.allow_partial,
        ..DecodeLimits::default()
    };
    let with_evidence = !args.no_evidence && !matches!(format, Format::Table);
    let layer = super::cam_layer(args.cam_layer, &model.model.net);
    for dir in [&args.heatmap, &args.dicom_out].into_iter().flatten() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut captures = OutputNames::default();
    let mut captured = 0usize;
    let columns = CsvColumns {
        truth: false,
        evidence: with_evidence,
        shard,
    };
    // Results leave as they come, a batch at a time: memory stays bounded whatever the number of
    // files, and a reader of the output sees rows before the last image is done.
    let (out, already) = open_output(args.out.as_deref(), format, &columns, args.resume, &mut files)?;
    if let Some(s) = shard {
        eprintln!(
            "shard {s}: {} images to predict{} ({other_shards} belong to other shards)",
            files.len(),
            if already > 0 {
                format!(", {already} already written")
            } else {
                String::new()
            }
        );
    } else if already > 0 {
        eprintln!("{} images to predict, {already} already written", files.len());
    }
    let write_header = args.out.is_none();
    let mut sink = Sink::new(format, out, columns, model.threshold(), write_header)?;
    let mut heatmaps = OutputNames::default();
    let mut predicted = 0usize;
    let predictor = model
        .predictor()
        .with_tta(args.tta)
        .with_evidence(with_evidence.then_some(layer))
        .with_limits(limits);
    predictor.files_each(&files, args.batch_size, &mut |result| {
        let p = match result {
            Ok(p) => p,
            Err(skipped) => {
                eprintln!("error: {}", skipped.reason);
                if !args.allow_partial && super::is_partial(&skipped.path) {
                    eprintln!("  (pass --allow-partial to predict it from the part that decodes)");
                }
                unreadable += 1;
                return Ok(());
            }
        };
        let partial = args.allow_partial && super::is_partial(&p.path);
        if partial {
            eprintln!(
                "warning: {}: truncated or damaged, predicted from the part that decodes (--allow-partial)",
                path_text(&p.path)
            );
        }
        sink.write(&p, partial)
            .map_err(|e| fracture_infer::Error::InvalidConfig(format!("cannot write the output: {e}")))?;
        let folders = Pictures {
            heatmap: args.heatmap.as_deref().map(|dir| (dir, &mut heatmaps)),
            dicom_out: args.dicom_out.as_deref().map(|dir| (dir, &mut captures)),
        };
        captured += usize::from(
            write_pictures(&predictor, layer, &p, folders)
                .map_err(|e| fracture_infer::Error::InvalidConfig(format!("{e:#}")))?,
        );
        predicted += 1;
        Ok(())
    })?;
    sink.finish()?;
    if predicted == 0 && files.is_empty() && (already > 0 || shard.is_some()) {
        // Nothing left to do: every image of this shard is written, or the shard owns none.
        eprintln!("nothing left to predict");
        return Ok(());
    }
    if predicted == 0 {
        bail!("no image could be read ({unreadable} unreadable)");
    }
    if let Some(dir) = &args.heatmap {
        eprintln!("wrote {predicted} heatmaps to {}", dir.display());
    }
    if let Some(dir) = &args.dicom_out {
        eprintln!(
            "wrote {captured} DICOM secondary captures to {} ({} inputs were not DICOM)",
            dir.display(),
            predicted - captured
        );
    }
    if unreadable > 0 {
        eprintln!("{predicted} predicted, {unreadable} unreadable");
        if !args.keep_going {
            bail!(
                "{unreadable} input(s) could not be read (pass --keep-going to exit 0 when some images were predicted)"
            );
        }
    }
    Ok(())
}

/// The output's format: `--format`, or the extension of `--out` when it names a results file;
/// refused when the two disagree or `--out` would get one JSON document.
fn output_format(args: &Args) -> anyhow::Result<Format> {
    Ok(match (&args.out, args.format) {
        (Some(out), Format::Table) => match RowFormat::from_extension(out) {
            Some(RowFormat::JsonLines) => Format::Jsonl,
            Some(RowFormat::Csv) => Format::Csv,
            None => bail!(
                "--out {}: pass --format jsonl or --format csv (or name the file .jsonl or .csv)",
                out.display()
            ),
        },
        (Some(_), Format::Json) => {
            bail!("--out writes a row per image as it is predicted: use --format jsonl (or csv)")
        }
        (Some(out), format) => {
            if RowFormat::from_extension(out).is_some_and(|named| named != format.rows()) {
                bail!(
                    "--out {}: the file's extension and --format {} disagree (merge reads the format from the extension)",
                    out.display(),
                    if format == Format::Csv { "csv" } else { "jsonl" }
                );
            }
            format
        }
        (None, format) => format,
    })
}

/// The images under `paths` this shard owns (all without a shard), with the number of paths that
/// could not be listed and of images left to other shards; skipped files are warned about.
fn input_files(paths: &[PathBuf], shard: Option<Shard>) -> (Vec<PathBuf>, usize, usize) {
    let mut files = Vec::new();
    let mut unreadable = 0usize;
    let mut other_shards = 0usize;
    for path in paths {
        match list_image_files(path) {
            Ok((found, skipped)) => {
                for file in found {
                    match shard {
                        Some(s) if !s.owns(&shard_key(path, &file)) => other_shards += 1,
                        _ => files.push(file),
                    }
                }
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
    (files, unreadable, other_shards)
}

/// Where the rows go: the results file `out` (resumed: a row cut off by an earlier run removed, and
/// the images it already holds dropped from `files`) or standard output. Returns the writer and the
/// number of images already written.
fn open_output(
    out: Option<&Path>,
    format: Format,
    columns: &CsvColumns,
    resume: bool,
    files: &mut Vec<PathBuf>,
) -> anyhow::Result<(Box<dyn Write>, usize)> {
    Ok(match out {
        Some(path) => {
            let row_format = format.rows();
            let file = ResultsFile::open(path, row_format, &columns.header_line(), resume)?;
            if file.cut_bytes > 0 {
                eprintln!(
                    "{}: removed a row cut off by the previous run ({} bytes)",
                    path.display(),
                    file.cut_bytes
                );
            }
            let before = files.len();
            files.retain(|f| {
                let text = path_text(f);
                let name = if row_format == RowFormat::Csv {
                    spreadsheet_safe(&text)
                } else {
                    text
                };
                !file.done.contains(&name)
            });
            (Box::new(file), before - files.len())
        }
        None => (Box::new(std::io::stdout().lock()), 0),
    })
}

/// Where predictions are written, in the chosen format, one at a time (each flushed, and each row
/// of JSON Lines or CSV written whole in one call, so a killed process leaves at most one row cut
/// off).
enum Sink {
    Table(Box<dyn Write>),
    Json {
        out: Box<dyn Write>,
        first: bool,
        columns: CsvColumns,
    },
    Jsonl {
        out: Box<dyn Write>,
        columns: CsvColumns,
    },
    Csv {
        out: Box<dyn Write>,
        columns: CsvColumns,
    },
}

impl Sink {
    /// A sink into `out`; `header` says whether to write the table's or CSV's header (not into a
    /// result file, which writes its own).
    fn new(
        format: Format,
        mut out: Box<dyn Write>,
        columns: CsvColumns,
        threshold: f64,
        header: bool,
    ) -> anyhow::Result<Self> {
        Ok(match format {
            Format::Table => {
                writeln!(
                    out,
                    "{:>12}  {:<13}  path   (threshold {threshold:.4})",
                    "P(fractured)", "predicted"
                )?;
                Sink::Table(out)
            }
            Format::Json => {
                write!(
                    out,
                    "{{\n  \"threshold\": {},\n  \"predictions\": [",
                    serde_json::to_string(&threshold)?
                )?;
                Sink::Json {
                    out,
                    first: true,
                    columns,
                }
            }
            Format::Jsonl => Sink::Jsonl { out, columns },
            Format::Csv => {
                if header {
                    out.write_all(format!("{}\n", columns.header_line()).as_bytes())?;
                    out.flush()?;
                }
                Sink::Csv { out, columns }
            }
        })
    }

    fn write(&mut self, p: &Prediction, partial: bool) -> anyhow::Result<()> {
        match self {
            Sink::Table(out) => {
                writeln!(
                    out,
                    "{:>12.4}  {:<13}  {}",
                    p.p_fractured,
                    Label::from_fractured(p.fractured).name(),
                    fracture_infer::data::path_shown(&p.path)
                )?;
                out.flush()?;
            }
            Sink::Json { out, first, columns } => {
                let row = json_row(p, *columns, partial);
                let text = serde_json::to_string_pretty(&row)?;
                let indented: Vec<String> = text.lines().map(|l| format!("    {l}")).collect();
                write!(out, "{}\n{}", if *first { "" } else { "," }, indented.join("\n"))?;
                *first = false;
                out.flush()?;
            }
            Sink::Jsonl { out, columns } => {
                let mut line = serde_json::to_string(&json_row(p, *columns, partial))?;
                line.push('\n');
                out.write_all(line.as_bytes())?;
                out.flush()?;
            }
            Sink::Csv { out, columns } => {
                let mut line = columns.row_line(&p.row());
                line.push('\n');
                out.write_all(line.as_bytes())?;
                out.flush()?;
            }
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            Sink::Table(mut out) | Sink::Jsonl { mut out, .. } | Sink::Csv { mut out, .. } => out.flush()?,
            Sink::Json { mut out, first, .. } => {
                writeln!(out, "{}]\n}}", if first { "" } else { "\n  " })?;
                out.flush()?;
            }
        }
        Ok(())
    }
}

/// File names already used in one output folder of this run.
#[derive(Default)]
struct OutputNames(std::collections::HashSet<String>);

impl OutputNames {
    /// `dir/<stem of path><suffix>`, or with `-2`, `-3`… after the stem when that name is taken.
    fn path_in(&mut self, dir: &std::path::Path, path: &std::path::Path, suffix: &str) -> PathBuf {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let mut name = format!("{stem}{suffix}");
        let mut k = 1;
        while !self.0.insert(name.clone()) {
            k += 1;
            name = format!("{stem}-{k}{suffix}");
        }
        dir.join(name)
    }
}

/// The picture folders asked for, each with the names already used in it.
struct Pictures<'a> {
    heatmap: Option<(&'a std::path::Path, &'a mut OutputNames)>,
    dicom_out: Option<(&'a std::path::Path, &'a mut OutputNames)>,
}

/// Writes the pictures asked for of one predicted image, explaining it once for both: the
/// heatmap overlay PNG, and for a DICOM input its secondary capture. Returns whether a capture was
/// written.
fn write_pictures(
    predictor: &Predictor<'_>,
    layer: CamLayer,
    p: &Prediction,
    folders: Pictures<'_>,
) -> anyhow::Result<bool> {
    if folders.heatmap.is_none() && folders.dicom_out.is_none() {
        return Ok(false);
    }
    let bytes = std::fs::read(&p.path).with_context(|| format!("cannot read {}", p.path.display()))?;
    let capture = folders
        .dicom_out
        .filter(|_| fracture_infer::data::is_dicom(&bytes));
    if folders.heatmap.is_none() && capture.is_none() {
        return Ok(false);
    }
    // The same map the evidence column is taken on.
    let explained = predictor.explain(&bytes, &p.path, Default::default(), layer)?;
    if let Some((dir, used)) = folders.heatmap {
        let out = used.path_in(dir, &p.path, ".heatmap.png");
        // The evidence box only on a fractured call, as on the page.
        std::fs::write(&out, explained.overlay_png(768, 0.6, p.fractured)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    let Some((dir, used)) = capture else {
        return Ok(false);
    };
    write_capture(
        predictor.model(),
        p,
        &explained,
        &bytes,
        used.path_in(dir, &p.path, ".fracture.dcm"),
        predictor.limits(),
    )?;
    Ok(true)
}

/// The secondary capture of the DICOM file `bytes` (explained as `explained`) into `out`.
fn write_capture(
    model: &TrainedModel,
    p: &Prediction,
    explained: &fracture_infer::explain::Explanation,
    bytes: &[u8],
    out: PathBuf,
    limits: &DecodeLimits,
) -> anyhow::Result<()> {
    let overlay =
        fracture_infer::data::image::load_from_memory(&explained.overlay_png(1024, 0.6, p.fractured)?)
            .with_context(|| format!("{}: cannot draw the overlay", path_text(&p.path)))?
            .to_rgb8();
    // At least 512 px wide, so the burned-in lines fit whole.
    let overlay = if overlay.width() < 512 {
        let h = (f64::from(overlay.height()) * 512.0 / f64::from(overlay.width())).round() as u32;
        fracture_infer::data::image::imageops::resize(
            &overlay,
            512,
            h.max(1),
            fracture_infer::data::image::imageops::FilterType::Triangle,
        )
    } else {
        overlay
    };
    let decision = Label::from_fractured(p.fractured).name().to_uppercase();
    let threshold = model.threshold();
    let lines = [
        "NOT FOR DIAGNOSTIC USE (research software)".to_string(),
        format!("fracture: {decision}   P(fractured) {:.3}", p.p_fractured),
        format!("threshold {threshold:.3}; colour: evidence for fractured"),
    ];
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let captioned = fracture_infer::plot::with_banner(overlay, &lines)?;
    let comments = format!(
        "fracture {}: P(fractured) = {:.4}, {} at threshold {threshold:.4}. Not for diagnostic use.",
        env!("CARGO_PKG_VERSION"),
        p.p_fractured,
        Label::from_fractured(p.fractured).name()
    );
    let (file, _) = fracture_infer::data::dicom::secondary_capture(
        bytes,
        &p.path,
        limits,
        &captioned,
        "fracture: P(fractured) and evidence heatmap",
        &comments,
    )?;
    fracture_fs::write_atomic(&out, &file).with_context(|| format!("cannot write {}", out.display()))
}

/// The technical attributes of a DICOM file (decoded again: only for DICOM files, only for the JSON
/// output); `None` for other formats and for files that no longer decode.
fn dicom_info(path: &std::path::Path) -> Option<fracture_infer::data::DicomInfo> {
    let limits = DecodeLimits::default();
    let bytes = fracture_infer::data::read_file_limited(path, &limits).ok()?;
    if !fracture_infer::data::is_dicom(&bytes) {
        return None;
    }
    fracture_infer::data::decode_dicom(&bytes, path, &limits)
        .ok()
        .map(|(_, info)| info)
}

/// One prediction of the JSON output.
#[derive(serde::Serialize)]
struct JsonRow {
    path: String,
    p_fractured: f64,
    /// The decision at the threshold (`fractured` or `not fractured`), named as in the CSV.
    predicted: &'static str,
    /// `null` when the map is empty (no region raises the score); absent with `--no-evidence`.
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence: Option<Option<fracture_infer::evidence::Evidence>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<&'static str>,
    /// A DICOM file's technical attributes (modality, body part, bits stored, photometric
    /// interpretation, transfer syntax, frames, the window used); never a patient attribute.
    #[serde(skip_serializing_if = "Option::is_none")]
    dicom: Option<fracture_infer::data::DicomInfo>,
    /// The shard (`I/N`) of a sharded run.
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<String>,
}

fn json_row(p: &Prediction, columns: CsvColumns, partial: bool) -> JsonRow {
    JsonRow {
        path: path_text(&p.path),
        p_fractured: p.p_fractured,
        predicted: Label::from_fractured(p.fractured).name(),
        evidence: columns.evidence.then_some(p.evidence),
        warning: partial.then_some("the image is truncated or damaged: only part of it was decoded"),
        dicom: dicom_info(&p.path),
        shard: columns.shard.map(|s| s.to_string()),
    }
}
