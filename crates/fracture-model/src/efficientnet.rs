//! EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant without squeeze-and-excitation, with ReLU6)
//! with one gray input channel and a fracture head.
//!
//! The layer names are those of the `efficientnet_pytorch` state dicts (`_conv_stem`, `_bn0`,
//! `_blocks.N._expand_conv`, `._bn0`, `._depthwise_conv`, `._bn1`, `._project_conv`, `._bn2`,
//! `_conv_head`, `_bn1`), so ImageNet weights load by name (see [`crate::pretrained`]); the fracture
//! head is `head.fc`. Convolutions use TensorFlow's "SAME" padding, computed per input size.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::{self, Activation, ConvSpec, Kernels, MbConvSpec, Padding};
use crate::layers::{BatchNorm, Stats};
use crate::onnx::graph::{Act, ConvAttrs, Graph};
use crate::{EfficientNetConfig, Result};

/// The stages of EfficientNet-Lite0: (kernel, stride of the first block, expansion, output channels,
/// blocks).
pub const LITE0_STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
];
/// Channels of EfficientNet-Lite0's stem (its first convolution's output).
pub const STEM_CHANNELS: usize = 32;

/// Bottlenecks that keep FP32 matrix products under `Kernels::Bf16`: the first two stages (blocks
/// 0-2, on 112² and 56² planes at 224 px), where the radiograph's fine detail is. With them and the
/// stem in FP32, the built-in model's P(fractured) on the 512 FracAtlas val radiographs moved by at
/// most 0.0056 in BF16; with only the stem, up to 0.0117. They are about a seventh of the 1×1 work.
const FP32_BLOCKS: usize = 3;
/// Channels of the last feature map (the head convolution's output).
pub(crate) const HEAD_CHANNELS: usize = 1280;
/// Batch-norm ε of the pretrained network.
const BN_EPS: f64 = 1e-3;

/// One mobile inverted bottleneck: [1×1 expand → BN → ReLU6] → k×k depthwise → BN → ReLU6 → 1×1
/// project → BN, plus the input when the shape is unchanged.
#[derive(Debug)]
pub(crate) struct MbConv {
    expand: Option<(Tensor, BatchNorm)>,
    depthwise: Tensor,
    bn1: BatchNorm,
    project: Tensor,
    bn2: BatchNorm,
    kernel: usize,
    stride: usize,
    /// In a network with frozen weights ([`EfficientNet::freeze_weights`]): the block prepared for
    /// inference with its running statistics, made by the first such pass (`None` inside until
    /// then, and again after a batch-statistics pass moves the running statistics).
    frozen: Option<Mutex<Option<Arc<kernels::FrozenMbConv>>>>,
}

#[derive(Debug)]
pub(crate) struct EfficientNet {
    stem: Tensor,
    stem_bn: BatchNorm,
    blocks: Vec<MbConv>,
    head_conv: Tensor,
    head_bn: BatchNorm,
    pub(crate) fc: Linear,
    pub(crate) p_dropout: f32,
    /// The localization head, when the configuration asks for one.
    pub(crate) loc: Option<LocHead>,
    /// With frozen weights ([`EfficientNet::freeze_weights`]): the stem convolution, its batch norm
    /// and the first block prepared as one inverted bottleneck whose expansion is the stem (see
    /// [`EfficientNet::stem_folded`]), made by the first pass with running statistics.
    stem_block: Option<Mutex<Option<Arc<kernels::FrozenMbConv>>>>,
    /// With frozen weights: the head convolution with its batch norm and ReLU6, prepared for the
    /// pooled one-pass head ([`EfficientNet::pooled`]), made by the first pass with running
    /// statistics.
    head_frozen: Option<Mutex<Option<Arc<kernels::FrozenHead>>>>,
}

/// Channels of the localization head's hidden layer.
const LOC_CHANNELS: usize = 64;
/// The initial bias of the localization map's logits: sigmoid(−4) ≈ 0.018, about the share of a
/// radiograph's cells a fracture covers, so training starts from the prior instead of 0.5 everywhere.
const LOC_PRIOR_LOGIT: f64 = -4.0;

