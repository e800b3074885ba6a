//! The networks.

use std::sync::Mutex;

use candle_core::{ModuleT, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::efficientnet::EfficientNet;
use crate::kernels::{self, Activation, ConvSpec, Kernels};
use crate::layers::{BatchNorm, Stats};
use crate::onnx::graph::{Act, ConvAttrs, Graph};
use crate::{ArchConfig, Error, ModelConfig, ResNetConfig, Result, SeedConfig};

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
/// Batch norms (residual network, EfficientNet) use the batch's statistics when `train` is true,
/// unless they are frozen ([`FractureNet::set_frozen_batch_norm`]).
///
/// Parameter names (the keys in weight files): `conv1.weight`, `conv1.bias`, `conv2.*`, `fc1.*`,
/// `fc2.*` for the seed architecture; `stem.*`, `stage{i}.block{j}.*` and `head.fc.*` for the
/// residual one (see [`crate::ResNetConfig`]); the `efficientnet_pytorch` names (`_conv_stem`,
/// `_blocks.{i}.*`, `_conv_head`, `_bn1`) and `head.fc.*` for EfficientNet-Lite0.
#[derive(Debug)]
pub struct FractureNet {
    config: ModelConfig,
    pub(crate) inner: Inner,
    dropout_rng: Mutex<ChaCha8Rng>,
    pub(crate) kernels: Kernels,
    frozen_bn: bool,
}

#[derive(Debug)]
pub(crate) enum Inner {
    Seed(SeedNet),
    Resnet(ResNet),
    EfficientNet(EfficientNet),
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
            ArchConfig::Resnet(r) => Inner::Resnet(ResNet::new(r, vb)?),
            ArchConfig::EfficientNetLite0(e) => Inner::EfficientNet(EfficientNet::new(e, vb)?),
        };
        Ok(FractureNet {
            config: config.clone(),
            inner,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
            kernels: Kernels::default(),
            frozen_bn: false,
        })
    }

    /// Freezes the batch norms: in training mode they too normalize with their running statistics
    /// and leave them unchanged (their scale and shift still train). Off by default.
    pub fn set_frozen_batch_norm(&mut self, frozen: bool) {
        self.frozen_bn = frozen;
    }

    /// Whether the batch norms are frozen.
    pub fn frozen_batch_norm(&self) -> bool {
        self.frozen_bn
    }

    /// Declares the weights fixed: the network was built from copies that nothing changes (as
    /// [`crate::Model::inference_net`] builds it), so layers may prepare them once for inference.
    pub(crate) fn freeze_weights(&mut self) {
        if let Inner::EfficientNet(net) = &mut self.inner {
            net.freeze_weights();
        }
    }

    /// The statistics the batch norms use in a pass with this training flag.
    pub(crate) fn bn_stats(&self, train: bool) -> Stats {
        if train && !self.frozen_bn {
            Stats::Batch
        } else {
            Stats::Running
        }
    }

    /// The globally average-pooled features of the last feature map, `(B, C)`, in inference mode:
    /// what the fracture head sees (residual network: `C` = its last width; EfficientNet-Lite0:
    /// 1280). The seed network has no pooled features and answers an error.
    pub fn pooled_features(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.check_input(xs)?;
        on_cpu_pool(xs, || match &self.inner {
            Inner::Seed(_) => candle_core::bail!("the seed network has no pooled features"),
            Inner::Resnet(net) => self.resnet_features(net, xs, false)?.mean(3)?.mean(2),
            Inner::EfficientNet(net) => net.pooled(xs, Stats::Running, self.kernels),
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

    /// Whether the network has a localization head (EfficientNet-Lite0 with
    /// `localization_head` set).
    pub fn has_localization_head(&self) -> bool {
        matches!(&self.inner, Inner::EfficientNet(net) if net.loc.is_some())
    }

    /// The localization head's grid for this network's input size: `(cells, offset, stride)`, a
    /// `cells × cells` map whose cell `i` is centred on input pixel index `offset + stride · i`
    /// (pixel centres at integers). `None` without the head.
    pub fn localization_grid(&self) -> Option<(usize, f32, f32)> {
        let Inner::EfficientNet(net) = &self.inner else {
            return None;
        };
        net.loc.as_ref()?;
        let size = self.config.image_size;
        let (offset, stride) = net.geometry_until(size, net.localization_blocks());
        Some((size.div_ceil(stride as usize), offset, stride))
    }

    /// The fracture logits `(B,)` (as [`ModuleT::forward_t`]) and the localization head's map of
    /// logits `(B, ⌈S/s⌉, ⌈S/s⌉)` for its stride `s` (16 or 8), from one pass: the head reads the
    /// output of the last stride-16 stage (and at stride 8 the last stride-8 stage), cell `(i, j)`
    /// centred on input pixel `offset + s·(i, j)` (see [`FractureNet::localization_grid`] and
    /// [`FractureNet::grad_cams_at`] with [`crate::CamLayer::Head`]). `sigmoid` of a cell is the
    /// head's P(a fracture lies in it). An error for a network without the head.
    pub fn forward_with_map(&self, xs: &Tensor, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
        self.check_input(xs)?;
        let Inner::EfficientNet(net) = &self.inner else {
            candle_core::bail!(
                "this network has no localization head (only EfficientNet-Lite0 can have one)"
            );
        };
        let Some(loc) = &net.loc else {
            candle_core::bail!("this network has no localization head (it was trained without boxes)");
        };
        let stats = self.bn_stats(train);
        on_cpu_pool(xs, || {
            let (s8, s16) = (net.blocks_up_to_stride(8), net.stride16_blocks());
            let a8 = net.features_until(xs, stats, self.kernels, s8)?;
            let a16 = net.blocks_between(&a8, stats, self.kernels, (s8, s16))?;
            let map = loc.forward(&a8, &a16, self.kernels)?;
            let a = net.features_after(&a16, stats, self.kernels, s16)?;
            let pooled = a.mean(3)?.mean(2)?;
            let x = self.dropout(&pooled, net.p_dropout, train)?;
            let logits = dense(&net.fc, &x, false, self.kernels)?.squeeze(1)?;
            Ok((logits, map))
        })
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
        on_cpu_pool(xs, || self.logits(xs, train))
    }
}

/// Runs `f` on the CPU kernels' thread pool when `xs` lives on the CPU (see
/// [`kernels::on_pool`]), on this thread otherwise.
pub(crate) fn on_cpu_pool<R: Send>(xs: &Tensor, f: impl FnOnce() -> R + Send) -> R {
    if xs.device().is_cpu() {
        kernels::on_pool(f)
    } else {
        f()
    }
}

impl FractureNet {
    /// The logits of [`ModuleT::forward_t`], on the calling thread.
    fn logits(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.inner {
            Inner::Seed(net) => {
                let x = conv_pool(&net.conv1, xs, SEED_CONV, self.kernels.for_pixels())?;
                let x = conv_pool(&net.conv2, &x, SEED_CONV, self.kernels)?;
                let x = self.dropout(&x.flatten_from(1)?, net.p_flatten, train)?;
                let x = self.dropout(&dense(&net.fc1, &x, true, self.kernels)?, net.p_dense, train)?;
                dense(&net.fc2, &x, false, self.kernels)?.squeeze(1)
            }
            Inner::Resnet(net) => {
                let a = self.resnet_features(net, xs, train)?;
                let pooled = a.mean(3)?.mean(2)?;
                let x = self.dropout(&pooled, net.p_dropout, train)?;
                dense(&net.fc, &x, false, self.kernels)?.squeeze(1)
            }
            Inner::EfficientNet(net) => {
                let pooled = net.pooled(xs, self.bn_stats(train), self.kernels)?;
                let x = self.dropout(&pooled, net.p_dropout, train)?;
                dense(&net.fc, &x, false, self.kernels)?.squeeze(1)
            }
        }
    }

    /// The seed network up to its last convolutional feature map (after ReLU, before pooling).
    pub(crate) fn features(&self, net: &SeedNet, xs: &Tensor) -> candle_core::Result<Tensor> {
        let x = conv_pool(&net.conv1, xs, SEED_CONV, self.kernels.for_pixels())?;
        conv(&net.conv2, &x, SEED_CONV, self.kernels)
    }
}

impl FractureNet {
    /// The residual network up to its last feature map `(B, C, S/2^(n+1), S/2^(n+1))`, after the
    /// last block's ReLU. `train` selects batch statistics (and updates the running ones).
    pub(crate) fn resnet_features(
        &self,
        net: &ResNet,
        xs: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let k = self.kernels;
        let x = conv_pool(&net.stem, xs, STEM_CONV, k.for_pixels())?;
        let stats = self.bn_stats(train);
        let mut x = net.stem_bn.forward(&x, stats, Activation::None, k)?;
        for block in &net.blocks {
            x = block.forward(&x, stats, k)?;
        }
        Ok(x)
    }
}

/// The residual network's stem: 3×3, stride 2, padding 1, ReLU (fused with the 2×2 pooling).
const STEM_CONV: ConvSpec = ConvSpec {
    kernel: 3,
    stride: 2,
    padding: 1,
    relu: true,
};

#[derive(Debug)]
pub(crate) struct ResNet {
    stem: Conv2d,
    stem_bn: BatchNorm,
    blocks: Vec<Block>,
    pub(crate) fc: Linear,
    p_dropout: f32,
    stages: usize,
}

/// A basic residual block: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`.
#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    /// Conv 1×1 (stride 2) + BN where the block changes width or resolution.
    down: Option<(Conv2d, BatchNorm)>,
    stride: usize,
}

fn bias_of(layer: &Conv2d) -> candle_core::Result<&Tensor> {
    layer
        .bias()
        .ok_or_else(|| candle_core::Error::Msg("convolution without bias".into()))
}

fn conv_spec(kernel: usize, stride: usize) -> ConvSpec {
    ConvSpec {
        kernel,
        stride,
        padding: kernel / 2,
        relu: false,
    }
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// A batch norm of the residual network (ε 1e-5, momentum 0.1) whose scale starts at `gamma`.
fn batch_norm(channels: usize, gamma: f64, vb: VarBuilder<'_>) -> Result<BatchNorm> {
    BatchNorm::new(channels, gamma, BN_EPS, BN_MOMENTUM, vb)
}

impl Block {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let c3 = Conv2dConfig {
            padding: 1,
            stride,
            ..Conv2dConfig::default()
        };
        let c3b = Conv2dConfig {
            padding: 1,
            ..Conv2dConfig::default()
        };
        let down = if stride != 1 || cin != cout {
            let c1 = Conv2dConfig {
                stride,
                ..Conv2dConfig::default()
            };
            Some((
                candle_nn::conv2d(cin, cout, 1, c1, vb.pp("down.conv"))?,
                batch_norm(cout, 1.0, vb.pp("down.bn"))?,
            ))
        } else {
            None
        };
        Ok(Block {
            conv1: candle_nn::conv2d(cin, cout, 3, c3, vb.pp("conv1"))?,
            bn1: batch_norm(cout, 1.0, vb.pp("bn1"))?,
            conv2: candle_nn::conv2d(cout, cout, 3, c3b, vb.pp("conv2"))?,
            // The residual branch starts at zero, so each block starts as the identity: deep residual
            // networks train faster and more stably this way (Goyal et al., 2017).
            bn2: batch_norm(cout, 0.0, vb.pp("bn2"))?,
            down,
            stride,
        })
    }

    fn forward(&self, x: &Tensor, stats: Stats, k: Kernels) -> candle_core::Result<Tensor> {
        let h = conv(&self.conv1, x, conv_spec(3, self.stride), k)?;
        let h = self.bn1.forward(&h, stats, Activation::Relu, k)?;
        let h = conv(&self.conv2, &h, conv_spec(3, 1), k)?;
        let h = self.bn2.forward(&h, stats, Activation::None, k)?;
        let shortcut = match &self.down {
            Some((down, bn)) => {
                let s = conv(down, x, conv_spec(1, self.stride), k)?;
                bn.forward(&s, stats, Activation::None, k)?
            }
            None => x.clone(),
        };
        (h + shortcut)?.relu()
    }
}

impl ResNet {
    fn new(cfg: &ResNetConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let first = cfg.widths.first().copied().unwrap_or(1);
        let stem = candle_nn::conv2d(
            1,
            first,
            3,
            Conv2dConfig {
                padding: 1,
                stride: 2,
                ..Conv2dConfig::default()
            },
            vb.pp("stem.conv"),
        )?;
        let stem_bn = batch_norm(first, 1.0, vb.pp("stem.bn"))?;
        let mut blocks = Vec::new();
        let mut cin = first;
        for (i, &w) in cfg.widths.iter().enumerate() {
            for j in 0..cfg.blocks {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    cin,
                    w,
                    stride,
                    vb.pp(format!("stage{}.block{}", i + 1, j + 1)),
                )?);
                cin = w;
            }
        }
        Ok(ResNet {
            stem,
            stem_bn,
            blocks,
            fc: candle_nn::linear(cin, 1, vb.pp("head.fc"))?,
            p_dropout: cfg.dropout,
            stages: cfg.widths.len(),
        })
    }

    /// Input pixel coordinate of feature `i` of the last map, `offset + stride · i` (receptive-field
    /// centre): the stem puts pooled feature `j` at `4j + 1`, each later stage doubles the stride.
    pub(crate) fn geometry(&self) -> (f32, f32) {
        (1.0, (4usize << self.stages.saturating_sub(1)) as f32)
    }
}

