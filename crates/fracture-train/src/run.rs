//! The training loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use fracture_data::{Augmenter, DatasetSummary, DecodeLimits, ImageFit, PreprocessConfig, Split};
use fracture_eval::EvalReport;
use fracture_fs::AtPath;
use fracture_fs::write_atomic;
use fracture_model::{Model, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::bundle::{MODEL_FILE, ModelMeta, TrainedModel, json_pretty};
use crate::checkpoint::{Best, CheckpointMeta};
use crate::inputs::{Data, load_data, prepare_out};
use crate::recipe::Recipe;
use crate::selection::{improves, stop_early};
use crate::session::{Session, Validation};
use crate::supervision::BoxTargets;
use crate::{EpochReport, Error, Result, RunLayout, TrainConfig, Tta, predict_dataset, truth};
pub use fracture_infer::layout::{CHECKPOINT_FILE, METRICS_FILE, REPORT_FILE};

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainSetup {
    /// Dataset root (`<data>/<split>/<class>/<image>`); it must have a train split.
    pub data: PathBuf,
    /// Run folder: receives the model, checkpoints, metrics and report.
    pub out: PathBuf,
    /// The network, with the input size (the one place a setup states it).
    pub model: ModelConfig,
    /// How images are fitted into the network's input and scaled; see [`TrainSetup::preprocess`].
    pub fit: ImageFit,
    /// The training settings.
    pub train: TrainConfig,
    /// Continue from `<out>/checkpoints/last.safetensors` instead of starting afresh.
    pub resume: bool,
    /// Folder for the on-disk cache of preprocessed images.
    pub cache_dir: Option<PathBuf>,
    /// Decoding limits.
    pub limits: DecodeLimits,
    /// The device to train on.
    pub device: Device,
    /// Our CPU kernels (the default) or candle's own operations (for comparison; results agree within
    /// rounding).
    pub kernels: fracture_model::Kernels,
    /// End this invocation once this many epochs are complete (counted from the start of the run),
    /// exactly as an interruption after that epoch would; `--resume` continues it. `None` runs all
    /// `train.epochs`.
    pub stop_after_epochs: Option<usize>,
    /// Pretrained weights to start the backbone from (a PyTorch or safetensors file; see
    /// [`fracture_model::Model::load_pretrained`]); the head starts from the seeded initialisation.
    /// Recorded in the model file. Not read when resuming (the checkpoint holds the weights).
    pub pretrained: Option<PathBuf>,
    /// More training images: dataset roots whose `train` split is added to `data`'s (their other
    /// splits are not read). Validation and threshold choice stay on `data`'s val split; a file
    /// that is also a validation or test image is refused.
    pub extra_train: Vec<PathBuf>,
    /// Annotated fracture boxes (a CSV as `fracture eval --boxes` reads) that train the
    /// localization head: set with [`TrainSetup::with_boxes`], which also gives the network its
    /// head. Only the boxes of training images are read.
    pub boxes: Option<PathBuf>,
    /// Train even when the dataset's symbolic links leave its root or put one image in two
    /// classes or splits ([`fracture_data::DatasetLayout::link_problems`]); otherwise that is an error.
    pub allow_link_problems: bool,
    /// Leave out training images that have a near duplicate in val or test (see
    /// [`fracture_data::audit`]), with a notice saying how many.
    pub exclude_leaks: bool,
}

impl TrainSetup {
    /// A setup for `recipe` on the dataset at `data`, writing into `out`: from scratch, no cache,
    /// default decoding limits, on the CPU with our kernels, all epochs, no pretrained file (set
    /// [`TrainSetup::pretrained`] when the recipe asks for one), no extra training folders.
    pub fn new(recipe: &Recipe, data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        TrainSetup {
            data: data.into(),
            out: out.into(),
            model: recipe.model.clone(),
            fit: recipe.fit,
            train: recipe.train.clone(),
            resume: false,
            cache_dir: None,
            limits: DecodeLimits::default(),
            device: Device::Cpu,
            kernels: fracture_model::Kernels::default(),
            stop_after_epochs: None,
            pretrained: None,
            extra_train: Vec::new(),
            boxes: None,
            allow_link_problems: false,
            exclude_leaks: false,
        }
    }

    /// Trains a localization head (EfficientNet-Lite0 only) with a map of `stride` input pixels
    /// per cell (8 or 16) from the boxes in `path`, its loss weighted by `weight` beside the
    /// classification loss (see [`TrainConfig::box_weight`]).
    pub fn with_boxes(mut self, path: impl Into<PathBuf>, weight: f64, stride: usize) -> Self {
        self.boxes = Some(path.into());
        self.train.box_weight = weight;
        if let fracture_model::ArchConfig::EfficientNetLite0(e) = &mut self.model.arch {
            e.localization_head = true;
            e.localization_stride = stride;
        }
        self
    }

    /// The folders this setup trains on, as recorded in the model file and `report.json`.
    pub fn training_data(&self) -> crate::bundle::TrainingData {
        crate::bundle::TrainingData {
            data: fracture_data::path_text(&self.data),
            extra_train: self
                .extra_train
                .iter()
                .map(|p| fracture_data::path_text(p))
                .collect(),
            boxes: self.boxes.as_ref().map(|p| fracture_data::path_text(p)),
        }
    }

    /// The preprocessing: [`TrainSetup::fit`] at the network's input size.
    pub fn preprocess(&self) -> PreprocessConfig {
        self.fit.at(self.model.image_size)
    }
}

/// Progress of a run, reported to the caller's callback as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    /// Something the user should know (a fallback, a resumption).
    Notice(&'a str),
    /// The data after loading: images per split and class, skipped files.
    Dataset(&'a DatasetSummary),
    /// An epoch starts.
    EpochStart {
        /// 1-based epoch.
        epoch: usize,
        /// Total epochs of the run.
        epochs: usize,
        /// Optimizer steps in this epoch.
        steps: usize,
        /// Training images in this epoch.
        images: usize,
    },
    /// A step finished.
    Step {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// Images processed so far in this epoch.
        images: usize,
        /// Running mean training loss of this epoch.
        loss: f64,
    },
    /// Validation of an epoch starts.
    Validating {
        /// 1-based epoch.
        epoch: usize,
    },
    /// An epoch finished.
    EpochEnd(&'a EpochReport),
    /// A file was written.
    Saved {
        /// What it is.
        what: Artifact,
        /// Where.
        path: &'a Path,
    },
}

/// The files a run writes, as [`Event::Saved`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// The best model so far (`model.safetensors`), after an epoch that improved the selection metric.
    BestModel,
    /// The checkpoint and the metrics table, after every epoch.
    Checkpoint,
    /// `report.json`: the best model on val (and test), at the end.
    Report,
    /// The training-curves chart, at the end.
    TrainingCurves,
}

impl Artifact {
    /// A short name: `best model`, `checkpoint`, `report`, `training curves`.
    pub fn name(self) -> &'static str {
        match self {
            Artifact::BestModel => "best model",
            Artifact::Checkpoint => "checkpoint",
            Artifact::Report => "report",
            Artifact::TrainingCurves => "training curves",
        }
    }
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The run folder.
    pub out: PathBuf,
    /// The best model's weight file.
    pub best_model: PathBuf,
    /// The epoch the best model comes from.
    pub best_epoch: usize,
    /// Epochs completed in total (including those before a resumption).
    pub epochs_completed: usize,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// One report per completed epoch.
    pub history: Vec<EpochReport>,
    /// The best model evaluated on each split it was evaluated on (val, and test when present).
    pub reports: BTreeMap<Split, EvalReport>,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
}

/// The final `report.json` of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// The best model's file, relative to the run folder.
    pub model: String,
    /// Its epoch.
    pub best_epoch: usize,
    /// The selection metric.
    pub best_metric: String,
    /// The stored operating threshold and how it was chosen on the validation images.
    pub threshold: f64,
    /// The rule that chose it.
    pub threshold_rule: fracture_eval::ThresholdRule,
    /// Evaluation of the best model per split.
    pub splits: BTreeMap<Split, EvalReport>,
    /// The folders the run trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_data: Option<crate::bundle::TrainingData>,
}

