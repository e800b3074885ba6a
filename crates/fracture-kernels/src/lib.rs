//! CPU kernels for the networks' hot operations, plugged into candle as custom ops with backward
//! passes, so the model code stays candle code. The crate's README has a runnable example.
//!
//! Each public function here takes and returns candle tensors. On a CPU device with f32 data it
//! runs our kernel; anywhere else (CUDA, Metal, other dtypes), or when [`Kernels::Reference`] is
//! chosen, it runs the equivalent composition of candle's own operations. The two are checked
//! against each other, values and gradients, by property tests (`tests/kernels.rs`).
//!
//! | op | kernel |
//! |---|---|
//! | [`conv2d`] (+ bias, + ReLU) | im2col + GEMM per image, images across threads; backward: dW and dX by GEMM, col2im |
//! | [`conv2d_relu_pool2x2`] | the two fused: the full-resolution activation never leaves the kernel, one byte per pooled value records the winner |
//! | [`max_pool2x2`] | window maxima; backward re-finds each window's argmax |
//! | [`linear()`] (+ bias, + ReLU) | one GEMM each for y, dW and dX, with strided (not copied) transposes |
//! | [`dropout()`] | mask drawn once, applied forward and backward |
//! | [`batch_norm_train`] (+ ReLU or ReLU6) | statistics in f64, one pass out; backward recomputes x̂ from the saved statistics |
//! | [`affine_act`] (+ ReLU or ReLU6) | batch normalization with fixed statistics, one pass; backward to the input, scale and shift |
//! | [`depthwise_conv2d`] | one k×k filter per channel, asymmetric padding, stride 1 or 2: each plane copied once into a zero-bordered scratch plane (even and odd columns apart for stride 2), then contiguous multiply-adds; backward: dX and dW per plane |
//! | [`conv1x1`] | one GEMM per image, no unfolding; backward: dX and dW by GEMM |
//! | [`mbconv()`] | a whole inverted bottleneck (1×1, BN, ReLU6, depthwise, BN, ReLU6, 1×1, BN, skip) as one op: normalizations fused into the neighbouring passes, intermediates in reused buffers |
//! | [`mbconv_frozen`] | the same with weights and statistics fixed ([`FrozenMbConv`]): parameters kept flat, 1×1 weights packed once (BF16, or FP32 blocks for the channels-last kernels) |
//! | [`head_pooled`] | a last 1×1 convolution with fixed batch norm, activation and global average pooling ([`FrozenHead`]): one pass, channels-last per image, the feature map never written |
//! | [`patches()`] | each k×k tap of the input at a stride as its own plane (im2col, planar), so a convolution is a 1×1 product; backward adds each plane's gradient back |
//!
//! The GEMM is the `gemm` crate's (the one candle uses) with its AVX-512 kernels enabled; its single
//! `unsafe` call is wrapped, with every bound checked, in `gemm.rs`. The BF16 products (`bf16.rs`)
//! and the FP32 products of the channels-last inference blocks (`packed.rs`, AVX-512) are the other
//! two modules with `unsafe`, each behind runtime detection and checked bounds.

#![warn(missing_docs)]

/// The README's example, run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;

mod banded;
mod batchnorm;
mod bf16;
mod buffers;
mod conv;
mod conv_pool;
mod depthwise;
mod dropout;
mod frozen;
mod gemm;
mod head;
mod linear;
mod mbconv;
mod norm;
mod packed;
mod patches;
mod pointwise;
mod pool;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rand::Rng;

pub use bf16::{
    AUTO_BF16_MAX_INSTRUCTION_RATIO, AutoPrecision, Bf16Backend, Bf16Status, auto_precision, bf16_backend,
    bf16_status, dot_instruction_times,
};
pub use conv::ConvSpec;
pub use depthwise::{DepthwiseSpec, Padding};
pub use frozen::{FrozenMbConv, mbconv_frozen};
pub use head::{FrozenHead, head_pooled};
pub use mbconv::{BlockStats, MbConvLayout, MbConvSpec};

/// The activation applied after a normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// None: the identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)` (MobileNet and EfficientNet-Lite).
    Relu6,
}

impl Activation {
    /// The activation as candle operations (the reference path).
    fn reference(self, y: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::None => Ok(y),
            Activation::Relu => y.relu(),
            Activation::Relu6 => y.clamp(0f32, 6f32),
        }
    }
}

