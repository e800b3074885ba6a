//! A run in progress: the network, its optimizer and moving average, and the state a checkpoint
//! keeps; one epoch of steps, and validation.

use std::path::Path;
use std::time::Instant;

use candle_core::ModuleT;
use fracture_data::{Augmenter, BatchAugment, FolderDataset, PreprocessConfig, epoch_order, make_batch};
use fracture_eval::EvalReport;
use fracture_fs::AtPath;
use fracture_model::Model;

use crate::checkpoint::{
    CheckpointMeta, DataSetFingerprint, read_checkpoint, restore, resume_mismatch, save_checkpoint,
};
use crate::ema::Ema;
use crate::inputs::Data;
use crate::loss::localization_loss;
use crate::supervision::BoxTargets;
use crate::{
    Adam, Error, Event, PosWeight, Result, TrainSetup, batch_to_tensors, bce_with_logits, mean_loss,
    predict_logits, sigmoid, truth,
};

/// Batches prepared ahead of the one being trained on.
const PREFETCH: usize = 2;

/// The network, its optimizer, its moving average and the run's state, from the first step to the
/// last checkpoint.
pub(crate) struct Session {
    pub(crate) model: Model,
    adam: Adam,
    ema: Option<Ema>,
    /// What the checkpoint records besides the tensors (epoch, step, best epoch, history).
    pub(crate) meta: CheckpointMeta,
    pos_weight: Option<f64>,
}

/// The training half of an epoch.
pub(crate) struct EpochTraining {
    /// Mean training loss over the epoch's images.
    pub(crate) loss: f64,
    /// Images trained on.
    pub(crate) images: usize,
    /// The learning rate of the last step.
    pub(crate) lr: f64,
    /// Wall time of the steps, seconds.
    pub(crate) seconds: f64,
}

/// Validation of an epoch: P(fractured) per image, the truth, and the loss.
pub(crate) struct Validation {
    pub(crate) probabilities: Vec<f64>,
    pub(crate) truth: Vec<bool>,
    pub(crate) loss: f64,
    /// Metrics at the default threshold 0.5.
    pub(crate) report: EvalReport,
}

impl Session {
    /// A fresh session (seeded initialisation, pretrained backbone when asked) or, when resuming,
    /// the one the checkpoint at `checkpoint` holds (refused when its settings differ).
    pub(crate) fn start(
        setup: &TrainSetup,
        preprocess: PreprocessConfig,
        data: &Data,
        checkpoint: &Path,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Session> {
        let cfg = &setup.train;
        let pos_weight = positive_weight(cfg, data, on_event);
        let model = new_model(setup, on_event)?;
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
            // The classification and localization heads (`head.*`) start from scratch.
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
            preprocess,
            train: cfg.clone(),
            data: data.counts,
            best: None,
            epochs_since_best: 0,
            history: Vec::new(),
            pretrained,
            data_set: None,
        };
        let data_set = data_set_fingerprint(setup, data)?;
        meta.data_set = Some(data_set.clone());
        if setup.resume {
            let (old, mut tensors) = read_checkpoint(checkpoint, &setup.device)?;
            let why = resume_mismatch(&old, &setup.model, &preprocess, cfg, &data.counts).or_else(|| {
                old.data_set
                    .as_ref()
                    .and_then(|recorded| recorded.mismatch(&data_set, (data.train.items(), data.val.items())))
            });
            if let Some(why) = why {
                return Err(Error::RunFolder {
                    path: checkpoint.to_path_buf(),
                    problem: crate::error::RunFolderProblem::SettingsDiffer(why),
                });
            }
            if old.epoch > cfg.epochs {
                return Err(Error::RunFolder {
                    path: checkpoint.to_path_buf(),
                    problem: crate::error::RunFolderProblem::FewerEpochs {
                        trained: old.epoch,
                        requested: cfg.epochs,
                    },
                });
            }
            if old.epoch == cfg.epochs {
                on_event(Event::Notice(&format!(
                    "the run has already trained all {} epochs: nothing to do (ask for more epochs to continue it)",
                    cfg.epochs
                )));
            }
            restore(
                checkpoint,
                &mut tensors,
                &old,
                &model,
                &mut adam,
                ema.as_ref().map(Ema::model),
            )?;
            meta = CheckpointMeta {
                train: cfg.clone(),
                data_set: Some(data_set),
                ..old
            };
            on_event(Event::Notice(&format!(
                "resuming after epoch {} (step {})",
                meta.epoch, meta.step
            )));
        }
        Ok(Session {
            model,
            adam,
            ema,
            meta,
            pos_weight,
        })
    }

