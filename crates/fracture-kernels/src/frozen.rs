//! An inverted bottleneck prepared once for a network whose weights no longer change: its
//! parameters stay one flat tensor between forward passes (the network otherwise concatenates its
//! variables on every call) and its two 1×1 weight matrices are packed on the first call instead
//! of on every one: rounded to BF16 for a BF16 hardware backend, or in blocks of 16 rows for the
//! FP32 kernels of `packed.rs`. The concatenation and the BF16 packing were about a tenth of
//! EfficientNet-Lite0's one-image inference at 224 px (`perf record` on `bench_step infer 224 1
//! --precision bf16`).

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::Tensor;

use super::mbconv::{MbConvOp, Prepacked};
use super::packed::PackedF32;
use super::{Activation, BlockStats, Kernels, MbConvSpec, Precision, affine_act, bf16_backend, fast, mbconv};

/// An inverted bottleneck's parameters and fixed batch-norm statistics, held for repeated
/// inference with [`mbconv_frozen`].
#[derive(Debug)]
pub struct FrozenMbConv {
    /// A private copy of the flat parameters, laid out as [`MbConvSpec::layout`] says.
    params: Tensor,
    spec: MbConvSpec,
    /// Each norm's running `(mean, var)`, in block order.
    running: BlockStats,
    /// The 1×1 weights packed for the BF16 backend, made by the first BF16 forward pass (`None`
    /// inside when that backend packs nothing: FP32 or emulated).
    prepacked: OnceLock<Option<Arc<Prepacked>>>,
    /// The 1×1 weights packed for the FP32 kernels of `packed.rs`, made by the first forward pass
    /// with FP32 products (`None` inside where those kernels do not run or the block does not
    /// expand).
    packed_fp32: OnceLock<Option<Arc<(PackedF32, PackedF32)>>>,
    /// Per input channel `(scale, shift)` of a normalization + ReLU6 applied to the input first
    /// ([`FrozenMbConv::with_input_norm`]).
    input: Option<(Vec<f32>, Vec<f32>)>,
}

impl FrozenMbConv {
    /// Prepares a block from its flat `params` (as [`mbconv()`](crate::mbconv()) takes them) and each norm's running
    /// `(mean, var)`. The parameters are copied, so later changes to the tensor they came from (an
    /// optimizer's in-place step on the variables) do not reach the prepared block. An error when
    /// `params` is not a flat f32 tensor of the length `spec` lays out, or `running` does not hold
    /// one `(mean, var)` of the right widths per norm.
    pub fn new(params: &Tensor, spec: MbConvSpec, running: BlockStats) -> candle_core::Result<Self> {
        let lay = spec.layout();
        if params.dims() != [lay.len] {
            candle_core::bail!(
                "frozen inverted bottleneck: parameters of shape {:?}, expected ({},) for {spec:?}",
                params.dims(),
                lay.len
            );
        }
        let widths: Vec<usize> = [spec.expand.then_some(spec.mid), Some(spec.mid), Some(spec.cout)]
            .into_iter()
            .flatten()
            .collect();
        let fits = running.len() == widths.len()
            && running
                .iter()
                .zip(&widths)
                .all(|((m, v), &w)| m.len() == w && v.len() == w);
        if !fits {
            candle_core::bail!(
                "frozen inverted bottleneck: running statistics for norms of widths {:?}, expected {widths:?}",
                running.iter().map(|(m, _)| m.len()).collect::<Vec<_>>()
            );
        }
        Ok(FrozenMbConv {
            params: params.detach().copy()?,
            spec,
            running,
            prepacked: OnceLock::new(),
            packed_fp32: OnceLock::new(),
            input: None,
        })
    }