/// Runs `f` compiled for the best vector instruction set this processor has (AVX-512, AVX2 or
/// plain x86-64), chosen at run time: the loops inside are auto-vectorized for it.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    arch().dispatch(f)
}

/// The instruction set [`simd`] compiles its loops for, detected once.
#[inline(always)]
fn arch() -> pulp::Arch {
    static ARCH: std::sync::OnceLock<pulp::Arch> = std::sync::OnceLock::new();
    *ARCH.get_or_init(pulp::Arch::new)
}

/// How many f32 values one vector register holds in the code [`simd`] runs: 16 with AVX-512, 8
/// with AVX2, and 4 (at most) on other processors. Loops that keep many accumulators in registers
/// size their work by it, so that 16-lane accumulators do not spill where registers are narrower.
#[inline(always)]
pub(crate) fn vector_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        match arch() {
            pulp::Arch::V4(_) => 16,
            pulp::Arch::V3(_) => 8,
            _ => 4,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        4
    }
}

/// Which implementation the networks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Kernels {
    /// Our kernels on the CPU, candle's elsewhere (the default).
    #[default]
    Fast,
    /// Our kernels with BF16 operands in the matrix products (1×1 and im2col convolutions, dense
    /// layers; forward and backward) and FP32 accumulation, as PyTorch's BF16 autocast does (the
    /// networks keep their first layer in FP32: see [`Kernels::for_pixels`]);
    /// weights, activations, gradients, batch-norm statistics and the optimizer stay FP32. The
    /// products run on [`bf16_backend`]. Elsewhere than the CPU, as [`Kernels::Fast`].
    #[cfg_attr(feature = "clap", value(skip))]
    Bf16,
    /// Candle's own operations everywhere (the reference the kernels are checked against).
    Reference,
}

impl Kernels {
    /// The kernels for the layers nearest the pixels (a network's first layer; EfficientNet-Lite0's
    /// stem and first two stages): [`Kernels::Bf16`] becomes [`Kernels::Fast`]. Rounding gray
    /// levels and fine early features to BF16's 8-bit mantissa costs more than these layers' share
    /// of the work saves: on 48 FracAtlas val radiographs, the built-in model's P(fractured) moved
    /// by up to 0.041 with a BF16 stem and 0.009 with an FP32 one.
    pub fn for_pixels(self) -> Kernels {
        match self {
            Kernels::Bf16 => Kernels::Fast,
            other => other,
        }
    }

    /// These kernels with `precision` operands in the matrix products: [`Kernels::Fast`] and
    /// [`Kernels::Bf16`] switch between each other, [`Kernels::Reference`] stays as it is in FP32
    /// and is an error in BF16 (candle's own operations have no BF16 products on the CPU). The one
    /// rule for every caller that turns a precision setting into kernels.
    pub fn with_precision(self, precision: Precision) -> Result<Kernels, &'static str> {
        match (self, precision) {
            (Kernels::Reference, Precision::Bf16) => {
                Err("precision bf16 needs our kernels: candle's reference operations run in fp32 only")
            }
            (Kernels::Fast | Kernels::Bf16, Precision::Bf16) => Ok(Kernels::Bf16),
            (Kernels::Bf16, Precision::Fp32) => Ok(Kernels::Fast),
            (kernels, Precision::Fp32) => Ok(kernels),
        }
    }

    /// The precision of the matrix products' operands.
    pub fn precision(self) -> Precision {
        match self {
            Kernels::Bf16 => Precision::Bf16,
            Kernels::Fast | Kernels::Reference => Precision::Fp32,
        }
    }
}

/// The precision of the matrix products' operands (accumulation is FP32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Precision {
    /// FP32 operands (the default).
    #[default]
    Fp32,
    /// BF16 operands, FP32 accumulation: see [`Kernels::Bf16`].
    #[cfg_attr(
        feature = "clap",
        value(help = "BF16 operands, FP32 accumulation, in the 1×1, im2col and dense products")
    )]
    Bf16,
}

