//! Dense layer `y = x · wᵀ + b` (+ optional ReLU) on `(B, In)` f32 with `w (Out, In)`, and its
//! backward pass, each product a single multithreaded GEMM with no transposed copies.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use rayon::prelude::*;

use super::gemm::{Threads, View};
use super::{Precision, matmul};
use super::{contiguous_f32, tensor_f32};

pub(crate) struct LinearOp {
    pub(crate) relu: bool,
    pub(crate) precision: Precision,
}

fn dims(xs: &[usize], ws: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    match (xs, ws) {
        (&[b, i], &[o, wi]) if i == wi => Ok((b, i, o)),
        _ => candle_core::bail!("linear: input {xs:?} does not fit weight {ws:?}"),
    }
}

fn threads() -> Threads {
    Threads::Pool(rayon::current_num_threads())
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fracture-linear"
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
        let (b, i, o) = dims(l1.dims(), l2.dims())?;
        let (x, w, bias) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        if bias.len() != o {
            candle_core::bail!("linear: bias has {} values for {o} outputs", bias.len());
        }
        // yᵀ (o × b) = w (o × i) · xᵀ (i × b), the reduction over i split across threads: with few rows
        // and a long reduction this beats one multithreaded product several times over.
        let parts = if i >= 4096 {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let span = i.div_ceil(parts);
        let partials: Vec<candle_core::Result<Vec<f32>>> = (0..parts)
            .into_par_iter()
            .map(|p| {
                let (k0, k1) = (p * span, ((p + 1) * span).min(i));
                let mut yt = vec![0.0f32; o * b];
                if k1 > k0 {
                    let lhs = View {
                        data: &w[k0..],
                        rows: o,
                        cols: k1 - k0,
                        row_stride: i,
                        col_stride: 1,
                    };
                    let rhs = View {
                        data: &x[k0..],
                        rows: k1 - k0,
                        cols: b,
                        row_stride: 1,
                        col_stride: i,
                    };
                    matmul(&mut yt, b, lhs, rhs, false, Threads::One, self.precision)?;
                }
                Ok(yt)
            })
            .collect();
        let mut yt = vec![0.0f32; o * b];
        for part in partials {
            yt.iter_mut().zip(part?).for_each(|(a, v)| *a += v);
        }
        let mut y = vec![0.0f32; b * o];
        for (r, row) in y.chunks_mut(o).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                let z = yt[c * b + r] + bias[c];
                *v = if self.relu { z.max(0.0) } else { z };
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, i, o) = dims(x.dims(), w.dims())?;
        let grad = grad_res.contiguous()?;
        let need_dx = x.track_op();
        let (dx, dw, db) = {
            let (xs, ws, ys, gs) = (
                tensor_f32(x)?,
                tensor_f32(w)?,
                tensor_f32(res)?,
                tensor_f32(&grad)?,
            );
            let (xv, wv, yv, gv) = (xs.slice()?, ws.slice()?, ys.slice()?, gs.slice()?);
            let dz: Vec<f32> = if self.relu {
                gv.iter()
                    .zip(yv)
                    .map(|(&g, &y)| if y > 0.0 { g } else { 0.0 })
                    .collect()
            } else {
                gv.to_vec()
            };
            let mut db = vec![0.0f32; o];
            for row in dz.chunks(o) {
                db.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            // dw (o × i) = dzᵀ (o × b) · x (b × i)
            let mut dw = vec![0.0f32; o * i];
            matmul(
                &mut dw,
                i,
                View::transposed(&dz, b, o),
                View::rows(xv, b, i),
                false,
                threads(),
                self.precision,
            )?;
            let dx = if need_dx {
                // dx (b × i) = dz (b × o) · w (o × i)
                let mut dx = vec![0.0f32; b * i];
                matmul(
                    &mut dx,
                    i,
                    View::rows(&dz, b, o),
                    View::rows(wv, o, i),
                    false,
                    threads(),
                    self.precision,
                )?;
                Some(dx)
            } else {
                None
            };
            (dx, dw, db)
        };
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, (b, i), dev)).transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(dw, (o, i), dev)?),
            Some(Tensor::from_vec(db, o, dev)?),
        ))
    }
}
