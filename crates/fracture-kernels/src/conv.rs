//! 2-D convolution (+ bias, + optional ReLU) on `(B, C, H, W)` f32, by im2col and GEMM, with its
//! backward pass. Images are spread over rayon's threads; each multiply is single-threaded.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Precision;
use super::gemm::{Threads, View};
use super::{SharedLhs, matmul};
use super::{contiguous_f32, tensor_f32};

/// A square convolution's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Kernel side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Apply ReLU to the output (the backward pass then masks by the output's sign).
    pub relu: bool,
}

impl ConvSpec {
    /// Output side for an input side.
    pub fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) cin: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) cout: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    /// The matrix products' operand precision.
    pub(crate) precision: Precision,
}

impl Dims {
    /// The geometry of input `xs` `(B, Cin, H, W)` and weight `ws` `(Cout, Cin, k, k)` under `s`.
    pub(crate) fn new(
        s: &ConvSpec,
        xs: &[usize],
        ws: &[usize],
        precision: Precision,
    ) -> candle_core::Result<Dims> {
        let (&[b, cin, h, w], &[cout, wcin, kh, kw]) = (xs, ws) else {
            candle_core::bail!(
                "conv2d: expected (B, C, H, W) input and (O, C, k, k) weight, got {xs:?} and {ws:?}"
            );
        };
        if wcin != cin || kh != s.kernel || kw != s.kernel {
            candle_core::bail!(
                "conv2d: weight {ws:?} does not fit input {xs:?} and kernel {}",
                s.kernel
            );
        }
        if h + 2 * s.padding < s.kernel || w + 2 * s.padding < s.kernel || s.stride == 0 {
            candle_core::bail!(
                "conv2d: input {h}×{w} is smaller than the {0}×{0} kernel",
                s.kernel
            );
        }
        Ok(Dims {
            b,
            cin,
            h,
            w,
            cout,
            oh: s.out_len(h),
            ow: s.out_len(w),
            precision,
        })
    }

    pub(crate) fn k(&self, spec: &ConvSpec) -> usize {
        self.cin * spec.kernel * spec.kernel
    }

    pub(crate) fn n(&self) -> usize {
        self.oh * self.ow
    }
}

thread_local! {
    // im2col / gradient-column buffers, reused across calls so large buffers are not mapped and
    // unmapped every step.
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static DCOL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's im2col buffer of `len` values.
pub(crate) fn with_col<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    crate::depthwise::with_scratch(&COL, len, f)
}

/// Runs `f` with this thread's second buffer (gradient columns, or a full-resolution output).
pub(crate) fn with_dcol<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    crate::depthwise::with_scratch(&DCOL, len, f)
}

/// Unfolds one image `(cin, h, w)` into `col` `(cin·k·k, oh·ow)`: row `(c, ki, kj)` holds the input
/// pixel under kernel tap `(ki, kj)` for every output position (0 outside the image).
pub(crate) fn im2col(x: &[f32], d: &Dims, s: &ConvSpec, col: &mut [f32]) {
    for (r, row) in col.chunks_exact_mut(d.n()).enumerate() {
        im2col_row(x, d, s, r, row);
    }
}

/// Row `r = (c, ki, kj)` of the unfolded image.
fn im2col_row(x: &[f32], d: &Dims, s: &ConvSpec, r: usize, row: &mut [f32]) {
    im2col_row_band(x, d, s, r, 0, d.oh, row);
}

/// Row `r` of the unfolded image restricted to output rows `oy0..oy1` (`row` holds
/// `(oy1 − oy0)·ow` values).
pub(crate) fn im2col_row_band(
    x: &[f32],
    d: &Dims,
    s: &ConvSpec,
    r: usize,
    oy0: usize,
    oy1: usize,
    row: &mut [f32],
) {
    let k = s.kernel;
    let (c, ki, kj) = (r / (k * k), (r / k) % k, r % k);
    let plane = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
    for oy in oy0..oy1 {
        let iy = (oy * s.stride + ki) as isize - s.padding as isize;
        let dst = &mut row[(oy - oy0) * d.ow..(oy - oy0 + 1) * d.ow];
        if iy < 0 || iy >= d.h as isize {
            dst.fill(0.0);
            continue;
        }
        let src = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
        let (lo, hi) = inside_columns(d, s, kj);
        dst[..lo].fill(0.0);
        dst[hi..].fill(0.0);
        if lo == hi {
            continue;
        }
        // Output column ox reads input column ox·stride + kj − padding, inside for lo ≤ ox < hi.
        let first = lo * s.stride + kj - s.padding;
        if s.stride == 1 {
            dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
        } else {
            for (v, &x) in dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(s.stride)) {
                *v = x;
            }
        }
    }
}