impl Precision {
    /// `fp32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether products in this precision are FP32 products in this process: FP32, or BF16 on
    /// the [`Bf16Backend::Fp32`] backend (which must give the FP32 answers exactly, so it takes
    /// every FP32 path, the packed kernels included).
    pub(crate) fn fp32_products(self) -> bool {
        match self {
            Precision::Fp32 => true,
            Precision::Bf16 => bf16_backend() == Bf16Backend::Fp32,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `dst (m × n, stride dst_stride) = lhs · rhs` (+ the old `dst` when `accumulate`) in `precision`:
/// the FP32 GEMM, or BF16 operands on [`bf16_backend`].
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: gemm::View<'_>,
    rhs: gemm::View<'_>,
    accumulate: bool,
    threads: gemm::Threads,
    precision: Precision,
) -> candle_core::Result<()> {
    match precision {
        Precision::Fp32 => gemm::sgemm(dst, dst_stride, lhs, rhs, accumulate, threads),
        Precision::Bf16 => bf16::gemm_with(dst, dst_stride, lhs, rhs, accumulate, threads, bf16_backend()),
    }
}

/// A left operand shared by many products in one precision (a layer's weights applied image by
/// image): with BF16 operands on a hardware backend it is rounded and packed once.
pub(crate) enum SharedLhs<'a> {
    Fp32(gemm::View<'a>),
    Bf16(bf16::SharedLhs<'a>),
}

impl<'a> SharedLhs<'a> {
    /// Prepares `lhs` for products in `precision`.
    pub(crate) fn new(lhs: gemm::View<'a>, precision: Precision) -> Self {
        match precision {
            Precision::Fp32 => SharedLhs::Fp32(lhs),
            Precision::Bf16 => SharedLhs::Bf16(bf16::SharedLhs::new(lhs, bf16_backend())),
        }
    }

    /// Like [`SharedLhs::new`], reusing `packed` (packed earlier from the same values) where it
    /// fits this product's precision, backend and shape.
    pub(crate) fn prepacked(
        lhs: gemm::View<'a>,
        precision: Precision,
        packed: Option<&'a bf16::PackedLhs>,
    ) -> Self {
        match precision {
            Precision::Fp32 => SharedLhs::Fp32(lhs),
            Precision::Bf16 => SharedLhs::Bf16(bf16::SharedLhs::prepacked(lhs, bf16_backend(), packed)),
        }
    }

    /// `dst (m × n, stride dst_stride) = lhs · rhs` (+ the old `dst` when `accumulate`), as
    /// [`matmul`] computes it.
    pub(crate) fn matmul(
        &self,
        dst: &mut [f32],
        dst_stride: usize,
        rhs: gemm::View<'_>,
        accumulate: bool,
        threads: gemm::Threads,
    ) -> candle_core::Result<()> {
        match self {
            SharedLhs::Fp32(lhs) => gemm::sgemm(dst, dst_stride, *lhs, rhs, accumulate, threads),
            SharedLhs::Bf16(lhs) => lhs.matmul(dst, dst_stride, rhs, accumulate, threads),
        }
    }

    /// `dst (n × m, stride dst_stride) = lhs (n × k) · thisᵀ`: the product with this operand
    /// (`m × k`) transposed on the right, in its precision (for BF16 on its backend, packed afresh:
    /// the packed form is for the left side).
    pub(crate) fn matmul_transposed(
        &self,
        dst: &mut [f32],
        dst_stride: usize,
        lhs: gemm::View<'_>,
        threads: gemm::Threads,
    ) -> candle_core::Result<()> {
        match self {
            SharedLhs::Fp32(this) => gemm::sgemm(dst, dst_stride, lhs, this.t(), false, threads),
            SharedLhs::Bf16(this) => bf16::gemm_with(
                dst,
                dst_stride,
                lhs,
                this.view().t(),
                false,
                threads,
                this.backend(),
            ),
        }
    }
}

/// Runs `f` on a thread of rayon's pool, the pool every kernel here splits its work on, and
/// returns its result; on the calling thread when that is already one of the pool's.
///
/// Called from outside the pool, each kernel hands its work to the pool's threads and sleeps until
/// they finish, so a forward pass of a few dozen ops wakes a sleeping thread a few dozen times.
/// Run from inside, the caller is one of the workers: it takes a share of each op itself and only
/// the other workers are woken. EfficientNet-Lite0's one-image inference at 224 px took 8-12% less
/// time this way on two cores (`bench_step infer 224 1`, alternated runs); a training step, whose
/// ops are each long, gained nothing measurable.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// `a (m × k) · b (k × n)`, both row-major f32, with BF16 operands and FP32 accumulation on
/// `backend` (`[m, k, n]` the shape): `(m × n)` row-major. For checking and timing the backends;
/// an error names a slice that does not fit its shape or a backend this processor lacks.
pub fn matmul_bf16(
    a: &[f32],
    b: &[f32],
    [m, k, n]: [usize; 3],
    backend: Bf16Backend,
) -> candle_core::Result<Vec<f32>> {
    if a.len() != m * k || b.len() != k * n {
        candle_core::bail!(
            "matmul_bf16: a has {} values and b {}, but {m}×{k}·{k}×{n} needs {} and {}",
            a.len(),
            b.len(),
            m * k,
            k * n
        );
    }
    if !backend.is_supported() {
        candle_core::bail!("matmul_bf16: this processor cannot run the {backend} backend");
    }
    let mut out = vec![0.0; m * n];
    let threads = gemm::Threads::Pool(rayon::current_num_threads());
    bf16::gemm_with(
        &mut out,
        n,
        gemm::View::rows(a, m, k),
        gemm::View::rows(b, k, n),
        false,
        threads,
        backend,
    )?;
    Ok(out)
}

/// The data of a contiguous f32 CPU storage.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fracture kernels take f32 tensors");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fracture kernels take contiguous tensors"),
    }
}

/// A read guard on a tensor's storage, to borrow its data as a slice.
pub(crate) struct F32Ref<'a> {
    guard: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl F32Ref<'_> {
    pub(crate) fn slice(&self) -> candle_core::Result<&[f32]> {
        match &*self.guard {
            Storage::Cpu(cpu) => contiguous_f32(cpu, self.layout),
            _ => candle_core::bail!("fracture kernels run on the CPU"),
        }
    }
}

