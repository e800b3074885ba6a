//! A network's last 1×1 convolution with its fixed batch norm, activation and global average
//! pooling, prepared once ([`FrozenHead`]) and run as one pass ([`head_pooled`]): on the CPU, with
//! FP32 products and the packed kernels of `packed.rs`, each image's `(H·W, Cout)` map is computed
//! channels-last into a per-thread buffer and averaged there, so the full feature map (at 224 px,
//! batch 32 and 1280 channels, 8 MB) is never written, normalized in a second pass, or read back
//! for the pooling.

use std::sync::OnceLock;

use candle_core::Tensor;
use rayon::prelude::*;

use super::packed::PackedF32;
use super::{Activation, Kernels, affine_act, conv1x1, fast, simd, tensor_f32};

/// The head's weights `w (Cout, Cin, 1, 1)` and its fixed per-channel `scale`, `shift` (a batch
/// norm with running statistics folded) and activation, copied and held for repeated inference.
#[derive(Debug)]
pub struct FrozenHead {
    w: Tensor,
    scale: Tensor,
    shift: Tensor,
    act: Activation,
    /// `w` packed for the FP32 kernels, made on first use (`None` inside where they do not run).
    packed: OnceLock<Option<PackedF32>>,
}

impl FrozenHead {
    /// Copies the head's parameters. An error when `w` is not `(Cout, Cin, 1, 1)` or `scale` and
    /// `shift` do not hold `Cout` values each.
    pub fn new(w: &Tensor, scale: &Tensor, shift: &Tensor, act: Activation) -> candle_core::Result<Self> {
        let (cout, _, kh, kw) = w.dims4()?;
        if (kh, kw) != (1, 1) || scale.dims() != [cout] || shift.dims() != [cout] {
            candle_core::bail!(
                "frozen head: weights {:?}, scale {:?} and shift {:?} do not make a 1×1 convolution with one scale and shift per output channel",
                w.dims(),
                scale.dims(),
                shift.dims()
            );
        }
        Ok(FrozenHead {
            w: w.detach().copy()?,
            scale: scale.detach().copy()?,
            shift: shift.detach().copy()?,
            act,
            packed: OnceLock::new(),
        })
    }

    fn packed(&self) -> Option<&PackedF32> {
        self.packed
            .get_or_init(|| {
                let (cout, cin, _, _) = self.w.dims4().ok()?;
                let w = self.w.flatten_all().ok()?.to_vec1::<f32>().ok()?;
                PackedF32::new(&w, cout, cin)
            })
            .as_ref()
    }
}

/// The prepared head on `x (B, Cin, H, W)`: `(B, Cout)`, each value the mean over the `H·W`
/// positions of `act(scale · (w · x) + shift)`, the same as [`conv1x1`], [`affine_act`] and a mean
/// over both spatial axes. One pass on the CPU with FP32 products, an untracked `x` and at least
/// one image per thread; otherwise those three ops (gradients flow to `x`).
pub fn head_pooled(x: &Tensor, head: &FrozenHead, kernels: Kernels) -> candle_core::Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let one_pass = fast(kernels, &[x, &head.w])
        && kernels.precision().fp32_products()
        && !x.track_op()
        && b >= rayon::current_num_threads();
    if let Some(packed) = one_pass.then(|| head.packed()).flatten() {
        let cout = head.w.dim(0)?;
        if head.w.dim(1)? != cin {
            candle_core::bail!(
                "frozen head: input of {cin} channels for weights {:?}",
                head.w.dims()
            );
        }
        let (scale, shift) = (head.scale.to_vec1::<f32>()?, head.shift.to_vec1::<f32>()?);
        let (lo, hi) = match head.act {
            Activation::None => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Relu => (0.0, f32::INFINITY),
            Activation::Relu6 => (0.0, 6.0),
        };
        let x = x.contiguous()?;
        let xs = tensor_f32(&x)?;
        let xv = xs.slice()?;
        let p = h * w;
        let mut out = vec![0.0f32; b * cout];
        out.par_chunks_mut(cout)
            .zip(xv.par_chunks(cin * p))
            .try_for_each_init(
                Vec::new,
                |map: &mut Vec<f32>, (o, xi)| -> candle_core::Result<()> {
                    map.resize(p * cout, 0.0);
                    packed.expand(map, cout, xi, p, p)?;
                    simd(
                        #[inline(always)]
                        || {
                            for row in map.chunks_exact(cout) {
                                for (((acc, &v), &sc), &sh) in o.iter_mut().zip(row).zip(&scale).zip(&shift) {
                                    *acc += (v * sc + sh).clamp(lo, hi);
                                }
                            }
                            let inv = 1.0 / p as f32;
                            o.iter_mut().for_each(|v| *v *= inv);
                        },
                    );
                    Ok(())
                },
            )?;
        return Tensor::from_vec(out, (b, cout), x.device());
    }
    let y = affine_act(
        &conv1x1(x, &head.w, kernels)?,
        &head.scale,
        &head.shift,
        head.act,
        kernels,
    )?;
    y.mean(3)?.mean(2)
}
