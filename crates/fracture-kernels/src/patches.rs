//! [`super::patches()`] on the CPU: each input plane's `k × k` shifted, strided copies, one output
//! plane per tap (what an im2col convolution multiplies, kept planar so that a 1×1 product of it
//! is the convolution), and the backward pass that adds each tap's gradient back where it came
//! from.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, tensor_f32};

/// The op: `k × k` taps at stride `s`, no padding (pad the input first).
pub(crate) struct PatchesOp {
    pub(crate) k: usize,
    pub(crate) s: usize,
}

/// The output plane `(H', W')` of `k × k` taps at stride `s` on an `h × w` input, or an error
/// naming what does not fit (the CPU op and the reference path of [`super::patches()`] alike).
pub(crate) fn out_size(k: usize, s: usize, h: usize, w: usize) -> candle_core::Result<(usize, usize)> {
    if k == 0 || s == 0 || h < k || w < k {
        candle_core::bail!("patches: {k}×{k} taps at stride {s} do not fit a {h}×{w} input");
    }
    Ok(((h - k) / s + 1, (w - k) / s + 1))
}

impl PatchesOp {
    /// `(b, c, h, w, oh, ow)` of an input shape, or an error naming what does not fit.
    fn dims(&self, dims: &[usize]) -> candle_core::Result<[usize; 6]> {
        let &[b, c, h, w] = dims else {
            candle_core::bail!("patches: expected (B, C, H, W) input, got {dims:?}");
        };
        let (oh, ow) = out_size(self.k, self.s, h, w)?;
        Ok([b, c, h, w, oh, ow])
    }
}

impl CustomOp1 for PatchesOp {
    fn name(&self) -> &'static str {
        "fracture-patches"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [b, c, h, w, oh, ow] = self.dims(layout.dims())?;
        let (k, s, kk) = (self.k, self.s, self.k * self.k);
        let x = contiguous_f32(storage, layout)?;
        let mut out = vec![0.0f32; b * c * kk * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(i, o)| {
            let (plane, t) = (i / kk, i % kk);
            let (ky, kx) = (t / k, t % k);
            let src = &x[plane * h * w..][..h * w];
            for (oy, row) in o.chunks_exact_mut(ow).enumerate() {
                let line = &src[(oy * s + ky) * w + kx..];
                for (ox, v) in row.iter_mut().enumerate() {
                    *v = line[ox * s];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c * kk, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [b, c, h, w, oh, ow] = self.dims(arg.dims())?;
        let (k, s, kk) = (self.k, self.s, self.k * self.k);
        let grad = grad_res.contiguous()?;
        let gs = tensor_f32(&grad)?;
        let g = gs.slice()?;
        let mut dx = vec![0.0f32; b * c * h * w];
        dx.par_chunks_mut(h * w).enumerate().for_each(|(plane, d)| {
            for t in 0..kk {
                let (ky, kx) = (t / k, t % k);
                let gp = &g[(plane * kk + t) * oh * ow..][..oh * ow];
                for (oy, row) in gp.chunks_exact(ow).enumerate() {
                    let line = &mut d[(oy * s + ky) * w + kx..];
                    for (ox, v) in row.iter().enumerate() {
                        line[ox * s] += v;
                    }
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, (b, c, h, w), arg.device())?))
    }
}
