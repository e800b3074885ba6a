//! Training settings. Serde data with defaults that reproduce the original project.

use fracture_data::AugmentConfig;
use fracture_eval::ThresholdRule;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The sensitivity the stored operating threshold must reach on the validation images unless told
/// otherwise: a missed fracture is the costliest error.
pub const DEFAULT_TARGET_SENSITIVITY: f64 = 0.9;
/// Adam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    /// Peak learning rate (default 1e-3).
    pub lr: f64,
    /// Decay of the first-moment estimate (default 0.9).
    pub beta1: f64,
    /// Decay of the second-moment estimate (default 0.999).
    pub beta2: f64,
    /// Added to the denominator for stability (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (AdamW style: `p ← p − lr·wd·p` before the Adam update); default 0, plain Adam.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// How the learning rate changes over the run (after the warm-up).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The peak rate throughout (the original project).
    #[default]
    Constant,
    /// Multiply the rate by `gamma` every `every_epochs` epochs.
    Step {
        /// Epochs between decays.
        every_epochs: usize,
        /// Factor applied at each decay.
        gamma: f64,
    },
    /// Cosine decay from the peak rate to `min_lr` at the last step.
    Cosine {
        /// The rate at the end of the run.
        min_lr: f64,
    },
}

/// The weight of the positive (fractured) class in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosWeight {
    /// Both classes weigh 1 (the original project).
    #[default]
    None,
    /// Negatives / positives of the training split, so both classes weigh the same in total.
    Auto,
    /// A fixed weight.
    Value(f64),
}

impl std::str::FromStr for PosWeight {
    type Err = String;

    /// `none`, `auto`, or a positive number.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_lowercase().as_str() {
            "none" | "1" => Ok(PosWeight::None),
            "auto" => Ok(PosWeight::Auto),
            other => match other.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => Ok(PosWeight::Value(v)),
                _ => Err(format!("`{s}` is not `auto`, `none` or a positive number")),
            },
        }
    }
}

/// The validation metric that decides which epoch's model is kept as the best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BestMetric {
    /// Area under the ROC curve (threshold-free; the default).
    #[default]
    RocAuc,
    /// Validation loss (lower is better).
    ValLoss,
    /// Balanced accuracy at the default threshold.
    BalancedAccuracy,
    /// F1 at the default threshold.
    F1,
}

impl BestMetric {
    /// Whether a larger value is better.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, BestMetric::ValLoss)
    }

    /// The name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BestMetric::RocAuc => "roc_auc",
            BestMetric::ValLoss => "val_loss",
            BestMetric::BalancedAccuracy => "balanced_accuracy",
            BestMetric::F1 => "f1",
        }
    }
}

/// Everything about how a model is trained (not what it is, nor how images are preprocessed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training split (default 10).
    pub epochs: usize,
    /// Images per optimizer step (default 32).
    pub batch_size: usize,
    /// The optimizer.
    pub adam: AdamConfig,
    /// The learning-rate schedule after warm-up.
    pub schedule: LrSchedule,
    /// Optimizer steps of linear warm-up from 0 to the peak rate (default 0).
    pub warmup_steps: u64,
    /// Seed of every random choice: initialisation, shuffling, augmentation, dropout (default 42).
    pub seed: u64,
    /// Weight of the fractured class in the loss.
    pub pos_weight: PosWeight,
    /// Augmentation of training images; `None` switches it off. Validation is never augmented.
    pub augment: Option<AugmentConfig>,
    /// Stop when the best metric has not improved for this many epochs; `None` never stops early.
    pub early_stopping_patience: Option<usize>,
    /// The metric that selects the best epoch.
    pub best_metric: BestMetric,
    /// Share of the training split held out (stratified, seeded) when the dataset has no val split.
    pub val_fraction: f64,
    /// How the operating threshold stored with the best model is chosen on the validation images.
    pub threshold_rule: ThresholdRule,
    /// Learning rate of every parameter outside the classification head (`head.*`) relative to
    /// the schedule's (default 1: one rate for all). Below 1, a pretrained backbone moves more
    /// slowly than the freshly initialised head.
    #[serde(default = "one")]
    pub backbone_lr_scale: f64,
    /// Batch norms normalize with their running statistics during training too, and leave them
    /// unchanged (default false: batch statistics, running ones updated).
    #[serde(default)]
    pub freeze_batch_norm: bool,
    /// Decay of an exponential moving average of the weights (e.g. 0.998), which is then what is
    /// validated and saved; `None` (the default) validates the weights as trained.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Weight of the localization loss (`fracture_train::loss::localization_loss`) beside the
    /// classification loss, for a network with a localization head trained from annotated boxes
    /// (`TrainSetup::boxes`); 0 (the default) without boxes.
    #[serde(default)]
    pub box_weight: f64,
    /// The matrix products' operand precision: `fp32` (the default) or `bf16` (BF16 operands, FP32
    /// accumulation; weights, optimizer state, batch-norm statistics and the loss stay FP32; see
    /// [`fracture_model::Kernels::Bf16`]).
    #[serde(default)]
    pub precision: fracture_model::Precision,
}