/// The localization head on the last stride-16 stage `a16` (112 channels): Conv 3×3 to 64
/// channels (padding 1), ReLU, then at stride 16 a Conv 1×1 to the map. At stride 8 it also reads
/// the last stride-8 stage `a8` (40 channels): the stride-16 features upsampled ×2 (nearest) plus a
/// Conv 1×1 of `a8` to 64 channels, ReLU, Conv 3×3 to 64 channels (padding 1), ReLU, then the
/// Conv 1×1 to the map. Parameters `head.loc.conv1.*`, `head.loc.conv2.*` (the 1×1 to the map) and
/// at stride 8 `head.loc.lateral.*`, `head.loc.conv3.*`.
#[derive(Debug)]
pub(crate) struct LocHead {
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    /// The stride-8 layers: the 1×1 on `a8` and the 3×3 after the sum.
    fine: Option<((Tensor, Tensor), (Tensor, Tensor))>,
}

fn conv_with_bias(
    shape: (usize, usize, usize, usize),
    vb: VarBuilder<'_>,
    bias: f64,
) -> Result<(Tensor, Tensor)> {
    Ok((
        conv_weight(shape, vb.clone())?,
        vb.get_with_hints(shape.0, "bias", candle_nn::Init::Const(bias))?,
    ))
}

impl LocHead {
    fn new(c16: usize, c8: usize, stride: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let vb2 = vb.pp("conv2");
        Ok(LocHead {
            conv1: conv_with_bias((LOC_CHANNELS, c16, 3, 3), vb.pp("conv1"), 0.0)?,
            conv2: (
                vb2.get_with_hints(
                    (1, LOC_CHANNELS, 1, 1),
                    "weight",
                    candle_nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.01,
                    },
                )?,
                vb2.get_with_hints(1, "bias", candle_nn::Init::Const(LOC_PRIOR_LOGIT))?,
            ),
            fine: if stride == 8 {
                Some((
                    conv_with_bias((LOC_CHANNELS, c8, 1, 1), vb.pp("lateral"), 0.0)?,
                    conv_with_bias((LOC_CHANNELS, LOC_CHANNELS, 3, 3), vb.pp("conv3"), 0.0)?,
                ))
            } else {
                None
            },
        })
    }

    /// Whether the map has stride 8.
    pub(crate) fn is_fine(&self) -> bool {
        self.fine.is_some()
    }

    /// The map's logits `(B, H, W)` from the stride-16 features `a16 (B, 112, H16, W16)` and, at
    /// stride 8, the stride-8 features `a8 (B, 40, H8, W8)`.
    pub(crate) fn forward(&self, a8: &Tensor, a16: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
        let same3 = |relu| ConvSpec {
            kernel: 3,
            stride: 1,
            padding: 1,
            relu,
        };
        let mut h = kernels::conv2d(a16, &self.conv1.0, &self.conv1.1, same3(true), k)?;
        if let Some((lateral, conv3)) = &self.fine {
            let (b, c, h16, w16) = h.dims4()?;
            let (_, _, h8, w8) = a8.dims4()?;
            // Nearest ×2: every cell to a 2 × 2 block, cropped to the stride-8 grid ("SAME"
            // padding rounds up at each stride, so 2·H16 can exceed H8 by one).
            let up = h
                .reshape((b, c, h16, 1, w16, 1))?
                .broadcast_as((b, c, h16, 2, w16, 2))?
                .reshape((b, c, 2 * h16, 2 * w16))?
                .narrow(2, 0, h8)?
                .narrow(3, 0, w8)?;
            let side =
                kernels::conv1x1(a8, &lateral.0, k)?.broadcast_add(&lateral.1.reshape((1, c, 1, 1))?)?;
            h = kernels::conv2d(&(up + side)?.relu()?, &conv3.0, &conv3.1, same3(true), k)?;
        }
        let m =
            kernels::conv1x1(&h, &self.conv2.0, k)?.broadcast_add(&self.conv2.1.reshape((1, 1, 1, 1))?)?;
        m.squeeze(1)
    }
}

fn conv_weight(shape: (usize, usize, usize, usize), vb: VarBuilder<'_>) -> Result<Tensor> {
    Ok(vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?)
}

