//! Batch normalization in training mode (batch statistics) with an optional activation (ReLU or
//! ReLU6), on `(B, C, H, W)` f32, as one op: one pass for the statistics, one for the output; the
//! backward pass recomputes the pre-activation from the input and the saved statistics instead of
//! keeping it. Also the per-channel affine map with an activation (batch normalization with fixed
//! statistics). Both are built from the slice-level functions of `norm.rs`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::norm::{self, Norm};
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
    /// Written by the forward pass; read by the caller (running statistics).
    pub(crate) stats: Arc<Mutex<BatchStats>>,
    /// The normalization the forward pass applied, for the backward pass.
    pub(crate) norm: Mutex<Option<Norm>>,
}

fn dims(x: &[usize], c: usize) -> candle_core::Result<(usize, usize, usize)> {
    match x {
        &[b, ch, h, w] if ch == c && b * h * w > 0 => Ok((b, ch, h * w)),
        other => candle_core::bail!("batch norm: expected (B, {c}, H, W) with B·H·W > 0, got {other:?}"),
    }
}

/// The gradient of the output as an owned buffer, to become the input gradient in place.
fn owned(grad: &Tensor) -> candle_core::Result<Vec<f32>> {
    let g = grad.contiguous()?;
    let r = tensor_f32(&g)?;
    Ok(r.slice()?.to_vec())
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
        let (_, ch, hw) = dims(l1.dims(), gamma.len())?;
        if beta.len() != ch {
            candle_core::bail!("batch norm: {} shifts for {ch} channels", beta.len());
        }
        let x = contiguous_f32(s1, l1)?;
        let stats = norm::channel_stats(x, ch, hw);
        let n = Norm::new(&stats, gamma, beta, self.eps, true);
        let mut y = vec![0.0f32; x.len()];
        norm::apply(&mut y, x, &n.scale, &n.shift, hw, self.act);
        if let Ok(mut saved) = self.stats.lock() {
            saved.mean = stats.iter().map(|s| s.0 as f32).collect();
            saved.var = stats.iter().map(|s| s.1 as f32).collect();
        }
        if let Ok(mut slot) = self.norm.lock() {
            *slot = Some(n);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, ch, hw) = dims(x.dims(), gamma.elem_count())?;
        let n = self
            .norm
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch norm: poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm: backward without a forward pass".into()))?;
        let mut dx = owned(grad_res)?;
        let g = {
            let (xs, gs) = (tensor_f32(x)?, tensor_f32(gamma)?);
            norm::backward(&mut dx, xs.slice()?, &n, gs.slice()?, hw, self.act)
        };
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(g.dgamma, ch, dev)?),
            Some(Tensor::from_vec(g.dbeta, ch, dev)?),
        ))
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
        norm::apply(&mut y, x, scale, shift, hw, self.act);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, ch, hw) = dims(x.dims(), scale.elem_count())?;
        let mut dx = owned(grad_res)?;
        let g = {
            let (xs, ss, ts) = (tensor_f32(x)?, tensor_f32(scale)?, tensor_f32(shift)?);
            let scale = ss.slice()?;
            // As a normalization with fixed statistics, centre 0 and unit spread: the "gamma"
            // gradient is then Σ dz · x, the scale's.
            let n = Norm {
                scale: scale.to_vec(),
                shift: ts.slice()?.to_vec(),
                center: vec![0.0; ch],
                invstd: vec![1.0; ch],
                batch: false,
            };
            norm::backward(&mut dx, xs.slice()?, &n, scale, hw, self.act)
        };
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(g.dgamma, ch, dev)?),
            Some(Tensor::from_vec(g.dbeta, ch, dev)?),
        ))
    }
}