fn one() -> f64 {
    1.0
}

impl Default for TrainConfig {
    /// The original project: 10 epochs, Adam 1e-3, batch 32, augmentation on; the stored threshold
    /// reaches sensitivity 0.90 on validation.
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 32,
            adam: AdamConfig::default(),
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            seed: 42,
            pos_weight: PosWeight::None,
            augment: Some(AugmentConfig::default()),
            early_stopping_patience: None,
            best_metric: BestMetric::RocAuc,
            val_fraction: 0.2,
            threshold_rule: ThresholdRule::TargetSensitivity {
                target: DEFAULT_TARGET_SENSITIVITY,
            },
            backbone_lr_scale: 1.0,
            freeze_batch_norm: false,
            ema_decay: None,
            box_weight: 0.0,
            precision: fracture_model::Precision::Fp32,
        }
    }
}

impl TrainConfig {
    /// Checks every value, naming the field that is out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::InvalidConfig(format!("{field}: {why}")));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if !(self.box_weight.is_finite() && (0.0..=100.0).contains(&self.box_weight)) {
            return bad("box_weight", format!("{} is not in [0, 100]", self.box_weight));
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            return bad("batch_size", format!("{} is outside 1..=65536", self.batch_size));
        }
        let a = &self.adam;
        if !(a.lr.is_finite() && a.lr > 0.0) {
            return bad("lr", format!("{} must be positive", a.lr));
        }
        if !((0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2)) {
            return bad(
                "adam.beta1/beta2",
                format!("{} and {} must lie in [0, 1)", a.beta1, a.beta2),
            );
        }
        if !(a.eps.is_finite() && a.eps > 0.0) {
            return bad("adam.eps", format!("{} must be positive", a.eps));
        }
        if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
            return bad("weight_decay", format!("{} must be non-negative", a.weight_decay));
        }
        match self.schedule {
            LrSchedule::Constant => {}
            LrSchedule::Step { every_epochs, gamma } => {
                if every_epochs == 0 || !(gamma.is_finite() && gamma > 0.0) {
                    return bad(
                        "schedule",
                        format!("step every {every_epochs} epochs by {gamma} is not valid"),
                    );
                }
            }
            LrSchedule::Cosine { min_lr } => {
                if !(min_lr.is_finite() && min_lr >= 0.0 && min_lr <= a.lr) {
                    return bad("schedule", format!("cosine min_lr {min_lr} must lie in [0, lr]"));
                }
            }
        }
        if let PosWeight::Value(w) = self.pos_weight
            && !(w.is_finite() && w > 0.0)
        {
            return bad("pos_weight", format!("{w} must be positive"));
        }
        if let Some(aug) = &self.augment {
            aug.validate()?;
        }
        if self.early_stopping_patience == Some(0) {
            return bad("early_stopping_patience", "must be at least 1".into());
        }
        if !(self.backbone_lr_scale.is_finite() && self.backbone_lr_scale >= 0.0) {
            return bad(
                "backbone_lr_scale",
                format!("{} must be a non-negative number", self.backbone_lr_scale),
            );
        }
        if let Some(d) = self.ema_decay
            && !(d > 0.0 && d < 1.0)
        {
            return bad("ema_decay", format!("{d} must lie in (0, 1)"));
        }
        if let fracture_eval::ThresholdRule::TargetSensitivity { target } = self.threshold_rule
            && !(target > 0.0 && target <= 1.0)
        {
            return bad("target_sensitivity", format!("{target} must lie in (0, 1]"));
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return bad(
                "val_fraction",
                format!("{} must lie in (0, 1)", self.val_fraction),
            );
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based) in a run of `total_steps` steps with
    /// `steps_per_epoch` steps per epoch.
    pub fn lr_at(&self, step: u64, steps_per_epoch: u64, total_steps: u64) -> f64 {
        let peak = self.adam.lr;
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            LrSchedule::Constant => peak,
            LrSchedule::Step { every_epochs, gamma } => {
                let epoch = step / steps_per_epoch.max(1);
                peak * gamma.powi((epoch / every_epochs.max(1) as u64) as i32)
            }
            LrSchedule::Cosine { min_lr } => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                min_lr + (peak - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    /// The fields whose change makes a checkpoint unusable for resuming, with their values. The number
    /// of epochs and the early-stopping patience may change between a run and its resumption.
    pub fn resume_fingerprint(&self) -> Vec<(&'static str, String)> {
        vec![
            ("batch_size", self.batch_size.to_string()),
            ("adam", format!("{:?}", self.adam)),
            ("schedule", format!("{:?}", self.schedule)),
            ("warmup_steps", self.warmup_steps.to_string()),
            ("seed", self.seed.to_string()),
            ("pos_weight", format!("{:?}", self.pos_weight)),
            ("augment", format!("{:?}", self.augment)),
            ("best_metric", self.best_metric.name().to_string()),
            ("val_fraction", self.val_fraction.to_string()),
            ("backbone_lr_scale", self.backbone_lr_scale.to_string()),
            ("freeze_batch_norm", self.freeze_batch_norm.to_string()),
            ("ema_decay", format!("{:?}", self.ema_decay)),
        ]
    }
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
    pub val: fracture_eval::EvalReport,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Wall time of the epoch (training and validation), seconds.
    pub seconds: f64,
    /// Training images per second (augmentation and batching included).
    pub images_per_s: f64,
    /// Where the BF16 matrix products ran (`amx`, `avx512`, `emulated`, or `fp32` on a processor
    /// without BF16 instructions); `None` for an FP32 run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16_backend: Option<fracture_kernels::Bf16Backend>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_reproduce_the_original_and_validate() {
        let c = TrainConfig::default();
        assert_eq!(
            (c.epochs, c.batch_size, c.adam.lr, c.adam.weight_decay),
            (10, 32, 1e-3, 0.0)
        );
        assert!(c.augment.is_some());
        c.validate().unwrap();
    }

    #[test]
    fn schedules() {
        let mut c = TrainConfig {
            warmup_steps: 4,
            ..TrainConfig::default()
        };
        assert!((c.lr_at(0, 10, 100) - 0.25e-3).abs() < 1e-15);
        assert!((c.lr_at(3, 10, 100) - 1e-3).abs() < 1e-15);
        assert_eq!(c.lr_at(50, 10, 100), 1e-3);
        c.schedule = LrSchedule::Step {
            every_epochs: 2,
            gamma: 0.5,
        };
        assert_eq!(c.lr_at(19, 10, 100), 1e-3);
        assert_eq!(c.lr_at(20, 10, 100), 0.5e-3);
        assert_eq!(c.lr_at(45, 10, 100), 0.25e-3);
        c.schedule = LrSchedule::Cosine { min_lr: 1e-5 };
        assert!((c.lr_at(4, 10, 100) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(100, 10, 100) - 1e-5).abs() < 1e-12);
        assert!(c.lr_at(52, 10, 100) < 0.6e-3 && c.lr_at(52, 10, 100) > 0.4e-3);
    }

    #[test]
    fn invalid_values_name_their_field() {
        for (cfg, field) in [
            (
                TrainConfig {
                    epochs: 0,
                    ..TrainConfig::default()
                },
                "epochs",
            ),
            (
                TrainConfig {
                    batch_size: 0,
                    ..TrainConfig::default()
                },
                "batch_size",
            ),
            (
                TrainConfig {
                    pos_weight: PosWeight::Value(-1.0),
                    ..TrainConfig::default()
                },
                "pos_weight",
            ),
            (
                TrainConfig {
                    val_fraction: 1.0,
                    ..TrainConfig::default()
                },
                "val_fraction",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn pos_weight_parses() {
        assert_eq!("auto".parse::<PosWeight>(), Ok(PosWeight::Auto));
        assert_eq!("4.5".parse::<PosWeight>(), Ok(PosWeight::Value(4.5)));
        assert_eq!("none".parse::<PosWeight>(), Ok(PosWeight::None));
        assert!("-2".parse::<PosWeight>().is_err());
        assert!("lots".parse::<PosWeight>().is_err());
    }
}
