//! Model configurations: which architecture, at which input size, with which widths.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The configuration of a fracture classifier. Saved in every weight file, so a model reloads with
/// no other information.
///
/// JSON form: `{"image_size": 128, "arch": {"kind": "seed", "conv1_channels": 32, ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Side of the square input in pixels: the network takes `(B, 1, image_size, image_size)`.
    pub image_size: usize,
    /// The architecture and its hyper-parameters.
    pub arch: ArchConfig,
}

/// The architectures, each with its own hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ArchConfig {
    /// The original project's CNN (see [`SeedConfig`]).
    Seed(SeedConfig),
    /// A compact residual network for radiographs (see [`ResNetConfig`]).
    Resnet(ResNetConfig),
    /// EfficientNet-Lite0, the backbone of the ImageNet-pretrained weights (see
    /// [`EfficientNetConfig`]).
    #[serde(rename = "efficientnet_lite0")]
    EfficientNetLite0(EfficientNetConfig),
}

/// EfficientNet-Lite0 (Tan & Le, 2019, without squeeze-and-excitation, ReLU6) with one gray input
/// channel and a fracture head:
///
/// stem: Conv 3×3 stride 2, 1→32, BN, ReLU6; 16 mobile inverted bottlenecks in seven stages
/// (kernel, first stride, expansion, channels, blocks: (3,1,1,16,1) (3,2,6,24,2) (5,2,6,40,2)
/// (3,2,6,80,3) (5,1,6,112,3) (5,2,6,192,4) (3,1,6,320,1)), each [1×1 expand, BN, ReLU6] → k×k
/// depthwise, BN, ReLU6 → 1×1 project, BN (+ the input when the shape is unchanged); head: 1×1 conv
/// 320→1280, BN, ReLU6, global average pooling, dropout, Dense 1 (the fracture logit). Every
/// convolution has TensorFlow's "SAME" padding and no bias; batch norms have ε 1e-3. 3.37 M
/// trainable parameters (3.41 M values with the batch-norm statistics). The last feature map is
/// `⌈S/32⌉` per side.
///
/// The ImageNet weights expect inputs scaled as `(v − 127) / 128` for 8-bit values `v`
/// (see `fracture_train::Preset::Finetune`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientNetConfig {
    /// Dropout probability on the pooled features (default 0.2, as the ImageNet network).
    pub dropout: f32,
    /// Weight of a batch's statistics in the batch norms' running statistics (PyTorch convention,
    /// `running = (1 − m)·running + m·batch`; default 0.01, as the ImageNet network).
    pub bn_momentum: f64,
    /// A localization head on the last stride-16 stage (see [`crate::FractureNet::forward_with_map`]):
    /// a map of fracture logits trained from annotated boxes, for the evidence of a prediction.
    /// Off by default; model files written before it existed read as off.
    #[serde(default)]
    pub localization_head: bool,
    /// The localization map's stride, input pixels per cell: 16 (the head reads the last stride-16
    /// stage) or 8 (it also reads the stride-8 stage, the stride-16 features upsampled onto it, for
    /// a map twice as fine). Default 16, what model files written before it existed hold.
    #[serde(default = "sixteen")]
    pub localization_stride: usize,
}

fn sixteen() -> usize {
    16
}

/// The localization head's possible strides ([`EfficientNetConfig::localization_stride`]), input
/// pixels per map cell.
pub const LOCALIZATION_STRIDES: [usize; 2] = [8, 16];

impl Default for EfficientNetConfig {
    fn default() -> Self {
        EfficientNetConfig {
            dropout: 0.2,
            bn_momentum: 0.01,
            localization_head: false,
            localization_stride: 16,
        }
    }
}

/// A compact residual CNN with batch normalization and a global-average-pooling head:
///
/// stem: Conv 3×3 stride 2 → ReLU → MaxPool 2×2 → BatchNorm (`S/4` per side, `widths[0]` channels);
/// then one stage per entry of `widths`, each of `blocks` residual blocks
/// (Conv 3×3 → BN → ReLU → Conv 3×3 → BN, plus the input, → ReLU); every stage after the first
/// halves the side with a stride-2 first convolution and a Conv 1×1 stride 2 → BN shortcut;
/// head: global average pooling → Dropout → Dense 1 (the fracture logit).
///
/// Batch-norm running statistics are stored with the weights (`*.running_mean`, `*.running_var`)
/// but are not trained by the optimizer (see `Model::trainable_vars`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Channels of each stage (default `[24, 48, 96, 192]`); the stem has `widths[0]`.
    pub widths: Vec<usize>,
    /// Residual blocks per stage (default 1).
    pub blocks: usize,
    /// Dropout probability on the pooled features (default 0.2).
    pub dropout: f32,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        ResNetConfig {
            widths: vec![24, 48, 96, 192],
            blocks: 1,
            dropout: 0.2,
        }
    }
}