fn conv_pool(layer: &Conv2d, xs: &Tensor, spec: ConvSpec, k: Kernels) -> candle_core::Result<Tensor> {
    kernels::conv2d_relu_pool2x2(xs, layer.weight(), bias_of(layer)?, spec, k)
}

fn conv(layer: &Conv2d, xs: &Tensor, spec: ConvSpec, k: Kernels) -> candle_core::Result<Tensor> {
    kernels::conv2d(xs, layer.weight(), bias_of(layer)?, spec, k)
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

impl SeedNet {
    /// The network as ONNX nodes from `x`: the logit `(B, 1)`.
    pub(crate) fn to_onnx(&self, g: &mut Graph, x: Act) -> Result<String> {
        let mut x = x;
        for (name, layer) in [("conv1", &self.conv1), ("conv2", &self.conv2)] {
            let y = g.conv(name, &x, layer.weight(), layer.bias(), ConvAttrs::plain(1, 0))?;
            let y = g.relu(&y);
            x = g.max_pool2(&y);
        }
        let flat = g.node("Flatten", &[&x.x], vec![]);
        let hidden = g.dense(&flat, &self.fc1)?;
        let hidden = g.node("Relu", &[&hidden], vec![]);
        g.dense(&hidden, &self.fc2)
    }
}

impl ResNet {
    /// The network as ONNX nodes from `x`: the logit `(B, 1)`.
    pub(crate) fn to_onnx(&self, g: &mut Graph, x: Act) -> Result<String> {
        let stem = g.conv(
            "stem.conv",
            &x,
            self.stem.weight(),
            self.stem.bias(),
            ConvAttrs::plain(2, 1),
        )?;
        let stem = g.relu(&stem);
        let stem = g.max_pool2(&stem);
        let mut x = g.batch_norm("stem.bn", &stem, &self.stem_bn)?;
        for block in &self.blocks {
            x = block.to_onnx(g, &x)?;
        }
        g.pooled_head(&x, &self.fc)
    }
}

impl Block {
    fn to_onnx(&self, g: &mut Graph, x: &Act) -> Result<Act> {
        let conv = |g: &mut Graph, x: &Act, layer: &Conv2d, k: usize, stride: usize| {
            g.conv(
                "block",
                x,
                layer.weight(),
                layer.bias(),
                ConvAttrs::plain(stride, k / 2),
            )
        };
        let h = conv(g, x, &self.conv1, 3, self.stride)?;
        let h = g.batch_norm("block.bn1", &h, &self.bn1)?;
        let h = g.relu(&h);
        let h = conv(g, &h, &self.conv2, 3, 1)?;
        let h = g.batch_norm("block.bn2", &h, &self.bn2)?;
        let shortcut = match &self.down {
            Some((down, bn)) => {
                let s = conv(g, x, down, 1, self.stride)?;
                g.batch_norm("block.down.bn", &s, bn)?
            }
            None => x.clone(),
        };
        let sum = g.add(&h, &shortcut);
        Ok(g.relu(&sum))
    }
}

impl FractureNet {
    /// The network as ONNX nodes from `x` (see [`crate::onnx::export`]): the logit `(B, 1)` and, for
    /// a network with a localization head, its map of logits `(B, 1, M, M)`.
    pub(crate) fn to_onnx(&self, g: &mut Graph, x: Act) -> Result<(String, Option<String>)> {
        Ok(match &self.inner {
            Inner::Seed(n) => (n.to_onnx(g, x)?, None),
            Inner::Resnet(n) => (n.to_onnx(g, x)?, None),
            Inner::EfficientNet(n) => n.to_onnx(g, x)?,
        })
    }
}