    /// The weights that are validated and saved: the moving average when there is one.
    pub(crate) fn eval_model(&self) -> &Model {
        self.ema.as_ref().map_or(&self.model, Ema::model)
    }

    /// One epoch of optimizer steps over `train` in the seeded order of `epoch`, the next batch
    /// decoded and augmented on another thread while this one trains. A non-finite loss stops it.
    pub(crate) fn train_epoch(
        &mut self,
        setup: &TrainSetup,
        train: &FolderDataset,
        augmenter: Option<&Augmenter>,
        boxes: Option<&BoxTargets>,
        epoch: usize,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<EpochTraining> {
        let cfg = &setup.train;
        let start = Instant::now();
        let n_train = train.len();
        let steps_per_epoch = n_train.div_ceil(cfg.batch_size) as u64;
        let total_steps = steps_per_epoch * cfg.epochs as u64;
        let order = epoch_order(n_train, cfg.seed, epoch as u64, true);
        on_event(Event::EpochStart {
            epoch,
            epochs: cfg.epochs,
            steps: steps_per_epoch as usize,
            images: n_train,
        });
        let (mut loss_sum, mut seen, mut lr) = (0.0, 0usize, cfg.adam.lr);
        let mut loc_sum = 0.0;
        let chunks: Vec<&[usize]> = order.chunks(cfg.batch_size).collect();
        let augment = augmenter.map(|a| BatchAugment {
            augment: a,
            seed: cfg.seed,
            epoch: epoch as u64,
        });
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel(PREFETCH);
            let chunks = &chunks;
            scope.spawn(move || {
                for chunk in chunks {
                    if tx.send(make_batch(train, chunk, augment)).is_err() {
                        break;
                    }
                }
            });
            for (i, batch) in rx.iter().enumerate() {
                let batch = batch?;
                let (x, y) = batch_to_tensors(&batch, &setup.device)?;
                self.model
                    .net
                    .set_dropout_seed(dropout_seed(cfg.seed, self.meta.step));
                let loss = match boxes {
                    None => bce_with_logits(&self.model.net.forward_t(&x, true)?, &y, self.pos_weight)?,
                    Some(boxes) => {
                        let (logits, map) = self.model.net.forward_with_map(&x, true)?;
                        let t = boxes.batch(
                            &batch.indices,
                            augmenter.map(|a| (a, cfg.seed, epoch as u64)),
                            &setup.device,
                        )?;
                        let loc = localization_loss(&map, &t.coverage, &t.cell_weight, &t.point_weight)?;
                        loc_sum += f64::from(loc.to_scalar::<f32>()?) * batch.len() as f64;
                        (bce_with_logits(&logits, &y, self.pos_weight)? + loc.affine(cfg.box_weight, 0.0)?)?
                    }
                };
                let value = f64::from(loss.to_scalar::<f32>()?);
                if !value.is_finite() {
                    return Err(Error::NonFiniteLoss {
                        epoch,
                        step: i + 1,
                        value,
                    });
                }
                lr = cfg.lr_at(self.meta.step, steps_per_epoch, total_steps);
                self.adam.backward_step(&loss, lr)?;
                if let Some(ema) = &self.ema {
                    ema.update(&self.model, self.meta.step)?;
                }
                self.meta.step += 1;
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
        })?;
        if boxes.is_some() {
            on_event(Event::Notice(&format!(
                "epoch {epoch}: localization loss {:.4} (included, weighted by {}, in the training loss)",
                loc_sum / seen.max(1) as f64,
                cfg.box_weight
            )));
        }
        Ok(EpochTraining {
            loss: loss_sum / seen.max(1) as f64,
            images: seen,
            lr,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Refuses weights that are no longer all finite after `epoch`, naming the first such parameter.
    pub(crate) fn check_weights(&self, epoch: usize) -> Result<()> {
        for (param, var) in self.model.named_vars() {
            // 0·x is 0 for every finite x and NaN for NaN and ±∞, so the sum is 0 exactly when all are finite.
            if var.as_tensor().affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()? != 0.0 {
                return Err(Error::NonFiniteWeights { epoch, param });
            }
        }
        Ok(())
    }

    /// Predicts the validation images with [`Session::eval_model`]; a non-finite output stops the run.
    pub(crate) fn validate(
        &self,
        setup: &TrainSetup,
        val: &FolderDataset,
        epoch: usize,
    ) -> Result<Validation> {
        // Through a copy of the current weights that records no autograd graph: a fraction of the
        // memory of a pass through the variables, which keeps every activation of a batch alive.
        let net = self.eval_model().inference_net()?;
        let logits = predict_logits(&net, val, setup.train.batch_size, &setup.device)?;
        if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                epoch,
                value: f64::from(*bad),
            });
        }
        let probabilities: Vec<f64> = logits.iter().map(|&l| sigmoid(l)).collect();
        let truth = truth(val);
        let report = EvalReport::new(&probabilities, &truth, fracture_eval::DEFAULT_THRESHOLD)?;
        Ok(Validation {
            loss: mean_loss(&logits, val, self.pos_weight)?,
            probabilities,
            truth,
            report,
        })
    }

