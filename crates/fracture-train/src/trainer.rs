//! The training loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, ModuleT};
use fracture_data::{
    Augmenter, BatchAugment, DatasetLayout, DatasetSummary, DecodeLimits, FolderDataset, Item, LoadOptions,
    PreprocessConfig, Split, SplitCounts, epoch_order, make_batch, stratified_split,
};
use fracture_model::{Model, ModelConfig, write_atomic};
use serde::{Deserialize, Serialize};

use crate::bundle::{MODEL_FILE, ModelMeta, TrainedModel};
use crate::checkpoint::{
    Best, CheckpointMeta, DataCounts, read_checkpoint, restore, resume_mismatch, save_checkpoint,
};
use crate::ema::Ema;
use crate::{
    Adam, BestMetric, Error, PosWeight, Result, TrainConfig, batch_to_tensors, bce_with_logits, evaluate,
    mean_loss, predict_logits, sigmoid, truth,
};
use fracture_eval::{EvalReport, choose_threshold};

/// Batches prepared ahead of the one being trained on.
const PREFETCH: usize = 2;

/// Where the last checkpoint of a run lives, relative to the run folder.
pub const CHECKPOINT_FILE: &str = "checkpoints/last.safetensors";
/// The per-epoch metrics table of a run.
pub const METRICS_FILE: &str = "metrics.csv";
/// The final evaluation of the best model.
pub const REPORT_FILE: &str = "report.json";

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainSetup {
    /// Dataset root (`<data>/<split>/<class>/<image>`); it must have a train split.
    pub data: PathBuf,
    /// Run folder: receives the model, checkpoints, metrics and report.
    pub out: PathBuf,
    /// The network.
    pub model: ModelConfig,
    /// The preprocessing; `size` must equal `model.image_size`.
    pub preprocess: PreprocessConfig,
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
    /// Train even when the dataset's symbolic links leave its root or put one image in two
    /// classes or splits ([`DatasetLayout::link_problems`]); otherwise that is an error.
    pub allow_link_problems: bool,
}

/// One completed epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (weighted by batch size).
    pub train_loss: f64,
    /// Mean validation loss.
    pub val_loss: f64,
    /// Validation metrics at the default threshold 0.5, and the threshold-free ones.
    pub val: EvalReport,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Wall time of the epoch (training and validation), seconds.
    pub seconds: f64,
    /// Training images per second (augmentation and batching included).
    pub images_per_s: f64,
}

impl EpochReport {
    /// The value of a selection metric, or `None` when undefined.
    pub fn metric(&self, metric: BestMetric) -> Option<f64> {
        match metric {
            BestMetric::RocAuc => self.val.roc_auc,
            BestMetric::ValLoss => Some(self.val_loss).filter(|v| v.is_finite()),
            BestMetric::BalancedAccuracy => self.val.balanced_accuracy,
            BestMetric::F1 => self.val.f1,
        }
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
        /// What it is: `checkpoint`, `best model`, `metrics`, `report`.
        what: &'static str,
        /// Where.
        path: &'a Path,
    },
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
}

struct Data {
    train: FolderDataset,
    val: FolderDataset,
    test: Option<FolderDataset>,
    counts: DataCounts,
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
    setup.preprocess.validate()?;
    setup.model.validate()?;
    if setup.preprocess.size as usize != setup.model.image_size {
        return Err(Error::InvalidConfig(format!(
            "the preprocessing size ({}) must equal the model's image size ({})",
            setup.preprocess.size, setup.model.image_size
        )));
    }
    let checkpoint_path = setup.out.join(CHECKPOINT_FILE);
    prepare_out(&setup.out, &checkpoint_path, setup.resume)?;

    let data = load_data(setup, on_event)?;
    let pos_weight = match cfg.pos_weight {
        PosWeight::None => None,
        PosWeight::Value(w) => Some(w),
        PosWeight::Auto => {
            let [pos, neg] = data.counts.train;
            let w = neg as f64 / pos.max(1) as f64;
            on_event(Event::Notice(&format!(
                "positive-class weight (auto): {neg} / {pos} = {w:.3}"
            )));
            Some(w)
        }
    };