/// Trains a model as `setup` describes, reporting progress through `on_event`.
///
/// Writes into `setup.out`: `model.safetensors` (the best epoch by `train.best_metric`, with its
/// preprocessing and threshold), `checkpoints/last.safetensors` (after every epoch), `metrics.csv`
/// (one row per epoch) and `report.json` (the best model on val, and on test when there is one). Every
/// file is written atomically, so an interrupted run loses at most the epoch in progress.
pub fn train(setup: &TrainSetup, on_event: &mut dyn FnMut(Event<'_>)) -> Result<TrainOutcome> {
    let started = Instant::now();
    let cfg = &setup.train;
    cfg.validate()?;
    let preprocess = setup.preprocess();
    preprocess.validate()?;
    setup.model.validate()?;
    let layout = RunLayout::new(&setup.out);
    let checkpoint = layout.checkpoint();
    prepare_out(&setup.out, &checkpoint, setup.resume)?;
    // One run per folder: a second process on the same --out is refused, naming the first.
    let _lock = fracture_fs::FolderLock::acquire(&setup.out).map_err(|e| {
        Error::Io(fracture_fs::PathError::new(
            &setup.out,
            std::io::Error::other(e.to_string()),
        ))
    })?;
    for dir in [setup.out.clone(), layout.checkpoints_dir()] {
        let removed = fracture_fs::remove_stale_temporaries(&dir).at(&dir)?;
        for path in removed {
            on_event(Event::Notice(&format!(
                "removed {}, a partial file left by an interrupted run",
                fracture_data::path_text(&path)
            )));
        }
    }
    let data = load_data(setup, &preprocess, on_event)?;
    let fingerprints_path = layout.fingerprints();
    let fingerprint_bytes = fracture_data::audit::fingerprints_to_bytes(&data.fingerprints);
    fracture_fs::write_atomic(&fingerprints_path, &fingerprint_bytes).at(&fingerprints_path)?;
    let fingerprints_sha256 = crate::audit::sha256_hex(&fingerprint_bytes);
    let mut session = Session::start(setup, preprocess, &data, &checkpoint, on_event)?;
    let augmenter = cfg.augment.map(Augmenter::new).transpose()?;
    let boxes = box_targets(setup, &session, &data, &preprocess, on_event)?;

    let mut stopped_early = session.meta.best.is_some() && stop_early(cfg, &session.meta);
    let last_epoch = setup.stop_after_epochs.map_or(cfg.epochs, |k| k.min(cfg.epochs));
    while session.meta.epoch < last_epoch && !stopped_early {
        let epoch = session.meta.epoch + 1;
        let epoch_start = Instant::now();
        let trained = session.train_epoch(
            setup,
            &data.train,
            augmenter.as_ref(),
            boxes.as_ref(),
            epoch,
            on_event,
        )?;
        session.check_weights(epoch)?;
        on_event(Event::Validating { epoch });
        let val = session.validate(setup, &data.val, epoch)?;
        let report = EpochReport {
            epoch,
            train_loss: trained.loss,
            val_loss: val.loss,
            val: val.report.clone(),
            lr: trained.lr,
            seconds: epoch_start.elapsed().as_secs_f64(),
            images_per_s: trained.images as f64 / trained.seconds.max(1e-9),
            bf16_backend: (session.model.net.kernels() == fracture_model::Kernels::Bf16)
                .then(fracture_kernels::bf16_backend),
        };
        on_event(Event::EpochEnd(&report));
        session.meta.epoch = epoch;
        session.meta.history.push(report.clone());

        let value = report.metric(cfg.best_metric);
        if improves(cfg.best_metric, value, session.meta.best) {
            session.meta.best = Some(Best {
                epoch,
                value: value.filter(|v| v.is_finite()),
            });
            session.meta.epochs_since_best = 0;
            let path = layout.model();
            save_best(
                session.eval_model(),
                setup,
                &report,
                &val,
                session.meta.pretrained.as_ref(),
                &fingerprints_sha256,
                &path,
            )?;
            on_event(Event::Saved {
                what: Artifact::BestModel,
                path: &path,
            });
        } else {
            session.meta.epochs_since_best += 1;
        }
        let metrics_path = layout.metrics();
        write_atomic(&metrics_path, metrics_csv(&session.meta.history)?.as_bytes()).at(&metrics_path)?;
        session.save_checkpoint(&checkpoint)?;
        on_event(Event::Saved {
            what: Artifact::Checkpoint,
            path: &checkpoint,
        });
        if stop_early(cfg, &session.meta) {
            stopped_early = true;
            let best = session.meta.best.map_or(epoch, |b| b.epoch);
            on_event(Event::Notice(&format!(
                "early stopping: no improvement of {} for {} epochs (best: epoch {best})",
                cfg.best_metric.name(),
                session.meta.epochs_since_best
            )));
        }
    }

    let meta = session.meta;
    let reports = final_report(setup, &data, &meta, on_event)?;
    Ok(TrainOutcome {
        out: setup.out.clone(),
        best_model: layout.model(),
        best_epoch: meta.best.map_or(meta.epoch, |b| b.epoch),
        epochs_completed: meta.epoch,
        stopped_early,
        history: meta.history,
        reports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The localization targets of the training images when the setup trains a localization head:
/// checks that boxes and head come together and that some training image has a box.
fn box_targets(
    setup: &TrainSetup,
    session: &Session,
    data: &crate::inputs::Data,
    preprocess: &PreprocessConfig,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Option<BoxTargets>> {
    let grid = session.model.net.localization_grid();
    let (path, grid) = match (&setup.boxes, grid) {
        (None, None) => return Ok(None),
        (Some(path), Some(grid)) => (path, grid),
        (Some(_), None) => {
            return Err(Error::BoxesWithoutHead);
        }
        (None, Some(_)) => {
            return Err(Error::HeadWithoutBoxes);
        }
    };
    if setup.train.box_weight <= 0.0 {
        return Err(Error::InvalidConfig(
            "box_weight: must be above 0 when boxes train the localization head".into(),
        ));
    }
    let index = crate::localize::read_boxes(path)?;
    let targets = BoxTargets::new(&data.train, &index, preprocess, &setup.limits, grid);
    let c = targets.counts;
    if c.boxed == 0 {
        return Err(Error::InvalidConfig(format!(
            "{}: no fractured training image has a box (ids are file names without extension)",
            path.display()
        )));
    }
    on_event(Event::Notice(&format!(
        "localization head: {} boxes on {} fractured training images ({} fractured without boxes, \
         {} not fractured), box weight {}",
        c.boxes, c.boxed, c.unboxed, c.negatives, setup.train.box_weight
    )));
    Ok(Some(targets))
}

/// Evaluates the best model, read back from its file (what is reported is what was saved), on val
/// and test; writes `report.json` and the training curves.
fn final_report(
    setup: &TrainSetup,
    data: &Data,
    meta: &CheckpointMeta,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<BTreeMap<Split, EvalReport>> {
    let cfg = &setup.train;
    let layout = RunLayout::new(&setup.out);
    let best = TrainedModel::load(&layout.model(), &setup.device)?;
    let mut reports = BTreeMap::new();
    for (split, dataset) in [(Split::Val, Some(&data.val)), (Split::Test, data.test.as_ref())] {
        if let Some(dataset) = dataset {
            let raw = predict_dataset(&best.model.net, dataset, cfg.batch_size, Tta::Off, &setup.device)?;
            let probabilities: Vec<f64> = raw.into_iter().map(|p| best.probability(p)).collect();
            let report = EvalReport::new(&probabilities, &truth(dataset), best.threshold())?;
            reports.insert(split, report);
        }
    }
    let run_report = RunReport {
        model: MODEL_FILE.into(),
        best_epoch: meta.best.map_or(meta.epoch, |b| b.epoch),
        best_metric: cfg.best_metric.name().into(),
        threshold: best.threshold(),
        threshold_rule: cfg.threshold_rule,
        splits: reports.clone(),
        training_data: Some(setup.training_data()),
    };
    let report_path = layout.report();
    write_atomic(
        &report_path,
        json_pretty(&run_report, "the run report")?.as_bytes(),
    )
    .at(&report_path)?;
    on_event(Event::Saved {
        what: Artifact::Report,
        path: &report_path,
    });
    let curves = layout.training_curves();
    crate::write_training_curves(&curves, &meta.history)?;
    on_event(Event::Saved {
        what: Artifact::TrainingCurves,
        path: &curves,
    });
    Ok(reports)
}

/// Saves the epoch's weights as the best model, with the calibration fitted on the validation
/// images, the threshold `setup.train.threshold_rule` chooses on the calibrated probabilities (see
/// [`crate::calibrate::operating_point`]) and the report at that threshold.
fn save_best(
    model: &Model,
    setup: &TrainSetup,
    report: &EpochReport,
    val: &Validation,
    pretrained: Option<&fracture_model::PretrainedOrigin>,
    fingerprints_sha256: &str,
    path: &Path,
) -> Result<()> {
    let rule = setup.train.threshold_rule;
    // The val split holds both classes (checked when loading), so a threshold always exists.
    let op = crate::calibrate::operating_point(&val.probabilities, &val.truth, rule)?;
    let meta = ModelMeta {
        preprocess: setup.preprocess(),
        threshold: op.threshold,
        threshold_rule: Some(rule),
        train: Some(setup.train.clone()),
        validation: Some(report.clone()),
        operating_point: Some(op.report),
        pretrained: pretrained.cloned(),
        training_data: Some(setup.training_data()),
        calibration: op.calibration,
        threshold_stability: op.stability,
        training_fingerprints: Some(fingerprints_sha256.to_string()),
    };
    Ok(model.save(path, &meta.to_metadata()?)?)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// The columns of `metrics.csv`, in order.
pub const METRICS_COLUMNS: [&str; 10] = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_sensitivity",
    "val_specificity",
    "val_roc_auc",
    "lr",
    "seconds",
    "images_per_s",
];

/// The metrics table (written with the `csv` crate): one row per epoch, [`METRICS_COLUMNS`]; an
/// undefined metric is an empty cell.
pub fn metrics_csv(history: &[EpochReport]) -> Result<String> {
    let bad = |e: csv::Error| Error::InvalidConfig(format!("cannot write the metrics table: {e}"));
    let mut out = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    out.write_record(METRICS_COLUMNS).map_err(bad)?;
    for r in history {
        out.write_record([
            r.epoch.to_string(),
            format!("{:.6}", r.train_loss),
            format!("{:.6}", r.val_loss),
            fmt_opt(r.val.accuracy),
            fmt_opt(r.val.sensitivity),
            fmt_opt(r.val.specificity),
            fmt_opt(r.val.roc_auc),
            format!("{:e}", r.lr),
            format!("{:.3}", r.seconds),
            format!("{:.2}", r.images_per_s),
        ])
        .map_err(bad)?;
    }
    let bytes = out.into_inner().map_err(|e| bad(e.into_error().into()))?;
    String::from_utf8(bytes).map_err(|e| Error::InvalidConfig(e.to_string()))
}