pub(crate) fn tensor_f32(t: &Tensor) -> candle_core::Result<F32Ref<'_>> {
    let (guard, layout) = t.storage_and_layout();
    Ok(F32Ref { guard, layout })
}

fn fast(kernels: Kernels, tensors: &[&Tensor]) -> bool {
    kernels != Kernels::Reference
        && tensors
            .iter()
            .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// Convolution of `x (B, Cin, H, W)` with `w (Cout, Cin, k, k)` plus `b (Cout,)`, then ReLU when
/// `spec.relu`: `(B, Cout, H', W')`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: ConvSpec,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x, w, b]) {
        return x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            conv::Conv2dOp {
                spec,
                precision: kernels.precision(),
            },
        );
    }
    // Stride 1, then every `stride`-th row and column: candle 0.11's own strided conv2d has a backward
    // pass that fails with a shape error for some odd sizes (its transposed convolution lacks an
    // output padding), so the reference path never uses it.
    let mut y = x.conv2d(w, spec.padding, 1, 1, 1)?;
    if spec.stride > 1 {
        let (_, _, h, wd) = y.dims4()?;
        let pick = |n: usize| -> candle_core::Result<Tensor> {
            let idx: Vec<u32> = (0..n).step_by(spec.stride).map(|i| i as u32).collect();
            Tensor::new(idx, y.device())
        };
        y = y.index_select(&pick(h)?, 2)?.index_select(&pick(wd)?, 3)?;
    }
    let y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
    if spec.relu { y.relu() } else { Ok(y) }
}

/// [`conv2d`] with ReLU, then [`max_pool2x2`], as one fused kernel on the CPU: `(B, Cout, H'/2, W'/2)`.
/// `spec.relu` is ignored (always on).
pub fn conv2d_relu_pool2x2(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: ConvSpec,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x, w, b]) {
        return x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            conv_pool::ConvReluPoolOp::new(spec, kernels.precision()),
        );
    }
    max_pool2x2(
        &conv2d(x, w, b, ConvSpec { relu: true, ..spec }, kernels)?,
        kernels,
    )
}