impl MbConv {
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        expansion: usize,
        m: f64,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let mid = cin * expansion;
        let expand = if expansion != 1 {
            Some((
                conv_weight((mid, cin, 1, 1), vb.pp("_expand_conv"))?,
                BatchNorm::new(mid, 1.0, BN_EPS, m, vb.pp("_bn0"))?,
            ))
        } else {
            None
        };
        Ok(MbConv {
            expand,
            depthwise: conv_weight((mid, 1, kernel, kernel), vb.pp("_depthwise_conv"))?,
            bn1: BatchNorm::new(mid, 1.0, BN_EPS, m, vb.pp("_bn1"))?,
            project: conv_weight((cout, mid, 1, 1), vb.pp("_project_conv"))?,
            bn2: BatchNorm::new(cout, 1.0, BN_EPS, m, vb.pp("_bn2"))?,
            kernel,
            stride,
            frozen: None,
        })
    }

    /// The block's norms in order (BN0 when expanding, BN1, BN2).
    fn norms(&self) -> Vec<&BatchNorm> {
        let mut v: Vec<&BatchNorm> = self.expand.iter().map(|(_, bn)| bn).collect();
        v.extend([&self.bn1, &self.bn2]);
        v
    }

    fn spec(&self, cin: usize) -> MbConvSpec {
        let (mid, cout) = (self.depthwise.dims()[0], self.project.dims()[0]);
        MbConvSpec {
            cin,
            mid,
            cout,
            kernel: self.kernel,
            stride: self.stride,
            expand: self.expand.is_some(),
            eps: self.bn1.eps(),
        }
    }

    /// The block as one fused op ([`kernels::mbconv`]; in a network with frozen weights and running
    /// statistics, the block prepared once, [`kernels::mbconv_frozen`]); with batch statistics the
    /// running ones are updated afterwards.
    fn forward(&self, x: &Tensor, stats: Stats, k: Kernels) -> candle_core::Result<Tensor> {
        if let (Some(slot), Stats::Running) = (&self.frozen, stats) {
            let block = self.prepared(slot, x.dim(1)?)?;
            return kernels::mbconv_frozen(x, &block, k);
        }
        let spec = self.spec(x.dim(1)?);
        let params = self.flat_params()?;
        let running = match stats {
            Stats::Batch => None,
            Stats::Running => Some(self.running()?),
        };
        let (y, batch) = kernels::mbconv(x, &params, spec, running, k)?;
        if stats == Stats::Batch {
            let (b, _, h, w) = x.dims4()?;
            let (oh, ow) = (h.div_ceil(self.stride), w.div_ceil(self.stride));
            let counts = [b * h * w, b * oh * ow, b * oh * ow];
            let counts = if self.expand.is_some() {
                &counts[..]
            } else {
                &counts[1..]
            };
            let dev = x.device();
            for ((bn, (mean, var)), n) in self.norms().into_iter().zip(batch).zip(counts) {
                bn.update_running(&Tensor::new(mean, dev)?, &Tensor::new(var, dev)?, *n)?;
            }
            if let Some(slot) = &self.frozen {
                *lock(slot)? = None;
            }
        }
        Ok(y)
    }

    /// The block prepared for inference with frozen weights, from `slot` or made now.
    fn prepared(
        &self,
        slot: &Mutex<Option<Arc<kernels::FrozenMbConv>>>,
        cin: usize,
    ) -> candle_core::Result<Arc<kernels::FrozenMbConv>> {
        cached(slot, || {
            kernels::FrozenMbConv::new(&self.flat_params()?, self.spec(cin), self.running()?)
        })
    }

    /// Each norm's running `(mean, var)`, in block order.
    fn running(&self) -> candle_core::Result<kernels::BlockStats> {
        self.norms().iter().map(|bn| bn.running()).collect()
    }

    /// The block's parameters as one flat tensor, as [`kernels::mbconv`] takes them (a
    /// concatenation, so gradients flow back to each variable).
    fn flat_params(&self) -> candle_core::Result<Tensor> {
        let mut parts: Vec<Tensor> = Vec::with_capacity(9);
        if let Some((w, bn)) = &self.expand {
            parts.push(w.flatten_all()?);
            parts.extend(bn.affine().map(Tensor::clone));
        }
        parts.push(self.depthwise.flatten_all()?);
        parts.extend(self.bn1.affine().map(Tensor::clone));
        parts.push(self.project.flatten_all()?);
        parts.extend(self.bn2.affine().map(Tensor::clone));
        Tensor::cat(&parts, 0)
    }
}

/// `slot` locked, or an error when a thread panicked while holding it.
fn lock<T>(slot: &Mutex<T>) -> candle_core::Result<MutexGuard<'_, T>> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("a frozen block's lock is poisoned".into()))
}

