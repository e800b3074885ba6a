//! The networks.

use std::sync::Mutex;

use candle_core::{ModuleT, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::kernels::{self, ConvSpec, Kernels};
use crate::{ArchConfig, Error, ModelConfig, Result, SeedConfig};

/// The seed network's convolutions: 3×3, stride 1, no padding, ReLU.
pub(crate) const SEED_CONV: ConvSpec = ConvSpec {
    kernel: 3,
    stride: 1,
    padding: 0,
    relu: true,
};

/// A binary fracture classifier.
///
/// Input: `(B, 1, S, S)` f32 with `S = config.image_size` (preprocessed radiographs, in [0, 1] unless
/// standardized). Output of [`ModuleT::forward_t`]: the fracture logits, `(B,)`;
/// `sigmoid(logit)` = P(fractured). With `train = true`, dropout is active and draws its masks from
/// the network's own generator (see [`FractureNet::set_dropout_seed`]).
///
/// Parameter names (the keys in weight files): `conv1.weight`, `conv1.bias`, `conv2.*`, `fc1.*`,
/// `fc2.*` for the seed architecture.
#[derive(Debug)]
pub struct FractureNet {
    config: ModelConfig,
    pub(crate) inner: Inner,
    dropout_rng: Mutex<ChaCha8Rng>,
    pub(crate) kernels: Kernels,
}

#[derive(Debug)]
pub(crate) enum Inner {
    Seed(SeedNet),
}

#[derive(Debug)]
pub(crate) struct SeedNet {
    pub(crate) conv1: Conv2d,
    pub(crate) conv2: Conv2d,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    p_flatten: f32,
    p_dense: f32,
}

impl FractureNet {
    /// Builds the network described by `config`, taking (or creating) its parameters from `vb`.
    pub fn new(config: &ModelConfig, vb: VarBuilder<'_>) -> Result<Self> {
        config.validate()?;
        let inner = match &config.arch {
            ArchConfig::Seed(s) => Inner::Seed(SeedNet::new(config.image_size, s, vb)?),
        };
        Ok(FractureNet {
            config: config.clone(),
            inner,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
            kernels: Kernels::default(),
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Chooses our CPU kernels (the default) or candle's own operations; results agree within
    /// floating-point rounding (see [`crate::kernels`]).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// The kernels in use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Restarts the dropout generator from `seed`. A trainer reseeds it at every step so that a
    /// resumed run draws the same masks as an uninterrupted one.
    pub fn set_dropout_seed(&self, seed: u64) {
        if let Ok(mut rng) = self.dropout_rng.lock() {
            *rng = ChaCha8Rng::seed_from_u64(seed);
        }
    }

    /// P(fractured) for each image, `(B,)`, in inference mode (no dropout).
    pub fn probabilities(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::sigmoid(&self.forward_t(xs, false)?)
    }

    pub(crate) fn check_input(&self, xs: &Tensor) -> candle_core::Result<()> {
        let s = self.config.image_size;
        match xs.dims() {
            [_, 1, h, w] if *h == s && *w == s => Ok(()),
            dims => candle_core::bail!("expected input of shape (B, 1, {s}, {s}), got {dims:?}"),
        }
    }

    fn dropout(&self, xs: &Tensor, p: f32, train: bool) -> candle_core::Result<Tensor> {
        if !train || p == 0.0 {
            return Ok(xs.clone());
        }
        let mut rng = self
            .dropout_rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout lock poisoned".into()))?;
        kernels::dropout(xs, p, &mut *rng, self.kernels)
    }
}

impl ModuleT for FractureNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.check_input(xs)?;
        match &self.inner {
            Inner::Seed(net) => {
                let x = conv_pool(&net.conv1, xs, self.kernels)?;
                let x = conv_pool(&net.conv2, &x, self.kernels)?;
                let x = self.dropout(&x.flatten_from(1)?, net.p_flatten, train)?;
                let x = self.dropout(&dense(&net.fc1, &x, true, self.kernels)?, net.p_dense, train)?;
                dense(&net.fc2, &x, false, self.kernels)?.squeeze(1)
            }
        }
    }
}

impl FractureNet {
    /// The seed network up to its last convolutional feature map (after ReLU, before pooling).
    pub(crate) fn features(&self, net: &SeedNet, xs: &Tensor) -> candle_core::Result<Tensor> {
        let x = conv_pool(&net.conv1, xs, self.kernels)?;
        conv(&net.conv2, &x, self.kernels)
    }
}

fn conv_pool(layer: &Conv2d, xs: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
    let bias = layer
        .bias()
        .ok_or_else(|| candle_core::Error::Msg("convolution without bias".into()))?;
    kernels::conv2d_relu_pool2x2(xs, layer.weight(), bias, SEED_CONV, k)
}

fn conv(layer: &Conv2d, xs: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
    let bias = layer
        .bias()
        .ok_or_else(|| candle_core::Error::Msg("convolution without bias".into()))?;
    kernels::conv2d(xs, layer.weight(), bias, SEED_CONV, k)
}

pub(crate) fn dense(layer: &Linear, xs: &Tensor, relu: bool, k: Kernels) -> candle_core::Result<Tensor> {
    let bias = layer
        .bias()
        .ok_or_else(|| candle_core::Error::Msg("dense layer without bias".into()))?;
    kernels::linear(xs, layer.weight(), bias, relu, k)
}

impl SeedNet {
    fn new(image_size: usize, cfg: &SeedConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let side = ModelConfig::seed_feature_side(image_size);
        if side == 0 {
            return Err(Error::InvalidConfig(format!(
                "image_size {image_size} leaves no features after pooling"
            )));
        }
        let conv = Conv2dConfig::default();
        Ok(SeedNet {
            conv1: candle_nn::conv2d(1, cfg.conv1_channels, 3, conv, vb.pp("conv1"))?,
            conv2: candle_nn::conv2d(cfg.conv1_channels, cfg.conv2_channels, 3, conv, vb.pp("conv2"))?,
            fc1: candle_nn::linear(cfg.conv2_channels * side * side, cfg.dense_units, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.dense_units, 1, vb.pp("fc2"))?,
            p_flatten: cfg.dropout_flatten,
            p_dense: cfg.dropout_dense,
        })
    }
}
