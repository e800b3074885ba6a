//! Batch normalization in training mode (batch statistics) with an optional activation (ReLU or
//! ReLU6), on `(B, C, H, W)` f32, as one op: one pass for the statistics, one for the output; the
//! backward pass recomputes the normalized input from the saved statistics instead of keeping it.
//! Also the per-channel affine map with an activation (batch normalization with fixed statistics).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Activation, contiguous_f32, tensor_f32};

/// Per-channel batch statistics of the last forward pass: the mean and the biased variance.
#[derive(Debug, Default, Clone)]
pub(crate) struct BatchStats {
    pub(crate) mean: Vec<f32>,
    pub(crate) var: Vec<f32>,
}

pub(crate) struct BatchNormOp {
    pub(crate) eps: f64,
    pub(crate) act: Activation,
    /// Written by the forward pass; read by the caller (running statistics) and the backward pass.
    pub(crate) stats: Arc<Mutex<BatchStats>>,
}

fn dims(x: &[usize], c: usize) -> candle_core::Result<(usize, usize, usize)> {
    match x {
        &[b, ch, h, w] if ch == c && b * h * w > 0 => Ok((b, ch, h * w)),
        other => candle_core::bail!("batch norm: expected (B, {c}, H, W) with B·H·W > 0, got {other:?}"),
    }
}

/// The elements of channel `c`: `b` runs of `hw` values, `ch · hw` apart.
fn channel(x: &[f32], c: usize, ch: usize, hw: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(ch * hw)
        .map(move |image| &image[c * hw..(c + 1) * hw])
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "fracture-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gamma, beta) = (contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let (b, ch, hw) = dims(l1.dims(), gamma.len())?;
        if beta.len() != ch {
            candle_core::bail!("batch norm: {} shifts for {ch} channels", beta.len());
        }
        let x = contiguous_f32(s1, l1)?;
        let n = (b * hw) as f64;
        // Two-pass statistics in f64 per channel: exact enough for any activation range.
        let stats: Vec<(f32, f32)> = (0..ch)
            .into_par_iter()
            .map(|c| {
                let sum: f64 = channel(x, c, ch, hw)
                    .map(|run| run.iter().map(|&v| f64::from(v)).sum::<f64>())
                    .sum();
                let mean = sum / n;
                let sq: f64 = channel(x, c, ch, hw)
                    .map(|run| run.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>())
                    .sum();
                (mean as f32, (sq / n) as f32)
            })
            .collect();
        let coef: Vec<(f32, f32)> = stats
            .iter()
            .zip(gamma.iter().zip(beta))
            .map(|(&(mean, var), (&g, &bt))| {
                let scale = g / (f64::from(var) + self.eps).sqrt() as f32;
                (scale, bt - mean * scale)
            })
            .collect();
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(k, (yo, xi))| {
                let (scale, shift) = coef[k % ch];
                affine_act(yo, xi, scale, shift, self.act);
            });
        if let Ok(mut saved) = self.stats.lock() {
            saved.mean = stats.iter().map(|s| s.0).collect();
            saved.var = stats.iter().map(|s| s.1).collect();
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, ch, hw) = dims(x.dims(), gamma.elem_count())?;
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch norm: poisoned".into()))?
            .clone();
        if stats.mean.len() != ch {
            candle_core::bail!("batch norm: backward without a matching forward pass");
        }
        let grad = grad_res.contiguous()?;
        let (xs, gs, ys, dys) = (
            tensor_f32(x)?,
            tensor_f32(gamma)?,
            tensor_f32(res)?,
            tensor_f32(&grad)?,
        );
        let (xv, gv, yv, dyv) = (xs.slice()?, gs.slice()?, ys.slice()?, dys.slice()?);
        let n = (b * hw) as f64;
        let invstd: Vec<f32> = stats
            .var
            .iter()
            .map(|&v| (1.0 / (f64::from(v) + self.eps).sqrt()) as f32)
            .collect();
        // dz: the gradient after the activation's mask (read off the output).
        let act = self.act;
        let dz = |k: usize, i: usize| -> f32 {
            if act.passes(yv[k * hw + i]) {
                dyv[k * hw + i]
            } else {
                0.0
            }
        };
        // Per channel: Σ dz (the shift's gradient) and Σ dz · x̂ (the scale's).
        let sums: Vec<(f64, f64)> = (0..ch)
            .into_par_iter()
            .map(|c| {
                let (mean, is) = (stats.mean[c], invstd[c]);
                let (mut s1, mut s2) = (0.0f64, 0.0f64);
                for img in 0..b {
                    let k = img * ch + c;
                    let xr = &xv[k * hw..(k + 1) * hw];
                    for (i, &v) in xr.iter().enumerate() {
                        let d = f64::from(dz(k, i));
                        s1 += d;
                        s2 += d * f64::from((v - mean) * is);
                    }
                }
                (s1, s2)
            })
            .collect();
        let mut dx = vec![0.0f32; xv.len()];
        dx.par_chunks_mut(hw).enumerate().for_each(|(k, out)| {
            let c = k % ch;
            let (mean, is, g) = (stats.mean[c], invstd[c], gv[c]);
            let (db, dg) = (sums[c].0 / n, sums[c].1 / n);
            let xr = &xv[k * hw..(k + 1) * hw];
            for (i, (o, &v)) in out.iter_mut().zip(xr).enumerate() {
                let xhat = (v - mean) * is;
                *o = g * is * (dz(k, i) - db as f32 - xhat * dg as f32);
            }
        });
        let dev = x.device();
        let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, ch, dev)?),
            Some(Tensor::from_vec(dbeta, ch, dev)?),
        ))
    }
}

