//! Convolution + bias + ReLU + 2×2 max pooling as one op. Fusing them keeps the full-resolution
//! activation inside the kernel: only the pooled output, and one byte per pooled value recording
//! which window position won, leave it. The backward pass rebuilds the sparse gradient at full
//! resolution image by image, so the large activation gradient never passes through candle's
//! gradient store.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{ConvSpec, Dims, col2im_band, im2col_row_band, weight_grads_by_runs, with_col, with_dcol};
use super::gemm::{Threads, View};
use super::{Precision, matmul};
use super::{contiguous_f32, tensor_f32};

/// One thread's share of an image: its index and, per channel, its rows of the outputs and winners.
type Band<'a> = (usize, Vec<&'a mut [f32]>, Vec<&'a mut [u8]>);

/// Floats of unfolded input per band (about 1 MiB), to keep a band's working set in L2.
const CACHE_FLOATS: usize = 256 * 1024;

/// Marks a pooled value whose window was all ≤ 0 after the bias: ReLU passes no gradient.
const DEAD: u8 = u8::MAX;

pub(crate) struct ConvReluPoolOp {
    pub(crate) spec: ConvSpec,
    precision: Precision,
    /// Per pooled value, the winning window position (0-3) or [`DEAD`], written by the forward pass.
    winners: Mutex<Vec<u8>>,
}

impl ConvReluPoolOp {
    pub(crate) fn new(spec: ConvSpec, precision: Precision) -> Self {
        ConvReluPoolOp {
            spec: ConvSpec { relu: true, ..spec },
            precision,
            winners: Mutex::new(Vec::new()),
        }
    }
}

/// Pools one full-resolution plane (row stride `ow`) into `out`/`win` rows of `pw`: bias, ReLU,
/// 2×2 max, and the winning position (the first maximum, in row-major window order) or [`DEAD`].
#[inline]
fn pool_plane(plane: &[f32], ow: usize, bias: f32, out: &mut [f32], win: &mut [u8], pw: usize) {
    for ((o_row, w_row), i) in out.chunks_exact_mut(pw).zip(win.chunks_exact_mut(pw)).zip(0..) {
        let r0 = &plane[2 * i * ow..2 * i * ow + 2 * pw];
        let r1 = &plane[(2 * i + 1) * ow..(2 * i + 1) * ow + 2 * pw];
        for (((o, w), a), b) in o_row
            .iter_mut()
            .zip(w_row.iter_mut())
            .zip(r0.chunks_exact(2))
            .zip(r1.chunks_exact(2))
        {
            let (m1, i1) = if a[1] > a[0] { (a[1], 1u8) } else { (a[0], 0u8) };
            let (m2, i2) = if b[1] > b[0] { (b[1], 3u8) } else { (b[0], 2u8) };
            let (m, k) = if m2 > m1 { (m2, i2) } else { (m1, i1) };
            let v = m + bias;
            let live = v > 0.0;
            *o = if live { v } else { 0.0 };
            *w = if live { k } else { DEAD };
        }
    }
}

/// The adjoint of [`pool_plane`] for one channel: writes the full-resolution gradient `dz`
/// (`oh × ow`, every element) from the pooled gradient `g` and the winners, and returns the sum of
/// the gradients that reach the bias.
#[inline]
fn unpool_plane(g: &[f32], win: &[u8], dz: &mut [f32], oh: usize, ow: usize, pw: usize) -> f32 {
    let mut bias_grad = 0.0;
    for (i, (g_row, w_row)) in g.chunks_exact(pw).zip(win.chunks_exact(pw)).enumerate() {
        let (top, rest) = dz[2 * i * ow..].split_at_mut(ow);
        let bottom = &mut rest[..ow];
        for (((t, b), &gv), &k) in top
            .chunks_exact_mut(2)
            .zip(bottom.chunks_exact_mut(2))
            .zip(g_row)
            .zip(w_row)
        {
            let v = if k == DEAD { 0.0 } else { gv };
            bias_grad += v;
            t[0] = if k == 0 { v } else { 0.0 };
            t[1] = if k == 1 { v } else { 0.0 };
            b[0] = if k == 2 { v } else { 0.0 };
            b[1] = if k == 3 { v } else { 0.0 };
        }
        // An odd last column belongs to no window.
        if ow % 2 == 1 {
            top[ow - 1] = 0.0;
            bottom[ow - 1] = 0.0;
        }
    }
    // An odd last row belongs to no window.
    if oh % 2 == 1 {
        dz[(oh - 1) * ow..oh * ow].fill(0.0);
    }
    bias_grad
}