/// The `k × k` patches of `x (B, C, H, W)` at stride `stride`, planar: `(B, C·k·k, H', W')` with
/// `H' = (H − k) / stride + 1` (likewise `W'`; pad `x` first for "same" padding), plane
/// `c·k·k + ky·k + kx` holding `x[c][y·stride + ky][x·stride + kx]` at `(y, x)`. A convolution of
/// `x` with `w (Cout, C, k, k)` at that stride is then the 1×1 product of `w` viewed as
/// `(Cout, C·k·k)` with these planes, which is how a network folds its stem convolution into the
/// first inverted bottleneck's expansion. Values are copied exactly; the backward pass adds each
/// plane's gradient back to the positions it came from. An error when the taps do not fit `x`.
pub fn patches(x: &Tensor, k: usize, stride: usize, kernels: Kernels) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x]) {
        return x.contiguous()?.apply_op1(patches::PatchesOp { k, s: stride });
    }
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = patches::out_size(k, stride, h, w)?;
    let pick = |n: usize, from: usize| -> candle_core::Result<Tensor> {
        let idx: Vec<u32> = (0..n).map(|i| (from + i * stride) as u32).collect();
        Tensor::new(idx, x.device())
    };
    let mut taps = Vec::with_capacity(k * k);
    for ky in 0..k {
        let rows = x.index_select(&pick(oh, ky)?, 2)?;
        for kx in 0..k {
            taps.push(rows.index_select(&pick(ow, kx)?, 3)?);
        }
    }
    // (B, C, k·k, H', W') → (B, C·k·k, H', W').
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    Tensor::stack(&taps, 2)?.reshape((b, c * k * k, oh, ow))
}

/// 2×2 max pooling with stride 2 on `(B, C, H, W)`, floor semantics: `(B, C, H/2, W/2)`.
///
/// The reference path is reshape + two `max` reductions rather than `Tensor::max_pool2d`, whose
/// backward pass on the CPU in candle 0.11 gives gradients 10-20× too small.
pub fn max_pool2x2(x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x]) {
        return x.contiguous()?.apply_op1(pool::MaxPool2x2Op);
    }
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    if h2 == 0 || w2 == 0 {
        candle_core::bail!("max_pool2x2: input {h}×{w} is smaller than the 2×2 window");
    }
    let mut x = x.clone();
    if h % 2 == 1 {
        x = x.narrow(2, 0, h2 * 2)?;
    }
    if w % 2 == 1 {
        x = x.narrow(3, 0, w2 * 2)?;
    }
    x.contiguous()?.reshape((b, c, h2, 2, w2, 2))?.max(5)?.max(3)
}

/// `x (B, In) · wᵀ + b` with `w (Out, In)`, `b (Out,)`, then ReLU when `relu`: `(B, Out)`.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    relu: bool,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x, w, b]) {
        return x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            linear::LinearOp {
                relu,
                precision: kernels.precision(),
            },
        );
    }
    let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
    if relu { y.relu() } else { Ok(y) }
}

/// Batch normalization of `x (B, C, H, W)` with the batch's own statistics (training mode):
/// `y = act((x − mean_c) / √(var_c + eps) · gamma_c + beta_c)`; `gamma`, `beta`: `(C,)`. Returns
/// `y` and the per-channel batch mean and biased variance, `(C,)` each and detached from the graph
/// (for running statistics).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Activation,
    kernels: Kernels,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let c = gamma.elem_count();
    if fast(kernels, &[x, gamma, beta]) {
        let stats = Arc::new(Mutex::new(batchnorm::BatchStats::default()));
        let y = x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            batchnorm::BatchNormOp {
                eps,
                act,
                stats: stats.clone(),
                norm: Mutex::new(None),
            },
        )?;
        let s = stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch norm: poisoned".into()))?
            .clone();
        let dev = x.device();
        return Ok((
            y,
            Tensor::from_vec(s.mean, c, dev)?,
            Tensor::from_vec(s.var, c, dev)?,
        ));
    }
    let mean = x.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    let shape = (1, c, 1, 1);
    let y = centred
        .broadcast_div(&(&var + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape(shape)?)?
        .broadcast_add(&beta.reshape(shape)?)?;
    let y = act.reference(y)?;
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

/// `y = act(x · scale_c + shift_c)` on `x (B, C, H, W)` with `scale`, `shift`: `(C,)`: batch
/// normalization with fixed statistics (inference, or frozen statistics during fine-tuning), with
/// gradients for the input, the scale and the shift.
pub fn affine_act(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    act: Activation,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x, scale, shift]) {
        return x.contiguous()?.apply_op3(
            &scale.contiguous()?,
            &shift.contiguous()?,
            batchnorm::AffineActOp { act },
        );
    }
    let c = scale.elem_count();
    let y = x
        .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
        .broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
    act.reference(y)
}