    /// Writes the checkpoint (weights, optimizer moments, moving average, [`Session::meta`]) atomically.
    pub(crate) fn save_checkpoint(&self, path: &Path) -> Result<()> {
        save_checkpoint(
            path,
            &self.model,
            &self.adam,
            self.ema.as_ref().map(Ema::model),
            &self.meta,
        )
    }
}

/// What the run trains on exactly (see [`DataSetFingerprint`]): the loaded images, the box file's
/// SHA-256 and the data-shaping options.
fn data_set_fingerprint(setup: &TrainSetup, data: &Data) -> Result<DataSetFingerprint> {
    let boxes = match &setup.boxes {
        Some(path) => {
            let bytes = std::fs::read(path).at(path)?;
            Some(crate::audit::sha256_hex(&bytes))
        }
        None => None,
    };
    let extra: Vec<String> = setup
        .extra_train
        .iter()
        .map(|p| fracture_data::path_text(p))
        .collect();
    let options = vec![
        ("extra_train".to_string(), extra.join(", ")),
        (
            "allow_partial".to_string(),
            setup.limits.allow_partial.to_string(),
        ),
        ("exclude_leaks".to_string(), setup.exclude_leaks.to_string()),
    ];
    Ok(DataSetFingerprint::of(
        data.train.items(),
        data.val.items(),
        boxes,
        options,
    ))
}

/// The dropout seed of a step: distinct per step, the same in a resumed run.
fn dropout_seed(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step.wrapping_add(1).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// The positive-class weight of the loss `cfg` asks for: none, a value, or (auto) the training
/// split's negatives per positive, announced.
fn positive_weight(
    cfg: &crate::config::TrainConfig,
    data: &Data,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Option<f64> {
    match cfg.pos_weight {
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
    }
}

/// The seeded network of `setup` with its kernels at the recipe's precision (a note says where the
/// BF16 products run) and batch norm frozen when the recipe says so.
fn new_model(setup: &TrainSetup, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Model> {
    let cfg = &setup.train;
    let mut model = Model::new(&setup.model, cfg.seed, &setup.device)?;
    model.net.set_kernels(
        setup
            .kernels
            .with_precision(cfg.precision)
            .map_err(|why| crate::Error::InvalidConfig(why.into()))?,
    );
    let device_note = fracture_model::bf16_device_note(&setup.device);
    if let (fracture_model::Kernels::Bf16, Some(note)) = (model.net.kernels(), &device_note) {
        on_event(Event::Notice(note));
    } else if model.net.kernels() == fracture_model::Kernels::Bf16 {
        let status = fracture_kernels::bf16_status();
        on_event(Event::Notice(&format!(
            "precision bf16: matrix products on {} ({})",
            status.backend, status.reason
        )));
    }
    model.net.set_frozen_batch_norm(cfg.freeze_batch_norm);
    Ok(model)
}