/// Pooled rows `p0..p1` of one image: unfold the conv rows `2·p0..2·p1`, multiply, then bias,
/// ReLU and pool each channel into `outs[c]` / `wins[c]` (each `(p1 − p0) × pw`).
#[allow(clippy::too_many_arguments)]
fn forward_band(
    xb: &[f32],
    w: &[f32],
    bias: &[f32],
    d: &Dims,
    s: &ConvSpec,
    p0: usize,
    p1: usize,
    outs: &mut [&mut [f32]],
    wins: &mut [&mut [u8]],
    pw: usize,
) -> candle_core::Result<()> {
    let (oy0, oy1) = (2 * p0, 2 * p1);
    let kk = d.k(s);
    let nb = (oy1 - oy0) * d.ow;
    with_col(kk * nb, |col| {
        for (r, row) in col.chunks_exact_mut(nb).enumerate() {
            im2col_row_band(xb, d, s, r, oy0, oy1, row);
        }
        with_dcol(d.cout * nb, |z| {
            matmul(
                z,
                nb,
                View::rows(w, d.cout, kk),
                View::rows(col, kk, nb),
                false,
                Threads::One,
                d.precision,
            )?;
            for (c, (o, win)) in outs.iter_mut().zip(wins.iter_mut()).enumerate() {
                pool_plane(&z[c * nb..(c + 1) * nb], d.ow, bias[c], o, win, pw);
            }
            Ok(())
        })
    })
}

fn pooled(d: &Dims) -> (usize, usize) {
    (d.oh / 2, d.ow / 2)
}

