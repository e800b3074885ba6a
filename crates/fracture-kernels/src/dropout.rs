//! Inverted dropout as one op: the mask (drawn on the host from the caller's generator) is applied
//! in the forward pass and reused, not recomputed, in the backward pass.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, tensor_f32};

const CHUNK: usize = 1 << 16;

pub(crate) struct DropoutOp {
    /// 1 for kept elements, 0 for dropped ones.
    pub(crate) keep: Arc<Vec<u8>>,
    /// `1 / (1 − p)`.
    pub(crate) scale: f32,
}

impl DropoutOp {
    fn apply(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        if x.len() != self.keep.len() {
            candle_core::bail!("dropout: mask of {} for {} values", self.keep.len(), x.len());
        }
        let mut out = vec![0.0f32; x.len()];
        let scale = self.scale;
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(self.keep.par_chunks(CHUNK))
            .for_each(|((o, x), k)| {
                for ((o, &x), &k) in o.iter_mut().zip(x).zip(k) {
                    *o = if k != 0 { x * scale } else { 0.0 };
                }
            });
        Ok(out)
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fracture-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let out = self.apply(contiguous_f32(storage, layout)?)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        let dx = {
            let g = tensor_f32(&grad)?;
            self.apply(g.slice()?)?
        };
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The keep mask from 16-bit draws: element `i` is kept when draw `i` ≥ `threshold`.
pub(crate) fn keep_mask(bytes: &[u8], threshold: u32) -> Vec<u8> {
    let mut keep = vec![0u8; bytes.len() / 2];
    keep.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(2 * CHUNK))
        .for_each(|(k, b)| {
            for (k, b) in k.iter_mut().zip(b.chunks_exact(2)) {
                *k = u8::from(u32::from(u16::from_le_bytes([b[0], b[1]])) >= threshold);
            }
        });
    keep
}