/// The output columns `lo..hi` whose tap `kj` reads a real input column (not padding):
/// `0 ≤ ox·stride + kj − padding < w`. Empty (`lo == hi`) when there is none.
fn inside_columns(d: &Dims, s: &ConvSpec, kj: usize) -> (usize, usize) {
    // Smallest ox with ox·stride + kj ≥ padding.
    let lo = s.padding.saturating_sub(kj).div_ceil(s.stride).min(d.ow);
    // Largest ox with ox·stride + kj − padding ≤ w − 1, plus one.
    let limit = d.w + s.padding;
    let hi = if limit > kj {
        ((limit - kj - 1) / s.stride + 1).min(d.ow)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// The adjoint of [`im2col`]: adds every column entry back onto the input pixel it came from.
pub(crate) fn col2im(col: &[f32], d: &Dims, s: &ConvSpec, x: &mut [f32]) {
    x.fill(0.0);
    col2im_band(col, d, s, 0, d.oh, x);
}

/// [`col2im`] for output rows `oy0..oy1` only (`col` holds `(oy1 − oy0)·ow` columns), adding onto
/// `x` without clearing it first.
pub(crate) fn col2im_band(col: &[f32], d: &Dims, s: &ConvSpec, oy0: usize, oy1: usize, x: &mut [f32]) {
    let k = s.kernel;
    let nb = (oy1 - oy0) * d.ow;
    for c in 0..d.cin {
        let plane = &mut x[c * d.h * d.w..(c + 1) * d.h * d.w];
        for ki in 0..k {
            for kj in 0..k {
                let row = &col[((c * k + ki) * k + kj) * nb..][..nb];
                for oy in oy0..oy1 {
                    let iy = (oy * s.stride + ki) as isize - s.padding as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let src = &row[(oy - oy0) * d.ow..(oy - oy0 + 1) * d.ow];
                    let dst = &mut plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    let (lo, hi) = inside_columns(d, s, kj);
                    if lo == hi {
                        continue;
                    }
                    let first = lo * s.stride + kj - s.padding;
                    if s.stride == 1 {
                        for (o, v) in dst[first..first + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                            *o += v;
                        }
                    } else {
                        for (o, v) in dst[first..].iter_mut().step_by(s.stride).zip(&src[lo..hi]) {
                            *o += v;
                        }
                    }
                }
            }
        }
    }
}

/// Runs of `per` images for the backward passes' threads: `(run index, its slice of dx)`, where dx
/// holds `img` floats per image, or is empty when no input gradient is wanted (each run then gets
/// an empty slice).
pub(crate) fn image_runs(dx: &mut [f32], b: usize, per: usize, img: usize) -> Vec<(usize, &mut [f32])> {
    if dx.is_empty() {
        (0..b.div_ceil(per)).map(|i| (i, &mut [][..])).collect()
    } else {
        dx.chunks_mut(per * img).enumerate().collect()
    }
}

/// The parameter-gradient reduction of the convolution backward passes: each thread takes a run
/// of `per` images ([`image_runs`]: the run index and its slice of `dx`) and adds its images'
/// contributions into its own zeroed `dw` (`dw_len` floats) and `db` (`db_len`) through `run`;
/// the per-thread sums are then added up in run order, so the result does not depend on timing.
pub(crate) fn weight_grads_by_runs(
    dx: &mut [f32],
    b: usize,
    per: usize,
    img: usize,
    (dw_len, db_len): (usize, usize),
    run: impl Fn(usize, &mut [f32], &mut [f32], &mut [f32]) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let partials: Vec<candle_core::Result<(Vec<f32>, Vec<f32>)>> = image_runs(dx, b, per, img)
        .into_par_iter()
        .map(|(t, dx_run)| {
            let (mut dw, mut db) = (vec![0.0f32; dw_len], vec![0.0f32; db_len]);
            run(t, dx_run, &mut dw, &mut db)?;
            Ok((dw, db))
        })
        .collect();
    let (mut dw, mut db) = (vec![0.0f32; dw_len], vec![0.0f32; db_len]);
    for p in partials {
        let (pw, pb) = p?;
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    Ok((dw, db))
}

fn forward(x: &[f32], w: &[f32], bias: &[f32], d: &Dims, s: &ConvSpec) -> candle_core::Result<Vec<f32>> {
    let (kk, n) = (d.k(s), d.n());
    let mut out = vec![0.0f32; d.b * d.cout * n];
    let inner = super::gemm::inner_threads(d.b);
    let w = SharedLhs::new(View::rows(w, d.cout, kk), d.precision);
    out.par_chunks_mut(d.cout * n)
        .zip(x.par_chunks(d.cin * d.h * d.w))
        .try_for_each(|(o, xb)| {
            with_col(kk * n, |col| {
                im2col(xb, d, s, col);
                w.matmul(o, n, View::rows(col, kk, n), false, inner)
            })?;
            for (c, plane) in o.chunks_mut(n).enumerate() {
                let b = bias[c];
                if s.relu {
                    plane.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
                } else {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            }
            candle_core::Result::Ok(())
        })?;
    Ok(out)
}

/// `(dx, dw, db)`; `dx` only when asked for.
type ConvGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Gradients of the convolution: `(dx, dw, db)`; `dx` only when `need_dx`.
fn backward(
    x: &[f32],
    w: &[f32],
    out: &[f32],
    grad: &[f32],
    d: &Dims,
    s: &ConvSpec,
    need_dx: bool,
) -> candle_core::Result<ConvGrads> {
    let (kk, n) = (d.k(s), d.n());
    let img = d.cin * d.h * d.w;
    let threads = rayon::current_num_threads().clamp(1, d.b.max(1));
    let per = d.b.div_ceil(threads);
    let mut dx = if need_dx {
        vec![0.0f32; d.b * img]
    } else {
        Vec::new()
    };
    let wt = SharedLhs::new(View::transposed(w, d.cout, kk), d.precision);
    // Each thread handles a run of images and keeps its own dw/db sums; they are added up after.
    let (dw, db) = weight_grads_by_runs(
        &mut dx,
        d.b,
        per,
        img,
        (d.cout * kk, d.cout),
        |t, dx_run, dw, db| {
            let mut dz = vec![0.0f32; d.cout * n];
            for (j, bi) in (t * per..((t + 1) * per).min(d.b)).enumerate() {
                let g = &grad[bi * d.cout * n..(bi + 1) * d.cout * n];
                let o = &out[bi * d.cout * n..(bi + 1) * d.cout * n];
                for ((z, &gv), &ov) in dz.iter_mut().zip(g).zip(o) {
                    *z = if s.relu && ov <= 0.0 { 0.0 } else { gv };
                }
                for (c, plane) in dz.chunks(n).enumerate() {
                    db[c] += plane.iter().sum::<f32>();
                }
                with_col(kk * n, |col| {
                    im2col(&x[bi * img..(bi + 1) * img], d, s, col);
                    // dw += dz (cout × n) · colᵀ (n × kk)
                    matmul(
                        dw,
                        kk,
                        View::rows(&dz, d.cout, n),
                        View::transposed(col, kk, n),
                        true,
                        Threads::One,
                        d.precision,
                    )
                })?;
                if need_dx {
                    with_dcol(kk * n, |dcol| {
                        // dcol (kk × n) = wᵀ (kk × cout) · dz (cout × n)
                        wt.matmul(dcol, n, View::rows(&dz, d.cout, n), false, Threads::One)?;
                        col2im(dcol, d, s, &mut dx_run[j * img..(j + 1) * img]);
                        candle_core::Result::Ok(())
                    })?;
                }
            }
            Ok(())
        },
    )?;
    Ok((need_dx.then_some(dx), dw, db))
}

/// The custom op: inputs `x (B, Cin, H, W)`, `w (Cout, Cin, k, k)`, `b (Cout,)`.
pub(crate) struct Conv2dOp {
    pub(crate) spec: ConvSpec,
    pub(crate) precision: Precision,
}

impl Conv2dOp {
    fn dims(&self, xs: &[usize], ws: &[usize]) -> candle_core::Result<Dims> {
        Dims::new(&self.spec, xs, ws, self.precision)
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "fracture-conv2d"
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
        let d = self.dims(l1.dims(), l2.dims())?;
        let (x, w, b) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        if b.len() != d.cout {
            candle_core::bail!("conv2d: bias has {} values for {} channels", b.len(), d.cout);
        }
        let out = forward(x, w, b, &d, &self.spec)?;
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.cout, d.oh, d.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.dims(), w.dims())?;
        let grad = grad_res.contiguous()?;
        let need_dx = x.track_op();
        let (dx, dw, db) = {
            let (xs, ws, os, gs) = (
                tensor_f32(x)?,
                tensor_f32(w)?,
                tensor_f32(res)?,
                tensor_f32(&grad)?,
            );
            backward(
                xs.slice()?,
                ws.slice()?,
                os.slice()?,
                gs.slice()?,
                &d,
                &self.spec,
                need_dx,
            )?
        };
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, d.cout, dev)?),
        ))
    }
}