/// Whether the depthwise reference path is candle's grouped `conv2d` instead of the sum of taps:
/// `FRACTURE_DEPTHWISE=grouped` in the environment, read once. A diagnostic for measuring the two
/// on a GPU (`cargo xtask gpu-check` times both); the taps are the default.
fn grouped_depthwise() -> bool {
    static GROUPED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GROUPED.get_or_init(|| std::env::var("FRACTURE_DEPTHWISE").is_ok_and(|v| v == "grouped"))
}

/// Depthwise convolution of `x (B, C, H, W)` with `w (C, 1, k, k)` (one filter per channel, no
/// bias), zero padding and stride as `spec` says: `(B, C, H', W')`. The reference path sums the
/// `k × k` taps: each a shifted slice of the zero-padded input times its channel's weight, at
/// stride 1, then every `stride`-th row and column. Those are element-wise operations every candle
/// backend runs fast (candle's grouped `conv2d` would run one convolution per channel, thousands of
/// launches a step on a GPU).
pub fn depthwise_conv2d(
    x: &Tensor,
    w: &Tensor,
    spec: DepthwiseSpec,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x, w]) {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, depthwise::DepthwiseOp { spec });
    }
    let (b, c, h, wd) = x.dims4()?;
    let (p, k) = (spec.padding, spec.kernel);
    if w.dims4()? != (c, 1, k, k) {
        candle_core::bail!("depthwise weights {:?} for {c} channels and kernel {k}", w.dims());
    }
    let xp = x
        .pad_with_zeros(2, p.top, p.bottom)?
        .pad_with_zeros(3, p.left, p.right)?;
    let mut y = if grouped_depthwise() {
        xp.conv2d(w, 0, 1, 1, c)?
    } else {
        let rows = (h + p.top + p.bottom + 1).saturating_sub(k);
        let cols = (wd + p.left + p.right + 1).saturating_sub(k);
        let taps = w.reshape((c, k * k))?;
        let mut y = Tensor::zeros((b, c, rows, cols), x.dtype(), x.device())?;
        for i in 0..k {
            for j in 0..k {
                let weight = taps.narrow(1, i * k + j, 1)?.reshape((1, c, 1, 1))?;
                let slice = xp.narrow(2, i, rows)?.narrow(3, j, cols)?;
                y = (y + slice.broadcast_mul(&weight)?)?;
            }
        }
        y
    };
    if spec.stride > 1 {
        let (oh, ow) = spec.out_dims(h, wd);
        let pick = |n: usize| -> candle_core::Result<Tensor> {
            let idx: Vec<u32> = (0..n).map(|i| (i * spec.stride) as u32).collect();
            Tensor::new(idx, y.device())
        };
        y = y.index_select(&pick(oh)?, 2)?.index_select(&pick(ow)?, 3)?;
    }
    Ok(y)
}

/// 1×1 convolution without bias: `x (B, Cin, H, W)`, `w (Cout, Cin, 1, 1)` → `(B, Cout, H, W)`.
pub fn conv1x1(x: &Tensor, w: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
    if fast(kernels, &[x, w]) {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, pointwise::PointwiseOp(kernels.precision()));
    }
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, _, _, _) = w.dims4()?;
    let w2 = w.reshape((cout, cin))?;
    // (B, Cin, HW) → (B, HW, Cin) · (Cin, Cout) → (B, HW, Cout) → (B, Cout, H, W).
    x.reshape((b, cin, h * wd))?
        .transpose(1, 2)?
        .broadcast_matmul(&w2.t()?)?
        .transpose(1, 2)?
        .reshape((b, cout, h, wd))
}

