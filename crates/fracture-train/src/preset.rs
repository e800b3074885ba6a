//! Named training recipes: the original project's, and the one recommended for clinical radiographs.

use fracture_data::{AugmentConfig, PreprocessConfig, ResizeMode};
use fracture_model::ModelConfig;

use crate::{AdamConfig, BestMetric, LrSchedule, PosWeight, TrainConfig};

/// A named recipe: `fracture train --preset NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// The original project: the seed CNN at 128 × 128 (stretched), 10 epochs, Adam 1e-3, batch 32,
    /// its augmentation, unweighted loss.
    #[default]
    Original,
    /// The recipe recommended for clinical radiographs (see [`Preset::recipe`]).
    Radiograph,
}

/// What a preset fixes: the network, the preprocessing and the training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The network.
    pub model: ModelConfig,
    /// How files become inputs.
    pub preprocess: PreprocessConfig,
    /// How it is trained.
    pub train: TrainConfig,
}

impl Preset {
    /// The name `--preset` takes.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Original => "original",
            Preset::Radiograph => "radiograph",
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
                    augment: Some(AugmentConfig {
                        rotation_deg: 10.0,
                        horizontal_flip: true,
                        vertical_flip: false,
                        zoom: [0.9, 1.15],
                        shift: 0.08,
                        brightness: 0.08,
                        contrast: 0.2,
                        gamma: 0.3,
                        ..AugmentConfig::default()
                    }),
                    best_metric: BestMetric::RocAuc,
                    ..TrainConfig::default()
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_consistent() {
        for preset in [Preset::Original, Preset::Radiograph] {
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
    }
}
