//! 2×2 max pooling, stride 2, on `(B, C, H, W)` f32 (odd last row/column dropped), with a backward
//! pass that routes each gradient to its window's first maximum (the argmax is found again from the
//! saved input instead of being stored).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, tensor_f32};

pub(crate) struct MaxPool2x2Op;

fn dims(dims: &[usize]) -> candle_core::Result<(usize, usize, usize, usize)> {
    match dims {
        &[b, c, h, w] if h >= 2 && w >= 2 => Ok((b, c, h, w)),
        other => candle_core::bail!("max_pool2x2: expected (B, C, H ≥ 2, W ≥ 2), got {other:?}"),
    }
}

/// Index (0..4) of the first maximum of the window at `(2i, 2j)`, and its value.
#[inline]
fn window(plane: &[f32], w: usize, i: usize, j: usize) -> (usize, f32) {
    let base = 2 * i * w + 2 * j;
    let vals = [plane[base], plane[base + 1], plane[base + w], plane[base + w + 1]];
    let mut best = 0;
    for k in 1..4 {
        if vals[k] > vals[best] {
            best = k;
        }
    }
    (best, vals[best])
}

impl CustomOp1 for MaxPool2x2Op {
    fn name(&self) -> &'static str {
        "fracture-max-pool-2x2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims(layout.dims())?;
        let x = contiguous_f32(storage, layout)?;
        let (oh, ow) = (h / 2, w / 2);
        let mut out = vec![0.0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                for i in 0..oh {
                    for j in 0..ow {
                        o[i * ow + j] = window(plane, w, i, j).1;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, c, h, w) = dims(arg.dims())?;
        let (oh, ow) = (h / 2, w / 2);
        let grad = grad_res.contiguous()?;
        let mut dx = vec![0.0f32; b * c * h * w];
        {
            let (xs, gs) = (tensor_f32(arg)?, tensor_f32(&grad)?);
            let (x, g) = (xs.slice()?, gs.slice()?);
            dx.par_chunks_mut(h * w)
                .zip(x.par_chunks(h * w))
                .zip(g.par_chunks(oh * ow))
                .for_each(|((d, plane), gp)| {
                    for i in 0..oh {
                        for j in 0..ow {
                            let (k, _) = window(plane, w, i, j);
                            d[(2 * i + k / 2) * w + 2 * j + k % 2] = gp[i * ow + j];
                        }
                    }
                });
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