impl CustomOp3 for ConvReluPoolOp {
    fn name(&self) -> &'static str {
        "fracture-conv-relu-pool"
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
        let d = Dims::new(&self.spec, l1.dims(), l2.dims(), self.precision)?;
        let (ph, pw) = pooled(&d);
        if ph == 0 || pw == 0 {
            candle_core::bail!(
                "conv-relu-pool: the {}×{} convolution output is smaller than the pooling window",
                d.oh,
                d.ow
            );
        }
        let (x, w, bias) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        if bias.len() != d.cout {
            candle_core::bail!(
                "conv-relu-pool: bias has {} values for {} channels",
                bias.len(),
                d.cout
            );
        }
        let per_image = d.cout * ph * pw;
        let mut out = vec![0.0f32; d.b * per_image];
        let mut winners = vec![0u8; d.b * per_image];
        let threads = rayon::current_num_threads();
        if d.b >= threads {
            // Enough images: one image per task, each multiply single-threaded.
            out.par_chunks_mut(per_image)
                .zip(winners.par_chunks_mut(per_image))
                .zip(x.par_chunks(d.cin * d.h * d.w))
                .try_for_each(|((o, win), xb)| {
                    // Bands of pooled rows sized so the unfolded block stays in the core's cache.
                    let kk = d.k(&self.spec);
                    let band = (CACHE_FLOATS / (kk * 2 * d.ow).max(1)).clamp(1, ph);
                    let mut p0 = 0;
                    while p0 < ph {
                        let p1 = (p0 + band).min(ph);
                        let mut outs: Vec<&mut [f32]> = o
                            .chunks_mut(ph * pw)
                            .map(|pl| &mut pl[p0 * pw..p1 * pw])
                            .collect();
                        let mut wins: Vec<&mut [u8]> = win
                            .chunks_mut(ph * pw)
                            .map(|pl| &mut pl[p0 * pw..p1 * pw])
                            .collect();
                        forward_band(xb, w, bias, &d, &self.spec, p0, p1, &mut outs, &mut wins, pw)?;
                        p0 = p1;
                    }
                    candle_core::Result::Ok(())
                })?;
        } else {
            // A small batch: each image is cut into bands of pooled rows, one band per thread, and every
            // band goes through unfolding, multiply and pooling without waiting for the others.
            let band = ph.div_ceil(threads);
            for ((o, win), xb) in out
                .chunks_mut(per_image)
                .zip(winners.chunks_mut(per_image))
                .zip(x.chunks(d.cin * d.h * d.w))
            {
                let mut bands: Vec<Band<'_>> = (0..threads).map(|t| (t, Vec::new(), Vec::new())).collect();
                for (mut plane, mut wplane) in o.chunks_mut(ph * pw).zip(win.chunks_mut(ph * pw)) {
                    for (t, outs, wins) in bands.iter_mut() {
                        let rows = band.min(ph.saturating_sub(*t * band));
                        let (head, tail) = std::mem::take(&mut plane).split_at_mut(rows * pw);
                        let (whead, wtail) = std::mem::take(&mut wplane).split_at_mut(rows * pw);
                        outs.push(head);
                        wins.push(whead);
                        plane = tail;
                        wplane = wtail;
                    }
                }
                bands.into_par_iter().try_for_each(|(t, mut outs, mut wins)| {
                    let (p0, p1) = ((t * band).min(ph), ((t + 1) * band).min(ph));
                    if p0 == p1 {
                        return Ok(());
                    }
                    forward_band(xb, w, bias, &d, &self.spec, p0, p1, &mut outs, &mut wins, pw)
                })?;
            }
        }
        if let Ok(mut saved) = self.winners.lock() {
            *saved = winners;
        }
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.cout, ph, pw))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::new(&self.spec, x.dims(), w.dims(), self.precision)?;
        let (ph, pw) = pooled(&d);
        let (kk, n) = (d.k(&self.spec), d.n());
        let img = d.cin * d.h * d.w;
        let per_image = d.cout * ph * pw;
        let need_dx = x.track_op();
        let grad = grad_res.contiguous()?;
        let winners = self
            .winners
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv-relu-pool: poisoned".into()))?;
        if winners.len() != d.b * per_image {
            candle_core::bail!("conv-relu-pool: backward without a matching forward pass");
        }
        let threads = rayon::current_num_threads().clamp(1, d.b.max(1));
        let per = d.b.div_ceil(threads);
        let band = (CACHE_FLOATS / (kk * 2 * d.ow).max(1)).clamp(1, ph.max(1));
        let mut dx = if need_dx {
            vec![0.0f32; d.b * img]
        } else {
            Vec::new()
        };
        let (dw, db) = {
            let (xs, ws, gs) = (tensor_f32(x)?, tensor_f32(w)?, tensor_f32(&grad)?);
            let (xv, wv, gv) = (xs.slice()?, ws.slice()?, gs.slice()?);
            let dims = (d.cout * kk, d.cout);
            weight_grads_by_runs(&mut dx, d.b, per, img, dims, |t, dx_chunk, dw, db| {
                let mut dwt = vec![0.0f32; if kk < d.cout { kk * d.cout } else { 0 }];
                let mut dz = vec![0.0f32; d.cout * n];
                for (j, bi) in (t * per..((t + 1) * per).min(d.b)).enumerate() {
                    let g = &gv[bi * per_image..(bi + 1) * per_image];
                    let win = &winners[bi * per_image..(bi + 1) * per_image];
                    let xb = &xv[bi * img..(bi + 1) * img];
                    let dxb: &mut [f32] = if need_dx {
                        &mut dx_chunk[j * img..(j + 1) * img]
                    } else {
                        &mut []
                    };
                    dxb.fill(0.0);
                    // Bands of pooled rows, as in the forward pass, keep the unfolded block in cache.
                    let mut p0 = 0;
                    while p0 < ph {
                        let p1 = (p0 + band).min(ph);
                        let (oy0, oy1) = (2 * p0, 2 * p1);
                        let nb = (oy1 - oy0) * d.ow;
                        let dz = &mut dz[..d.cout * nb];
                        for c in 0..d.cout {
                            let rows = (c * ph + p0) * pw..(c * ph + p1) * pw;
                            let dzc = &mut dz[c * nb..(c + 1) * nb];
                            db[c] += unpool_plane(&g[rows.clone()], &win[rows], dzc, oy1 - oy0, d.ow, pw);
                        }
                        let dz = &*dz;
                        with_col(kk * nb, |col| {
                            for (r, row) in col.chunks_exact_mut(nb).enumerate() {
                                im2col_row_band(xb, &d, &self.spec, r, oy0, oy1, row);
                            }
                            if kk < d.cout {
                                // Few taps (a first layer): dwᵀ (kk × cout) = col · dzᵀ suits the
                                // multiply's kernels better than the skinny dw = dz · colᵀ.
                                let (lhs, rhs) = (View::rows(col, kk, nb), View::transposed(dz, d.cout, nb));
                                matmul(&mut dwt, d.cout, lhs, rhs, true, Threads::One, d.precision)
                            } else {
                                let (lhs, rhs) = (View::rows(dz, d.cout, nb), View::transposed(col, kk, nb));
                                matmul(dw, kk, lhs, rhs, true, Threads::One, d.precision)
                            }
                        })?;
                        if need_dx {
                            with_dcol(kk * nb, |dcol| {
                                let (lhs, rhs) =
                                    (View::transposed(wv, d.cout, kk), View::rows(dz, d.cout, nb));
                                matmul(dcol, nb, lhs, rhs, false, Threads::One, d.precision)?;
                                col2im_band(dcol, &d, &self.spec, oy0, oy1, dxb);
                                candle_core::Result::Ok(())
                            })?;
                        }
                        p0 = p1;
                    }
                }
                for (tap, row) in dwt.chunks(d.cout.max(1)).enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        dw[c * kk + tap] += v;
                    }
                }
                Ok(())
            })?
        };
        let dev = x.device();
        let dx = if need_dx {
            Some(Tensor::from_vec(dx, x.shape(), dev)?)
        } else {
            None
        };
        Ok((
            dx,
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, d.cout, dev)?),
        ))
    }
}