    let mut model = Model::new(&setup.model, cfg.seed, &setup.device)?;
    model.net.set_kernels(setup.kernels);
    model.net.set_frozen_batch_norm(cfg.freeze_batch_norm);
    let pretrained = match &setup.pretrained {
        Some(path) if !setup.resume => {
            let weights = fracture_model::PretrainedWeights::read(path)?;
            let origin = model.load_pretrained(&weights)?;
            on_event(Event::Notice(&format!(
                "backbone from {} ({} tensors, sha256 {}…)",
                path.display(),
                origin.loaded,
                &origin.sha256[..12.min(origin.sha256.len())]
            )));
            Some(origin)
        }
        _ => None,
    };
    let mut adam = Adam::new(model.trainable_vars(), cfg.adam)?;
    adam.set_lr_scales(|name| {
        if name.starts_with("head.") {
            1.0
        } else {
            cfg.backbone_lr_scale
        }
    });
    let ema = cfg.ema_decay.map(|d| Ema::new(&model, d)).transpose()?;
    let mut meta = CheckpointMeta {
        format: 1,
        epoch: 0,
        step: 0,
        model: setup.model.clone(),
        preprocess: setup.preprocess,
        train: cfg.clone(),
        data: data.counts,
        best: None,
        epochs_since_best: 0,
        history: Vec::new(),
        pretrained,
    };
    if setup.resume {
        let (old, mut tensors) = read_checkpoint(&checkpoint_path, &setup.device)?;
        if let Some(why) = resume_mismatch(&old, &setup.model, &setup.preprocess, cfg, &data.counts) {
            return Err(Error::Checkpoint {
                path: checkpoint_path,
                reason: format!("cannot resume: {why}; use the original settings or another --out"),
            });
        }
        if old.epoch > cfg.epochs {
            return Err(Error::Checkpoint {
                path: checkpoint_path,
                reason: format!(
                    "cannot resume: the run has already trained {} epochs, more than the {} asked for; \
                     pass --epochs {} or more to continue it",
                    old.epoch,
                    cfg.epochs,
                    old.epoch + 1
                ),
            });
        }
        if old.epoch == cfg.epochs {
            on_event(Event::Notice(&format!(
                "the run has already trained all {} epochs: nothing to do (pass a larger --epochs to continue it)",
                cfg.epochs
            )));
        }
        restore(
            &checkpoint_path,
            &mut tensors,
            &old,
            &model,
            &mut adam,
            ema.as_ref().map(Ema::model),
        )?;
        meta = CheckpointMeta {
            train: cfg.clone(),
            ..old
        };
        on_event(Event::Notice(&format!(
            "resuming after epoch {} (step {})",
            meta.epoch, meta.step
        )));
    }

    let augmenter = cfg.augment.map(Augmenter::new).transpose()?;
    let n_train = data.train.len();
    let steps_per_epoch = n_train.div_ceil(cfg.batch_size) as u64;
    let total_steps = steps_per_epoch * cfg.epochs as u64;
    let mut stopped_early = false;
    if meta.best.is_some() && stop_early(cfg, &meta) {
        stopped_early = true;
    }