/// What `slot` holds, or `make`'s result, then held there: a part of a network with frozen weights
/// prepared by its first pass with running statistics.
fn cached<T>(
    slot: &Mutex<Option<Arc<T>>>,
    make: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<Arc<T>> {
    let mut slot = lock(slot)?;
    if let Some(held) = slot.as_ref() {
        return Ok(held.clone());
    }
    let made = Arc::new(make()?);
    *slot = Some(made.clone());
    Ok(made)
}

impl EfficientNet {
    /// Marks the weights as fixed for good (a network built for inference from copies of them):
    /// each block then prepares itself once for passes with running statistics
    /// ([`kernels::FrozenMbConv`]) instead of concatenating its parameters and packing its
    /// weights on every pass.
    pub(crate) fn freeze_weights(&mut self) {
        for block in &mut self.blocks {
            block.frozen = Some(Mutex::new(None));
        }
        self.stem_block = Some(Mutex::new(None));
        self.head_frozen = Some(Mutex::new(None));
    }

    /// The globally average-pooled head features `(B, 1280)` (after the head's batch norm and
    /// ReLU6): with frozen weights and running statistics the head runs as one pass that never
    /// writes its feature map ([`kernels::head_pooled`]); otherwise the mean of
    /// [`EfficientNet::features`].
    pub(crate) fn pooled(&self, xs: &Tensor, stats: Stats, k: Kernels) -> candle_core::Result<Tensor> {
        let Some(slot) = self.head_frozen.as_ref().filter(|_| stats == Stats::Running) else {
            return self.features(xs, stats, k)?.mean(3)?.mean(2);
        };
        let head = cached(slot, || {
            let (scale, shift) = self.head_bn.fixed_host()?;
            let dev = self.head_conv.device();
            kernels::FrozenHead::new(
                &self.head_conv,
                &Tensor::new(scale, dev)?,
                &Tensor::new(shift, dev)?,
                Activation::Relu6,
            )
        })?;
        let x = self.features_until(xs, stats, k, self.blocks.len())?;
        kernels::head_pooled(&x, &head, k)
    }

    /// With frozen weights, the stem (3×3 convolution at stride 2, batch norm, ReLU6) and the
    /// first block (no expansion, no skip, stride 1) as one prepared inverted bottleneck on the
    /// stem's [`kernels::patches`]: the stem's weights `(32, C, 3, 3)` are its expansion
    /// `(32, C·9)` and the stem's batch norm its first norm. The stem's 32-channel output then never
    /// exists in memory (at 224 px and batch 32, 51 MB written, zeroed first, and read back), and
    /// the block runs channels-last with the other expanding blocks. `None` for a network without
    /// frozen weights or whose first block does not have that shape.
    fn stem_folded(&self) -> candle_core::Result<Option<Arc<kernels::FrozenMbConv>>> {
        let (Some(slot), Some(first)) = (&self.stem_block, self.blocks.first()) else {
            return Ok(None);
        };
        let Some(spec) = self.stem_fold_spec(first)? else {
            return Ok(None);
        };
        if first.frozen.is_none() {
            return Ok(None);
        }
        let block = cached(slot, || {
            let mut running = vec![self.stem_bn.running()?];
            running.extend(first.running()?);
            kernels::FrozenMbConv::new(&self.stem_fold_params(first)?, spec, running)
        })?;
        Ok(Some(block))
    }

    /// The spec of the stem and `first` (the first block) as one inverted bottleneck on the stem's
    /// patches: the stem's `(32, C, 3, 3)` weights as the expansion `(32, C·9)`, its batch norm as
    /// the first norm. `None` where `first` expands, has stride 2, or another eps than the stem's.
    fn stem_fold_spec(&self, first: &MbConv) -> candle_core::Result<Option<MbConvSpec>> {
        let (cin, eps) = (self.stem.dim(1)? * 9, first.bn1.eps());
        #[allow(clippy::float_cmp)] // one eps serves every norm of the fused op: it must be the same
        let same_eps = self.stem_bn.eps() == eps;
        if first.expand.is_some() || first.stride != 1 || !same_eps {
            return Ok(None);
        }
        Ok(Some(MbConvSpec {
            cin,
            mid: STEM_CHANNELS,
            expand: true,
            ..first.spec(STEM_CHANNELS)
        }))
    }

    /// The flat parameters of [`EfficientNet::stem_fold_spec`]'s op: the stem's weights and batch
    /// norm, then `first`'s own (a concatenation, so gradients flow back to each variable).
    fn stem_fold_params(&self, first: &MbConv) -> candle_core::Result<Tensor> {
        let mut parts = vec![self.stem.flatten_all()?];
        parts.extend(self.stem_bn.affine().map(Tensor::clone));
        parts.push(first.flat_params()?);
        Tensor::cat(&parts, 0)
    }

    /// With batch statistics (training), the stem and the first block as one inverted bottleneck
    /// on the stem's [`kernels::patches`] of the padded images `x`, as [`EfficientNet::stem_folded`]
    /// prepares it for frozen weights: the stem's 32-channel output is then the block's saved
    /// expansion instead of a tensor of its own that a batch norm reads and writes again, and its
    /// gradient never passes through candle. The stem's and the block's running statistics move
    /// with the op's batch statistics. `None` where the first block does not have that shape.
    fn stem_folded_batch(&self, x: &Tensor, k: Kernels) -> candle_core::Result<Option<Tensor>> {
        let Some(first) = self.blocks.first() else {
            return Ok(None);
        };
        let Some(spec) = self.stem_fold_spec(first)? else {
            return Ok(None);
        };
        // The stem and the first stages keep FP32 products (`Kernels::for_pixels`).
        let k0 = k.for_pixels();
        let patches = kernels::patches(x, 3, 2, k0)?;
        let (b, _, h, w) = patches.dims4()?;
        let (y, batch) = kernels::mbconv(&patches, &self.stem_fold_params(first)?, spec, None, k0)?;
        // Stride 1: each of the three norms sees b·h·w values per channel.
        let dev = x.device();
        for (bn, (mean, var)) in [&self.stem_bn, &first.bn1, &first.bn2].into_iter().zip(batch) {
            bn.update_running(&Tensor::new(mean, dev)?, &Tensor::new(var, dev)?, b * h * w)?;
        }
        if let Some(slot) = &first.frozen {
            *lock(slot)? = None;
        }
        Ok(Some(y))
    }

    pub(crate) fn new(cfg: &EfficientNetConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let m = cfg.bn_momentum;
        let mut blocks = Vec::new();
        let mut cin = STEM_CHANNELS;
        for (kernel, stride, expansion, cout, repeats) in LITE0_STAGES {
            for r in 0..repeats {
                let s = if r == 0 { stride } else { 1 };
                blocks.push(MbConv::new(
                    cin,
                    cout,
                    kernel,
                    s,
                    expansion,
                    m,
                    vb.pp(format!("_blocks.{}", blocks.len())),
                )?);
                cin = cout;
            }
        }
        Ok(EfficientNet {
            stem: conv_weight((STEM_CHANNELS, 1, 3, 3), vb.pp("_conv_stem"))?,
            stem_bn: BatchNorm::new(STEM_CHANNELS, 1.0, BN_EPS, m, vb.pp("_bn0"))?,
            blocks,
            head_conv: conv_weight((HEAD_CHANNELS, cin, 1, 1), vb.pp("_conv_head"))?,
            head_bn: BatchNorm::new(HEAD_CHANNELS, 1.0, BN_EPS, m, vb.pp("_bn1"))?,
            fc: candle_nn::linear(HEAD_CHANNELS, 1, vb.pp("head.fc"))?,
            p_dropout: cfg.dropout,
            stem_block: None,
            head_frozen: None,
            loc: if cfg.localization_head {
                Some(LocHead::new(
                    LITE0_STAGES[4].3,
                    LITE0_STAGES[2].3,
                    cfg.localization_stride,
                    vb.pp("head.loc"),
                )?)
            } else {
                None
            },
        })
    }

    /// The last feature map `(B, 1280, ⌈S/32⌉, ⌈S/32⌉)` after the head's ReLU6.
    pub(crate) fn features(&self, xs: &Tensor, stats: Stats, k: Kernels) -> candle_core::Result<Tensor> {
        let mid = self.features_until(xs, stats, k, self.blocks.len())?;
        self.features_after(&mid, stats, k, self.blocks.len())
    }

    /// The stem and the first `blocks` inverted bottlenecks.
    pub(crate) fn features_until(
        &self,
        xs: &Tensor,
        stats: Stats,
        k: Kernels,
        blocks: usize,
    ) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let p = Padding::same(h, w, 3, 2);
        let x = xs
            .pad_with_zeros(2, p.top, p.bottom)?
            .pad_with_zeros(3, p.left, p.right)?;
        if stats == Stats::Batch
            && let Some(slot) = &self.stem_block
        {
            // The stem's running statistics move with this pass.
            *lock(slot)? = None;
        }
        if stats == Stats::Running
            && blocks > 0
            && let Some(stem) = self.stem_folded()?
        {
            let k0 = k.for_pixels();
            let x = kernels::mbconv_frozen(&kernels::patches(&x, 3, 2, k0)?, &stem, k0)?;
            return self.blocks_between(&x, stats, k, (1, blocks));
        }
        if stats == Stats::Batch
            && blocks > 0
            && let Some(x) = self.stem_folded_batch(&x, k)?
        {
            return self.blocks_between(&x, stats, k, (1, blocks));
        }
        let x = self.stem_apart(&x, stats, k)?;
        self.blocks_between(&x, stats, k, (0, blocks))
    }

    /// The stem as ops of its own on the padded images `x`: 3×3 convolution at stride 2, batch
    /// norm, ReLU6.
    fn stem_apart(&self, x: &Tensor, stats: Stats, k: Kernels) -> candle_core::Result<Tensor> {
        let spec = ConvSpec {
            kernel: 3,
            stride: 2,
            padding: 0,
            relu: false,
        };
        let zero = Tensor::zeros(STEM_CHANNELS, DType::F32, x.device())?.to_dtype(x.dtype())?;
        let x = kernels::conv2d(x, &self.stem, &zero, spec, k.for_pixels())?;
        self.stem_bn.forward(&x, stats, Activation::Relu6, k)
    }

    /// The bottlenecks from index `from` on and the head convolution (with its BN and ReLU6).
    pub(crate) fn features_after(
        &self,
        x: &Tensor,
        stats: Stats,
        k: Kernels,
        from: usize,
    ) -> candle_core::Result<Tensor> {
        let x = self.blocks_between(x, stats, k, (from, self.blocks.len()))?;
        if stats == Stats::Batch
            && let Some(slot) = &self.head_frozen
        {
            // The head's running statistics move with this pass.
            *lock(slot)? = None;
        }
        self.head_bn.forward(
            &kernels::conv1x1(&x, &self.head_conv, k)?,
            stats,
            Activation::Relu6,
            k,
        )
    }

    /// The bottlenecks from index `from` up to (not including) `to`, the first `FP32_BLOCKS` of the
    /// network with FP32 products.
    pub(crate) fn blocks_between(
        &self,
        x: &Tensor,
        stats: Stats,
        k: Kernels,
        (from, to): (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (i, block) in self.blocks.iter().enumerate().take(to).skip(from) {
            // The first two stages, on 112² and 56² planes, keep FP32 products (see
            // `Kernels::for_pixels`).
            let k = if i < FP32_BLOCKS { k.for_pixels() } else { k };
            x = block.forward(&x, stats, k)?;
        }
        Ok(x)
    }

    /// The number of bottlenecks whose output has stride `max` at most (5 of 16 for Lite0 at 8,
    /// 11 at 16).
    pub(crate) fn blocks_up_to_stride(&self, max: usize) -> usize {
        let mut stride = 2;
        let mut last = 0;
        for (i, b) in self.blocks.iter().enumerate() {
            stride *= b.stride;
            if stride <= max {
                last = i + 1;
            }
        }
        last
    }

    /// The blocks before the localization map: those up to its stride.
    pub(crate) fn localization_blocks(&self) -> usize {
        let stride = match &self.loc {
            Some(loc) if loc.is_fine() => 8,
            _ => 16,
        };
        self.blocks_up_to_stride(stride)
    }

    /// The number of bottlenecks whose output has stride 16 at most: the end of the last
    /// stride-16 stage (11 of 16 for Lite0).
    pub(crate) fn stride16_blocks(&self) -> usize {
        self.blocks_up_to_stride(16)
    }

    /// Input pixel coordinate of feature `i` of the last map for an `image_size` input,
    /// `offset + stride · i`: the centre of its receptive field, composed over the strided layers
    /// with their "SAME" padding.
    pub(crate) fn geometry(&self, image_size: usize) -> (f32, f32) {
        self.geometry_until(image_size, self.blocks.len())
    }

    /// [`EfficientNet::geometry`] of the map after the first `blocks` bottlenecks.
    pub(crate) fn geometry_until(&self, image_size: usize, blocks: usize) -> (f32, f32) {
        let (mut offset, mut stride, mut n) = (0.0f32, 1.0f32, image_size);
        let mut layer = |kernel: usize, s: usize| {
            let before = Padding::same(n, n, kernel, s).top;
            // Output i of this layer is centred on its input i·s − before + (k − 1)/2.
            let local = (kernel as f32 - 1.0) / 2.0 - before as f32;
            offset += stride * local;
            stride *= s as f32;
            n = n.div_ceil(s);
        };
        layer(3, 2);
        for b in self.blocks.iter().take(blocks) {
            layer(b.kernel, b.stride);
        }
        (offset, stride)
    }
}

impl MbConv {
    /// The block as ONNX nodes from `x` (block `i`, for the weights' names).
    fn to_onnx(&self, g: &mut Graph, x: &Act, i: usize) -> Result<Act> {
        let name = |part: &str| format!("_blocks.{i}.{part}");
        let mut h = x.clone();
        if let Some((w, bn)) = &self.expand {
            h = g.conv(&name("_expand_conv"), &h, w, None, ConvAttrs::plain(1, 0))?;
            h = g.batch_norm(&name("_bn0"), &h, bn)?;
            h = g.relu6(&h);
        }
        let mid = self.depthwise.dim(0)?;
        let attrs = ConvAttrs::same(h.side, self.kernel, self.stride, mid);
        h = g.conv(&name("_depthwise_conv"), &h, &self.depthwise, None, attrs)?;
        h = g.batch_norm(&name("_bn1"), &h, &self.bn1)?;
        h = g.relu6(&h);
        h = g.conv(
            &name("_project_conv"),
            &h,
            &self.project,
            None,
            ConvAttrs::plain(1, 0),
        )?;
        h = g.batch_norm(&name("_bn2"), &h, &self.bn2)?;
        if self.spec(self.input_channels()?).skip() {
            h = g.add(&h, x);
        }
        Ok(h)
    }

    /// The block's input channels (the expand convolution's, or the depthwise's without one).
    fn input_channels(&self) -> candle_core::Result<usize> {
        match &self.expand {
            Some((w, _)) => w.dim(1),
            None => self.depthwise.dim(0),
        }
    }
}

impl LocHead {
    /// The head as ONNX nodes from the stride-8 and stride-16 features: the map's logits `(B, 1, M, M)`.
    fn to_onnx(&self, g: &mut Graph, a8: &Act, a16: &Act) -> Result<String> {
        let (w1, b1) = &self.conv1;
        let mut h = g.conv("head.loc.conv1", a16, w1, Some(b1), ConvAttrs::plain(1, 1))?;
        h = g.relu(&h);
        if let Some(((wl, bl), (w3, b3))) = &self.fine {
            // Nearest ×2 as reshape → broadcast → reshape, cropped to the stride-8 grid.
            let c = w1.dim(0)? as i64;
            let s16 = h.side as i64;
            let split = g.constant_i64("shape.split", &[6], &[-1, c, s16, 1, s16, 1]);
            let split = g.node("Reshape", &[&h.x, &split], vec![]);
            let twice = g.constant_i64("shape.twice", &[6], &[1, 1, 1, 2, 1, 2]);
            let spread = g.node("Expand", &[&split, &twice], vec![]);
            let joined = g.constant_i64("shape.joined", &[4], &[-1, c, 2 * s16, 2 * s16]);
            let up = g.node("Reshape", &[&spread, &joined], vec![]);
            let s8 = a8.side as i64;
            let starts = g.constant_i64("crop.starts", &[2], &[0, 0]);
            let ends = g.constant_i64("crop.ends", &[2], &[s8, s8]);
            let axes = g.constant_i64("crop.axes", &[2], &[2, 3]);
            let up = Act {
                x: g.node("Slice", &[&up, &starts, &ends, &axes], vec![]),
                side: a8.side,
            };
            let side = g.conv("head.loc.lateral", a8, wl, Some(bl), ConvAttrs::plain(1, 0))?;
            let sum = g.add(&up, &side);
            let sum = g.relu(&sum);
            h = g.conv("head.loc.conv3", &sum, w3, Some(b3), ConvAttrs::plain(1, 1))?;
            h = g.relu(&h);
        }
        let (w2, b2) = &self.conv2;
        Ok(
            g.conv("head.loc.conv2", &h, w2, Some(b2), ConvAttrs::plain(1, 0))?
                .x,
        )
    }
}

impl EfficientNet {
    /// The network as ONNX nodes from `x`: the logit `(B, 1)` and, with the localization head, its
    /// map of logits `(B, 1, M, M)`.
    pub(crate) fn to_onnx(&self, g: &mut Graph, x: Act) -> Result<(String, Option<String>)> {
        let stem = ConvAttrs::same(x.side, 3, 2, 1);
        let h = g.conv("_conv_stem", &x, &self.stem, None, stem)?;
        let h = g.batch_norm("_bn0", &h, &self.stem_bn)?;
        let mut h = g.relu6(&h);
        let (s8, s16) = (self.blocks_up_to_stride(8), self.stride16_blocks());
        let (mut a8, mut a16) = (None, None);
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.to_onnx(g, &h, i)?;
            if i + 1 == s8 {
                a8 = Some(h.clone());
            }
            if i + 1 == s16 {
                a16 = Some(h.clone());
            }
        }
        let map = match (&self.loc, a8, a16) {
            (Some(loc), Some(a8), Some(a16)) => Some(loc.to_onnx(g, &a8, &a16)?),
            _ => None,
        };
        let h = g.conv("_conv_head", &h, &self.head_conv, None, ConvAttrs::plain(1, 0))?;
        let h = g.batch_norm("_bn1", &h, &self.head_bn)?;
        let h = g.relu6(&h);
        Ok((g.pooled_head(&h, &self.fc)?, map))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use candle_core::Device;
    use candle_nn::VarMap;

    use super::*;

    /// The stem folded into the first block for training gives the same output, the same gradients
    /// for every variable and the same running statistics as the stem and the block run apart.
    #[test]
    fn the_stem_folded_for_training_matches_the_stem_and_block_apart() {
        let dev = Device::Cpu;
        let cfg = EfficientNetConfig {
            // The running statistics become the last batch's, so the two passes compare directly.
            bn_momentum: 1.0,
            ..EfficientNetConfig::default()
        };
        let varmap = VarMap::new();
        let net = EfficientNet::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let (h, w) = (21, 18);
        let x = Tensor::rand(0f32, 1.0, (3, 1, h, w), &dev).unwrap();
        let p = Padding::same(h, w, 3, 2);
        let x = x
            .pad_with_zeros(2, p.top, p.bottom)
            .unwrap()
            .pad_with_zeros(3, p.left, p.right)
            .unwrap();
        for k in [Kernels::Fast, Kernels::Reference] {
            stem_fold_case(&net, &varmap, &x, k);
        }
    }

    /// One kernel choice of the test above: both passes with `k`, compared.
    fn stem_fold_case(net: &EfficientNet, varmap: &VarMap, x: &Tensor, k: Kernels) {
        let dev = x.device();
        let first = &net.blocks[0];
        let norms = [&net.stem_bn, &first.bn1, &first.bn2];
        let running = || -> Vec<Vec<f32>> {
            norms
                .iter()
                .flat_map(|bn| {
                    let (m, v) = bn.running().unwrap();
                    [m, v]
                })
                .collect()
        };
        let pass = |folded: bool| {
            let y = if folded {
                net.stem_folded_batch(x, k).unwrap().unwrap()
            } else {
                first
                    .forward(
                        &net.stem_apart(x, Stats::Batch, k).unwrap(),
                        Stats::Batch,
                        k.for_pixels(),
                    )
                    .unwrap()
            };
            // A loss that weighs every output differently.
            let r = Tensor::arange(0f32, y.elem_count() as f32, dev)
                .unwrap()
                .reshape(y.shape())
                .unwrap()
                .affine(0.37, 0.0)
                .unwrap()
                .sin()
                .unwrap();
            let loss = (&y * &r).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Vec<f32>> = varmap
                .all_vars()
                .iter()
                .filter_map(|v| grads.get(v))
                .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g, running())
        };
        let (y1, g1, r1) = pass(true);
        let (y2, g2, r2) = pass(false);
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert_eq!(a.len(), b.len(), "{what}");
            assert!(
                diff <= 2e-4 * scale,
                "{what}: max difference {diff} at scale {scale}"
            );
        };
        close(&y1, &y2, &format!("{k:?} output"));
        assert_eq!(g1.len(), g2.len());
        assert!(
            g1.len() >= 8,
            "gradients for the stem and the block's variables: {}",
            g1.len()
        );
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            close(a, b, &format!("gradient {i}"));
        }
        for (i, (a, b)) in r1.iter().zip(&r2).enumerate() {
            close(a, b, &format!("running statistic {i}"));
        }
    }
}