/// Inverted dropout with a caller-supplied generator: each element is zeroed with probability `p`
/// and the survivors are scaled by `1 / (1 - p)`. The mask is drawn on the host, so the same
/// generator state gives the same mask on every device and with either kernel choice. `p = 0`
/// returns the input unchanged.
pub fn dropout(x: &Tensor, p: f32, rng: &mut impl Rng, kernels: Kernels) -> candle_core::Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability has to be in [0, 1), got {p}")
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    // One 16-bit draw per element (p is applied in steps of 1/65536), taken from a bulk fill.
    let threshold = (f64::from(p) * 65536.0).round() as u32;
    let mut bytes = vec![0u8; 2 * x.elem_count()];
    rng.fill_bytes(&mut bytes);
    let keep = dropout::keep_mask(&bytes, threshold);
    if fast(kernels, &[x]) {
        return x.contiguous()?.apply_op1(dropout::DropoutOp {
            keep: Arc::new(keep),
            scale,
        });
    }
    let mask: Vec<f32> = keep.iter().map(|&k| if k != 0 { scale } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// A whole mobile inverted bottleneck on `x (B, cin, H, W)` with the parameters concatenated in
/// `params` as [`MbConvSpec::layout`] says: `[1×1 expand → BN0 → ReLU6] → k×k depthwise ("SAME"
/// padding, `spec.stride`) → BN1 → ReLU6 → 1×1 project → BN2 (+ x when the shape is unchanged)`,
/// `(B, cout, ⌈H/s⌉, ⌈W/s⌉)`.
///
/// With `running = None` the batch norms use the batch's statistics and the returned
/// [`BlockStats`] holds them (mean and biased variance per norm, in block order); with
/// `Some(stats)` they use those fixed statistics and nothing is returned. The reference path is the
/// composition of the single operations with candle's own ops.
pub fn mbconv(
    x: &Tensor,
    params: &Tensor,
    spec: MbConvSpec,
    running: Option<BlockStats>,
    kernels: Kernels,
) -> candle_core::Result<(Tensor, BlockStats)> {
    if fast(kernels, &[x, params]) {
        let stats = Arc::new(Mutex::new(Vec::new()));
        // Without a tracked input candle never calls the backward pass, so nothing need be kept.
        let keep = x.track_op() || params.track_op();
        let y = x.contiguous()?.apply_op2(
            &params.contiguous()?,
            mbconv::MbConvOp::new(spec, running, stats.clone(), kernels.precision(), keep, None),
        )?;
        let stats = std::mem::take(
            &mut *stats
                .lock()
                .map_err(|_| candle_core::Error::Msg("inverted bottleneck: poisoned".into()))?,
        );
        return Ok((y, stats));
    }
    let lay = spec.layout();
    let part = |r: &std::ops::Range<usize>| params.narrow(0, r.start, r.len());
    let mut stats = Vec::new();
    let mut index = 0;
    let mut norm = |y: &Tensor,
                    (g, b): &(std::ops::Range<usize>, std::ops::Range<usize>),
                    act: Activation|
     -> candle_core::Result<Tensor> {
        let (gamma, beta) = (part(g)?, part(b)?);
        let out = match &running {
            None => {
                let (out, mean, var) = batch_norm_train(y, &gamma, &beta, spec.eps, act, kernels)?;
                stats.push((
                    mean.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    var.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                ));
                out
            }
            Some(r) => {
                let (m, v) = &r[index];
                let dev = y.device();
                let m = Tensor::from_slice(m, m.len(), dev)?.to_dtype(y.dtype())?;
                let v = Tensor::from_slice(v, v.len(), dev)?.to_dtype(y.dtype())?;
                let scale = gamma.broadcast_div(&(v + spec.eps)?.sqrt()?)?;
                let shift = (beta - (m * &scale)?)?;
                affine_act(y, &scale, &shift, act, kernels)?
            }
        };
        index += 1;
        Ok(out)
    };
    let mut h = x.clone();
    if let (Some(we), Some(bn0)) = (&lay.expand, &lay.bn0) {
        let w = part(we)?.reshape((spec.mid, spec.cin, 1, 1))?;
        h = norm(&conv1x1(&h, &w, kernels)?, bn0, Activation::Relu6)?;
    }
    let (_, _, rows, cols) = h.dims4()?;
    let dspec = DepthwiseSpec {
        kernel: spec.kernel,
        stride: spec.stride,
        padding: Padding::same(rows, cols, spec.kernel, spec.stride),
    };
    let wd = part(&lay.depthwise)?.reshape((spec.mid, 1, spec.kernel, spec.kernel))?;
    let h = norm(
        &depthwise_conv2d(&h, &wd, dspec, kernels)?,
        &lay.bn1,
        Activation::Relu6,
    )?;
    let wp = part(&lay.project)?.reshape((spec.cout, spec.mid, 1, 1))?;
    let h = norm(&conv1x1(&h, &wp, kernels)?, &lay.bn2, Activation::None)?;
    let y = if spec.skip() { (h + x)? } else { h };
    Ok((y, stats))
}

/// `n` deterministic pseudo-random values in [-1, 1) (xorshift from `seed`) for the unit tests:
/// the same values the integration tests' `common::values` draws.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}