    let last_epoch = setup.stop_after_epochs.map_or(cfg.epochs, |k| k.min(cfg.epochs));
    while meta.epoch < last_epoch && !stopped_early {
        let epoch = meta.epoch + 1;
        let epoch_start = Instant::now();
        let order = epoch_order(n_train, cfg.seed, epoch as u64, true);
        on_event(Event::EpochStart {
            epoch,
            epochs: cfg.epochs,
            steps: steps_per_epoch as usize,
            images: n_train,
        });
        let (mut loss_sum, mut seen, mut lr) = (0.0, 0usize, cfg.adam.lr);
        let chunks: Vec<&[usize]> = order.chunks(cfg.batch_size).collect();
        let augment = augmenter.as_ref().map(|a| BatchAugment {
            augment: a,
            seed: cfg.seed,
            epoch: epoch as u64,
        });
        // The next batch is decoded from the cache and augmented on another thread while this one
        // trains, so data preparation never stalls the step.
        let stepped = std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel(PREFETCH);
            let train_set = &data.train;
            let chunks = &chunks;
            scope.spawn(move || {
                for chunk in chunks {
                    if tx.send(make_batch(train_set, chunk, augment)).is_err() {
                        break;
                    }
                }
            });
            for (i, batch) in rx.iter().enumerate() {
                let (x, y) = batch_to_tensors(&batch, &setup.device)?;
                model.net.set_dropout_seed(dropout_seed(cfg.seed, meta.step));
                let logits = model.net.forward_t(&x, true)?;
                let loss = bce_with_logits(&logits, &y, pos_weight)?;
                let value = f64::from(loss.to_scalar::<f32>()?);
                if !value.is_finite() {
                    return Err(Error::NonFiniteLoss {
                        epoch,
                        step: i + 1,
                        value,
                    });
                }
                lr = cfg.lr_at(meta.step, steps_per_epoch, total_steps);
                adam.backward_step(&loss, lr)?;
                if let Some(ema) = &ema {
                    ema.update(&model, meta.step)?;
                }
                meta.step += 1;
                loss_sum += value * batch.len() as f64;
                seen += batch.len();
                on_event(Event::Step {
                    epoch,
                    step: i + 1,
                    images: seen,
                    loss: loss_sum / seen.max(1) as f64,
                });
            }
            Ok(())
        });
        stepped?;
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        for (param, var) in model.named_vars() {
            // 0·x is 0 for every finite x and NaN for NaN and ±∞, so the sum is 0 exactly when all are finite.
            if var.as_tensor().affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()? != 0.0 {
                return Err(Error::NonFiniteWeights { epoch, param });
            }
        }

        on_event(Event::Validating { epoch });
        // What is validated and saved: the moving average of the weights when there is one.
        let eval_model = ema.as_ref().map_or(&model, Ema::model);
        let val_logits = predict_logits(&eval_model.net, &data.val, cfg.batch_size, &setup.device)?;
        if let Some(bad) = val_logits.iter().find(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                epoch,
                value: f64::from(*bad),
            });
        }
        let val_probs: Vec<f64> = val_logits.iter().map(|&l| sigmoid(l)).collect();
        let val_truth = truth(&data.val);
        let val_report = EvalReport::new(&val_probs, &val_truth, fracture_eval::DEFAULT_THRESHOLD)?;
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            val_loss: mean_loss(&val_logits, &data.val, pos_weight)?,
            val: val_report,
            lr,
            seconds: epoch_start.elapsed().as_secs_f64(),
            images_per_s: seen as f64 / train_seconds.max(1e-9),
        };
        on_event(Event::EpochEnd(&report));
        meta.epoch = epoch;
        meta.history.push(report.clone());

        let improved = match (report.metric(cfg.best_metric), meta.best) {
            (Some(v), Some(best)) => {
                if cfg.best_metric.higher_is_better() {
                    v > best.value
                } else {
                    v < best.value
                }
            }
            (Some(_), None) => true,
            (None, best) => best.is_none(),
        };
        if improved {
            let value = report.metric(cfg.best_metric).unwrap_or(f64::NAN);
            meta.best = Some(Best { epoch, value });
            meta.epochs_since_best = 0;
            let path = setup.out.join(MODEL_FILE);
            let threshold = choose_threshold(&val_probs, &val_truth, cfg.threshold_rule)?
                .unwrap_or(fracture_eval::DEFAULT_THRESHOLD);
            let operating = EvalReport::new(&val_probs, &val_truth, threshold)?;
            save_best(
                eval_model,
                setup,
                &report,
                threshold,
                &operating,
                meta.pretrained.as_ref(),
                &path,
            )?;
            on_event(Event::Saved {
                what: "best model",
                path: &path,
            });
        } else {
            meta.epochs_since_best += 1;
        }
        let metrics_path = setup.out.join(METRICS_FILE);
        write_atomic(&metrics_path, metrics_csv(&meta.history).as_bytes())
            .map_err(|e| Error::io(&metrics_path, e))?;
        save_checkpoint(
            &checkpoint_path,
            &model,
            &adam,
            ema.as_ref().map(Ema::model),
            &meta,
        )?;
        on_event(Event::Saved {
            what: "checkpoint",
            path: &checkpoint_path,
        });
        if stop_early(cfg, &meta) {
            stopped_early = true;
            let best = meta.best.map(|b| b.epoch).unwrap_or(epoch);
            on_event(Event::Notice(&format!(
                "early stopping: no improvement of {} for {} epochs (best: epoch {best})",
                cfg.best_metric.name(),
                meta.epochs_since_best
            )));
        }
    }

    // The final evaluation reads the best model back from its file: what is reported is what was saved.
    let best_path = setup.out.join(MODEL_FILE);
    let best = TrainedModel::load(&best_path, &setup.device)?;
    let mut reports = BTreeMap::new();
    let (_, val) = evaluate(
        &best.model.net,
        &data.val,
        best.threshold(),
        cfg.batch_size,
        &setup.device,
    )?;
    reports.insert(Split::Val, val);
    if let Some(test) = &data.test {
        let (_, report) = evaluate(
            &best.model.net,
            test,
            best.threshold(),
            cfg.batch_size,
            &setup.device,
        )?;
        reports.insert(Split::Test, report);
    }
    let best_epoch = meta.best.map(|b| b.epoch).unwrap_or(meta.epoch);
    let run_report = RunReport {
        model: MODEL_FILE.into(),
        best_epoch,
        best_metric: cfg.best_metric.name().into(),
        threshold: best.threshold(),
        threshold_rule: cfg.threshold_rule,
        splits: reports.clone(),
    };
    let report_path = setup.out.join(REPORT_FILE);
    let text = serde_json::to_string_pretty(&run_report).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    write_atomic(&report_path, text.as_bytes()).map_err(|e| Error::io(&report_path, e))?;
    on_event(Event::Saved {
        what: "report",
        path: &report_path,
    });
    let curves = setup.out.join(crate::TRAINING_CURVES_FILE);
    crate::write_training_curves(&curves, &meta.history)?;
    on_event(Event::Saved {
        what: "training curves",
        path: &curves,
    });

    Ok(TrainOutcome {
        out: setup.out.clone(),
        best_model: best_path,
        best_epoch,
        epochs_completed: meta.epoch,
        stopped_early,
        history: meta.history,
        reports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn stop_early(cfg: &TrainConfig, meta: &CheckpointMeta) -> bool {
    cfg.early_stopping_patience
        .is_some_and(|p| meta.epochs_since_best >= p)
}

/// The dropout seed of a step: distinct per step, the same in a resumed run.
fn dropout_seed(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step.wrapping_add(1).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

fn prepare_out(out: &Path, checkpoint: &Path, resume: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::io(
            out,
            std::io::Error::other("--out exists and is not a folder"),
        ));
    }
    let exists = checkpoint.is_file();
    if resume && !exists {
        return Err(Error::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason: "nothing to resume: no checkpoint here (start without --resume)".into(),
        });
    }
    if !resume && exists {
        return Err(Error::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason: "this folder already holds a run: pass --resume to continue it, or choose another --out"
                .into(),
        });
    }
    let dir = checkpoint.parent().unwrap_or(out);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Fail now, not after the first epoch, if the folder cannot be written.
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"").map_err(|e| Error::io(out, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Refuses a layout with link problems unless [`TrainSetup::allow_link_problems`]; announces them
/// otherwise.
fn check_links(
    setup: &TrainSetup,
    layout: &DatasetLayout,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<()> {
    let problems = &layout.link_problems;
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = problems.iter().take(5).map(|p| format!("  {p}")).collect();
    let more = match problems.len() {
        n if n > 5 => format!("\n  … and {} more", n - 5),
        _ => String::new(),
    };
    if !setup.allow_link_problems {
        return Err(Error::Data(fracture_data::Error::Layout(format!(
            "{}: {} symbolic link(s) change what this dataset means (they could relabel images or \
             leak validation images into training):\n{}{more}\nremove them, or pass \
             --allow-link-problems to train anyway",
            layout.root.display(),
            problems.len(),
            shown.join("\n")
        ))));
    }
    on_event(Event::Notice(&format!(
        "training despite {} symbolic link problem(s) (--allow-link-problems):\n{}{more}",
        problems.len(),
        shown.join("\n")
    )));
    Ok(())
}

fn load_data(setup: &TrainSetup, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Data> {
    let layout = DatasetLayout::discover(&setup.data)?;
    check_links(setup, &layout, on_event)?;
    let Some(train_items) = layout.split(Split::Train) else {
        return Err(Error::Data(fracture_data::Error::Layout(format!(
            "{}: no train split (expected a `train` folder holding the class folders)",
            layout.root.display()
        ))));
    };
    let (mut train_items, val_items): (Vec<Item>, Vec<Item>) = match layout.split(Split::Val) {
        Some(val) => (train_items.to_vec(), val.to_vec()),
        None => {
            let (kept, held) = stratified_split(train_items, setup.train.val_fraction, setup.train.seed);
            on_event(Event::Notice(&format!(
                "no val split in {}: validating on a seeded stratified {:.0}% of train ({} images)",
                layout.root.display(),
                setup.train.val_fraction * 100.0,
                held.len()
            )));
            (kept, held)
        }
    };
    add_extra_train(setup, &layout, &val_items, &mut train_items, on_event)?;
    let options = LoadOptions {
        disk_cache: setup.cache_dir.clone(),
        limits: setup.limits,
    };
    let mut summary = layout.summary();
    let mut load = |split: Split, items: &[Item]| -> Result<FolderDataset> {
        let ds = FolderDataset::load(items, &setup.preprocess, &options)?;
        let [fractured, not_fractured] = ds.counts();
        summary.update(
            SplitCounts {
                split,
                fractured,
                not_fractured,
            },
            ds.skipped(),
        );
        Ok(ds)
    };
    let train = load(Split::Train, &train_items)?;
    let val = load(Split::Val, &val_items)?;
    let test = layout
        .split(Split::Test)
        .map(|items| load(Split::Test, items))
        .transpose()?;
    on_event(Event::Dataset(&summary));
    for (name, ds) in [("train", &train), ("val", &val)] {
        if ds.counts().contains(&0) {
            return Err(Error::Data(fracture_data::Error::Layout(format!(
                "the {name} split needs readable images of both classes, found {:?} (fractured, not fractured)",
                ds.counts()
            ))));
        }
    }
    let counts = DataCounts {
        train: train.counts(),
        val: val.counts(),
    };
    Ok(Data {
        train,
        val,
        test,
        counts,
    })
}

/// Appends the `train` split of every [`TrainSetup::extra_train`] root to `train`, refusing a root
/// without one and any file that is also one of `val`'s or the main dataset's test images.
fn add_extra_train(
    setup: &TrainSetup,
    layout: &DatasetLayout,
    val: &[Item],
    train: &mut Vec<Item>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<()> {
    if setup.extra_train.is_empty() {
        return Ok(());
    }
    let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let held: std::collections::HashSet<PathBuf> = val
        .iter()
        .chain(layout.split(Split::Test).unwrap_or(&[]))
        .map(|i| key(&i.path))
        .collect();
    for root in &setup.extra_train {
        let extra = DatasetLayout::discover(root)?;
        check_links(setup, &extra, on_event)?;

        let Some(items) = extra.split(Split::Train) else {
            return Err(Error::Data(fracture_data::Error::Layout(format!(
                "{}: extra training data needs a `train` folder holding the class folders",
                extra.root.display()
            ))));
        };
        if let Some(clash) = items.iter().find(|i| held.contains(&key(&i.path))) {
            return Err(Error::Data(fracture_data::Error::Layout(format!(
                "{}: an extra training image is also a validation or test image",
                clash.path.display()
            ))));
        }
        on_event(Event::Notice(&format!(
            "adding {} training images from {}",
            items.len(),
            extra.root.display()
        )));
        train.extend_from_slice(items);
    }
    Ok(())
}

fn save_best(
    model: &Model,
    setup: &TrainSetup,
    report: &EpochReport,
    threshold: f64,
    operating: &EvalReport,
    pretrained: Option<&fracture_model::PretrainedOrigin>,
    path: &Path,
) -> Result<()> {
    let meta = ModelMeta {
        preprocess: setup.preprocess,
        threshold,
        threshold_rule: Some(setup.train.threshold_rule),
        train: Some(setup.train.clone()),
        validation: Some(report.clone()),
        operating_point: Some(operating.clone()),
        pretrained: pretrained.cloned(),
    };
    Ok(model.save(path, &meta.to_metadata()?)?)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// The metrics table: one row per epoch.
pub fn metrics_csv(history: &[EpochReport]) -> String {
    let mut out = String::from(
        "epoch,train_loss,val_loss,val_accuracy,val_sensitivity,val_specificity,val_roc_auc,lr,seconds,images_per_s\n",
    );
    for r in history {
        out.push_str(&format!(
            "{},{:.6},{:.6},{},{},{},{},{:e},{:.3},{:.2}\n",
            r.epoch,
            r.train_loss,
            r.val_loss,
            fmt_opt(r.val.accuracy),
            fmt_opt(r.val.sensitivity),
            fmt_opt(r.val.specificity),
            fmt_opt(r.val.roc_auc),
            r.lr,
            r.seconds,
            r.images_per_s
        ));
    }
    out
}