/// The original CNN: Conv 3×3 → ReLU → MaxPool 2×2 → Conv 3×3 → ReLU → MaxPool 2×2 → Flatten →
/// Dropout → Dense → ReLU → Dropout → Dense 1 (the fracture logit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedConfig {
    /// Output channels of the first convolution (default 32).
    pub conv1_channels: usize,
    /// Output channels of the second convolution (default 64).
    pub conv2_channels: usize,
    /// Units of the hidden dense layer (default 128).
    pub dense_units: usize,
    /// Dropout probability on the flattened features (default 0.5).
    pub dropout_flatten: f32,
    /// Dropout probability after the hidden dense layer (default 0.5).
    pub dropout_dense: f32,
}

impl Default for SeedConfig {
    fn default() -> Self {
        SeedConfig {
            conv1_channels: 32,
            conv2_channels: 64,
            dense_units: 128,
            dropout_flatten: 0.5,
            dropout_dense: 0.5,
        }
    }
}

impl Default for ModelConfig {
    /// The original CNN at 128 × 128.
    fn default() -> Self {
        ModelConfig::seed(128)
    }
}

impl ModelConfig {
    /// The original CNN with its default widths at the given input size.
    pub fn seed(image_size: usize) -> Self {
        ModelConfig {
            image_size,
            arch: ArchConfig::Seed(SeedConfig::default()),
        }
    }

    /// The residual network with its default widths at the given input size.
    pub fn resnet(image_size: usize) -> Self {
        ModelConfig {
            image_size,
            arch: ArchConfig::Resnet(ResNetConfig::default()),
        }
    }

    /// EfficientNet-Lite0 with its default settings at the given input size.
    pub fn efficientnet_lite0(image_size: usize) -> Self {
        ModelConfig {
            image_size,
            arch: ArchConfig::EfficientNetLite0(EfficientNetConfig::default()),
        }
    }

    /// An upper bound on the f32 values of the feature maps one image's forward pass computes (the
    /// sum of every layer's output, as training keeps them; inference holds fewer at once): what the
    /// declared input size implies in memory, ×4 bytes and × the batch. Weights are not counted.
    pub fn activation_values(&self) -> u64 {
        let s = self.image_size as u64;
        match &self.arch {
            ArchConfig::Seed(c) => {
                let (c1, c2) = (c.conv1_channels as u64, c.conv2_channels as u64);
                let a = s.saturating_sub(2);
                let b = (a / 2).saturating_sub(2);
                s * s
                    + c1 * a * a
                    + c1 * (a / 2).pow(2)
                    + c2 * b * b
                    + c2 * (b / 2).pow(2)
                    + c.dense_units as u64
            }
            ArchConfig::Resnet(r) => {
                // Stem: 3×3 stride 2 (conv, norm, activation) then the pool to s/4; each stage's
                // basic blocks keep about six maps of their width (two convolutions, two norms, the
                // activations and the sum), at s/4, s/8, …
                let half = s.div_ceil(2);
                let mut total = s * s + 3 * r.widths.first().copied().unwrap_or(0) as u64 * half * half;
                let mut side = s.div_ceil(4);
                for (i, &w) in r.widths.iter().enumerate() {
                    if i > 0 {
                        side = side.div_ceil(2);
                    }
                    total += 6 * r.blocks.max(1) as u64 * w as u64 * side * side;
                }
                total
            }
            ArchConfig::EfficientNetLite0(_) => {
                // Stem and head: convolution, norm, activation; each inverted bottleneck: the
                // expansion (three maps at the input side), the depthwise stage (three at the output
                // side) and the projection (two).
                let mut side = s.div_ceil(2);
                let mut total = s * s + 3 * crate::efficientnet::STEM_CHANNELS as u64 * side * side;
                let mut cin = crate::efficientnet::STEM_CHANNELS as u64;
                for (_, stride, expansion, cout, repeats) in crate::efficientnet::LITE0_STAGES {
                    for r in 0..repeats {
                        let mid = cin * expansion as u64;
                        let before = side * side;
                        if r == 0 && stride == 2 {
                            side = side.div_ceil(2);
                        }
                        let after = side * side;
                        total += 3 * mid * before + 3 * mid * after + 2 * cout as u64 * after;
                        cin = cout as u64;
                    }
                }
                total + 3 * crate::efficientnet::HEAD_CHANNELS as u64 * side * side
            }
        }
    }