    /// The block applied to `ReLU6(x · scale + shift)` (per input channel) instead of `x`: the
    /// batch norm and ReLU6 of the layer before folded in (EfficientNet's stem), so that layer
    /// need not write its normalized output; the depthwise stage applies them as it reads each
    /// plane. Only for a block without expansion or skip (the stem's 32 channels into the first
    /// block's 16); an error names what does not fit.
    pub fn with_input_norm(mut self, scale: Vec<f32>, shift: Vec<f32>) -> candle_core::Result<Self> {
        let s = self.spec;
        if s.expand || s.skip() {
            candle_core::bail!(
                "frozen inverted bottleneck: an input normalization needs a block without expansion or skip, not {s:?}"
            );
        }
        if scale.len() != s.cin || shift.len() != s.cin {
            candle_core::bail!(
                "frozen inverted bottleneck: input normalization of {} scales and {} shifts for {} channels",
                scale.len(),
                shift.len(),
                s.cin
            );
        }
        self.input = Some((scale, shift));
        Ok(self)
    }

    /// The block's shape.
    pub fn spec(&self) -> MbConvSpec {
        self.spec
    }

    /// Whether an input normalization is folded in ([`FrozenMbConv::with_input_norm`]).
    pub fn has_input_norm(&self) -> bool {
        self.input.is_some()
    }

    /// The packed 1×1 weights for BF16 products, made on first use.
    fn prepacked(&self) -> Option<Arc<Prepacked>> {
        self.prepacked
            .get_or_init(|| {
                let backend = bf16_backend();
                let hardware = matches!(backend, super::Bf16Backend::Amx | super::Bf16Backend::Avx512);
                let values = hardware.then(|| self.params.to_vec1::<f32>().ok()).flatten()?;
                Some(Arc::new(Prepacked::new(&values, self.spec, backend)))
            })
            .clone()
    }
}

/// The prepared block applied to `x (B, cin, H, W)`: `(B, cout, H/stride, W/stride)`, the same
/// values as [`mbconv()`](crate::mbconv()) with the block's parameters and `Some(running)` (the packed weights are the
/// ones it would pack), after [`affine_act`] with ReLU6 for an input normalization. A tracked `x`
/// (an input gradient wanted, as for Grad-CAM) gets its backward pass; the parameters never get
/// gradients.
pub fn mbconv_frozen(x: &Tensor, block: &FrozenMbConv, kernels: Kernels) -> candle_core::Result<Tensor> {
    let fused = fast(kernels, &[x, &block.params]);
    // Off the fused path, or with a backward pass to follow, the input normalization is its own op.
    let separate = !fused || x.track_op();
    let normalized;
    let x = match &block.input {
        Some((scale, shift)) if separate => {
            let dev = x.device();
            let (scale, shift) = (
                Tensor::new(scale.as_slice(), dev)?,
                Tensor::new(shift.as_slice(), dev)?,
            );
            normalized = affine_act(x, &scale, &shift, Activation::Relu6, kernels)?;
            &normalized
        }
        _ => x,
    };
    if !fused {
        let running = Some(block.running.clone());
        return Ok(mbconv(x, &block.params, block.spec, running, kernels)?.0);
    }
    let precision = kernels.precision();
    let prepacked = match precision {
        Precision::Bf16 => block.prepacked(),
        Precision::Fp32 => None,
    };
    let op = MbConvOp::new(
        block.spec,
        Some(block.running.clone()),
        Arc::new(Mutex::new(Vec::new())),
        precision,
        x.track_op(),
        prepacked,
    );
    let op = match &block.input {
        Some((scale, shift)) if !separate => op.with_input(scale.clone(), shift.clone()),
        _ => op,
    };
    let op = if op.packed_fp32() {
        let packed = block.packed_fp32.get_or_init(|| {
            let values = block.params.to_vec1::<f32>().ok()?;
            PackedF32::block(&values, block.spec).map(Arc::new)
        });
        op.with_fp32_weights(packed.clone())
    } else {
        op
    };
    x.contiguous()?.apply_op2(&block.params, op)
}