/// `y = act(x · scale + shift)` over one run of a channel.
#[inline]
pub(crate) fn affine_act(y: &mut [f32], x: &[f32], scale: f32, shift: f32, act: Activation) {
    match act {
        Activation::None => y.iter_mut().zip(x).for_each(|(o, &v)| *o = v * scale + shift),
        Activation::Relu => y
            .iter_mut()
            .zip(x)
            .for_each(|(o, &v)| *o = (v * scale + shift).max(0.0)),
        Activation::Relu6 => y
            .iter_mut()
            .zip(x)
            .for_each(|(o, &v)| *o = (v * scale + shift).clamp(0.0, 6.0)),
    }
}

/// The per-channel affine map with an activation, `y = act(x · scale_c + shift_c)`, on
/// `(B, C, H, W)`: batch normalization with fixed statistics (inference, or frozen statistics while
/// fine-tuning). Inputs `x`, `scale (C,)`, `shift (C,)`.
pub(crate) struct AffineActOp {
    pub(crate) act: Activation,
}

impl CustomOp3 for AffineActOp {
    fn name(&self) -> &'static str {
        "fracture-affine-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (scale, shift) = (contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let (_, ch, hw) = dims(l1.dims(), scale.len())?;
        if shift.len() != ch {
            candle_core::bail!("affine: {} shifts for {ch} channels", shift.len());
        }
        let x = contiguous_f32(s1, l1)?;
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(k, (yo, xi))| affine_act(yo, xi, scale[k % ch], shift[k % ch], self.act));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, ch, hw) = dims(x.dims(), scale.elem_count())?;
        let grad = grad_res.contiguous()?;
        let (xs, ss, ys, dys) = (
            tensor_f32(x)?,
            tensor_f32(scale)?,
            tensor_f32(res)?,
            tensor_f32(&grad)?,
        );
        let (xv, sv, yv, dyv) = (xs.slice()?, ss.slice()?, ys.slice()?, dys.slice()?);
        let act = self.act;
        // Per (image, channel) run: dx, and the partial sums Σ dz (shift) and Σ dz · x (scale).
        let mut dx = vec![0.0f32; xv.len()];
        let partial: Vec<(f64, f64)> = dx
            .par_chunks_mut(hw)
            .enumerate()
            .map(|(k, out)| {
                let s = sv[k % ch];
                let (xr, yr, gr) = (&xv[k * hw..][..hw], &yv[k * hw..][..hw], &dyv[k * hw..][..hw]);
                let (mut s1, mut s2) = (0.0f32, 0.0f32);
                for i in 0..hw {
                    let dz = if act.passes(yr[i]) { gr[i] } else { 0.0 };
                    out[i] = dz * s;
                    s1 += dz;
                    s2 += dz * xr[i];
                }
                (f64::from(s1), f64::from(s2))
            })
            .collect();
        let (mut dshift, mut dscale) = (vec![0.0f64; ch], vec![0.0f64; ch]);
        for (k, (s1, s2)) in partial.into_iter().enumerate() {
            dshift[k % ch] += s1;
            dscale[k % ch] += s2;
        }
        let dev = x.device();
        let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(to32(dscale), ch, dev)?),
            Some(Tensor::from_vec(to32(dshift), ch, dev)?),
        ))
    }
}