    /// The weights whose number grows with the input size: the seed CNN's first dense layer
    /// (flattened features × units, plus its bias); 0 for the architectures that pool globally.
    pub fn input_dependent_weight_values(&self) -> u64 {
        match &self.arch {
            ArchConfig::Seed(c) => {
                let side = ((self.image_size as u64).saturating_sub(2) / 2).saturating_sub(2) / 2;
                let units = c.dense_units as u64;
                c.conv2_channels as u64 * side * side * units + units
            }
            _ => 0,
        }
    }

    /// The memory the declared input size implies for one image, in bytes: its feature maps
    /// ([`ModelConfig::activation_values`]) and the weights that grow with it, as f32.
    pub fn input_implied_bytes(&self) -> u64 {
        self.activation_values()
            .saturating_add(self.input_dependent_weight_values())
            .saturating_mul(4)
    }

    /// The architecture's short name, as `--arch` spells it (`seed`, `resnet`, `efficientnet-lite0`).
    pub fn arch_name(&self) -> &'static str {
        match self.arch {
            ArchConfig::Seed(_) => "seed",
            ArchConfig::Resnet(_) => "resnet",
            ArchConfig::EfficientNetLite0(_) => "efficientnet-lite0",
        }
    }

    /// The smallest input size the architecture accepts.
    pub fn min_image_size(&self) -> usize {
        match &self.arch {
            // conv 3×3 (−2), pool /2, conv 3×3 (−2), pool /2 must leave at least 1 × 1.
            ArchConfig::Seed(_) => 10,
            // stem /4, then /2 per later stage, must leave at least 1 × 1.
            ArchConfig::Resnet(r) => 4usize << r.widths.len().saturating_sub(1).min(10),
            // Five stride-2 layers ("SAME" padding rounds up, so any size works; below 32 the
            // last map is a single position).
            ArchConfig::EfficientNetLite0(_) => 32,
        }
    }

    /// Checks sizes, widths and probabilities, naming the offending field.
    ///
    /// The input size must reach the architecture's minimum ([`ModelConfig::min_image_size`]) and
    /// imply at most [`MAX_IMAGE_BYTES`](crate::MAX_IMAGE_BYTES) per image
    /// ([`ModelConfig::input_implied_bytes`]); the range of sizes a preprocessing step accepts is
    /// `fracture_data::SIZE_RANGE`, checked where images are prepared, not here.
    pub fn validate(&self) -> Result<()> {
        let min = self.min_image_size();
        if self.image_size < min {
            return Err(Error::InvalidConfig(format!(
                "image_size {} is below {min}, the smallest input of the {} architecture",
                self.image_size,
                self.arch_name()
            )));
        }
        let implied = self.input_implied_bytes();
        if implied > crate::MAX_IMAGE_BYTES {
            return Err(Error::InvalidConfig(format!(
                "its input of {0} × {0} px implies about {1:.1} GB per image (feature maps and \
                 size-dependent weights), over the {2:.1} GB a model may take",
                self.image_size,
                implied as f64 / 1e9,
                crate::MAX_IMAGE_BYTES as f64 / 1e9
            )));
        }
        match &self.arch {
            ArchConfig::Seed(s) => {
                for (name, v) in [
                    ("conv1_channels", s.conv1_channels),
                    ("conv2_channels", s.conv2_channels),
                    ("dense_units", s.dense_units),
                ] {
                    if v == 0 || v > 4096 {
                        return Err(Error::InvalidConfig(format!(
                            "arch.{name} = {v} is outside 1..=4096"
                        )));
                    }
                }
                for (name, p) in [
                    ("dropout_flatten", s.dropout_flatten),
                    ("dropout_dense", s.dropout_dense),
                ] {
                    if !(0.0..1.0).contains(&p) {
                        return Err(Error::InvalidConfig(format!(
                            "arch.{name} = {p} is outside [0, 1)"
                        )));
                    }
                }
            }
            ArchConfig::Resnet(r) => {
                if r.widths.is_empty() || r.widths.len() > 8 {
                    return Err(Error::InvalidConfig(format!(
                        "arch.widths has {} stages; 1..=8 are supported",
                        r.widths.len()
                    )));
                }
                if let Some(w) = r.widths.iter().find(|&&w| w == 0 || w > 4096) {
                    return Err(Error::InvalidConfig(format!(
                        "arch.widths contains {w}, outside 1..=4096"
                    )));
                }
                if r.blocks == 0 || r.blocks > 16 {
                    return Err(Error::InvalidConfig(format!(
                        "arch.blocks = {} is outside 1..=16",
                        r.blocks
                    )));
                }
                if !(0.0..1.0).contains(&r.dropout) {
                    return Err(Error::InvalidConfig(format!(
                        "arch.dropout = {} is outside [0, 1)",
                        r.dropout
                    )));
                }
            }
            ArchConfig::EfficientNetLite0(e) => {
                if !(0.0..1.0).contains(&e.dropout) {
                    return Err(Error::InvalidConfig(format!(
                        "arch.dropout = {} is outside [0, 1)",
                        e.dropout
                    )));
                }
                if !(e.bn_momentum > 0.0 && e.bn_momentum <= 1.0) {
                    return Err(Error::InvalidConfig(format!(
                        "arch.bn_momentum = {} is outside (0, 1]",
                        e.bn_momentum
                    )));
                }
                if !LOCALIZATION_STRIDES.contains(&e.localization_stride) {
                    return Err(Error::InvalidConfig(format!(
                        "arch.localization_stride = {} is not one of {LOCALIZATION_STRIDES:?}",
                        e.localization_stride
                    )));
                }
            }
        }
        Ok(())
    }

    /// Spatial side of the feature map after the second pooling of the seed network.
    pub(crate) fn seed_feature_side(image_size: usize) -> usize {
        let a = (image_size.saturating_sub(2)) / 2;
        a.saturating_sub(2) / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_names_the_arch() {
        let cfg = ModelConfig::seed(224);
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains(r#""kind":"seed""#), "{json}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), cfg);
        let unknown = r#"{"image_size":64,"arch":{"kind":"resnet9000"}}"#;
        assert!(serde_json::from_str::<ModelConfig>(unknown).is_err());
    }

    #[test]
    fn validation_catches_small_images_and_bad_dropout() {
        assert!(ModelConfig::seed(10).validate().is_ok());
        let err = ModelConfig::seed(9).validate().unwrap_err().to_string();
        assert!(err.contains("image_size 9"), "{err}");
        let mut cfg = ModelConfig::seed(32);
        let ArchConfig::Seed(s) = &mut cfg.arch else {
            unreachable!()
        };
        s.dropout_dense = 1.0;
        assert!(cfg.validate().unwrap_err().to_string().contains("dropout_dense"));
    }

    #[test]
    fn resnet_validation_names_fields() {
        assert!(ModelConfig::resnet(32).validate().is_ok());
        // What the declared input size implies: small for the presets' sizes, gigabytes at 4096.
        let gb = |c: ModelConfig| c.activation_values() as f64 * 4.0 / 1e9;
        assert!(gb(ModelConfig::seed(128)) < 0.01);
        assert!(gb(ModelConfig::resnet(256)) < 0.1);
        assert!(gb(ModelConfig::efficientnet_lite0(320)) < 0.5);
        assert!(
            gb(ModelConfig::resnet(4096)) > 2.0,
            "{}",
            gb(ModelConfig::resnet(4096))
        );
        assert!(gb(ModelConfig::efficientnet_lite0(4096)) > 2.0);
        assert!(gb(ModelConfig::resnet(512)) > 4.0 * gb(ModelConfig::resnet(256)) * 0.99);
        // The seed CNN's dense layer grows with the input: 4096 px would need tens of gigabytes.
        assert!(ModelConfig::seed(4096).input_implied_bytes() > 20 << 30);
        assert!(ModelConfig::seed(128).input_implied_bytes() < 64 << 20);

        let err = ModelConfig::resnet(31).validate().unwrap_err().to_string();

        assert!(err.contains("image_size 31") && err.contains("resnet"), "{err}");
        let mut cfg = ModelConfig::resnet(64);
        let ArchConfig::Resnet(r) = &mut cfg.arch else {
            unreachable!()
        };
        r.widths = vec![];
        assert!(cfg.validate().unwrap_err().to_string().contains("arch.widths"));
        let json = serde_json::to_string(&ModelConfig::resnet(256)).unwrap();
        assert!(json.contains(r#""kind":"resnet""#), "{json}");
    }

    #[test]
    fn efficientnet_config_round_trips_and_validates() {
        let cfg = ModelConfig::efficientnet_lite0(224);
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains(r#""kind":"efficientnet_lite0""#), "{json}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), cfg);
        assert_eq!(cfg.arch_name(), "efficientnet-lite0");
        cfg.validate().unwrap();
        let err = ModelConfig::efficientnet_lite0(16)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("image_size 16"), "{err}");
        let mut bad = cfg.clone();
        let ArchConfig::EfficientNetLite0(e) = &mut bad.arch else {
            unreachable!()
        };
        e.bn_momentum = 0.0;
        assert!(bad.validate().unwrap_err().to_string().contains("bn_momentum"));
    }

    #[test]
    fn feature_side_matches_the_layer_arithmetic() {
        // 128 → conv 126 → pool 63 → conv 61 → pool 30 (PyTorch's floor division).
        assert_eq!(ModelConfig::seed_feature_side(128), 30);
        assert_eq!(ModelConfig::seed_feature_side(224), 54);
        assert_eq!(ModelConfig::seed_feature_side(10), 1);
    }
}
