//! 1×1 convolution without bias on `(B, Cin, H, W)` f32: per image one GEMM,
//! `y_b (Cout × HW) = W (Cout × Cin) · x_b (Cin × HW)`, with no unfolding. Backward: `dX_b = Wᵀ · dY_b`
//! and `dW = Σ_b dY_b · x_bᵀ` (per-thread partial sums, added up after).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{Threads, View, inner_threads};
use super::{Precision, SharedLhs, matmul};
use super::{contiguous_f32, tensor_f32};

/// `b` images of `cin` channels of `n` positions, to `cout` channels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) n: usize,
    /// The matrix products' operand precision.
    pub(crate) precision: Precision,
}

fn dims(xs: &[usize], ws: &[usize], precision: Precision) -> candle_core::Result<(Dims, usize, usize)> {
    let (&[b, cin, h, w], &[cout, wcin, 1, 1]) = (xs, ws) else {
        candle_core::bail!(
            "1×1 conv: expected (B, C, H, W) input and (O, C, 1, 1) weight, got {xs:?} and {ws:?}"
        );
    };
    if wcin != cin {
        candle_core::bail!("1×1 conv: weight {ws:?} does not fit input {xs:?}");
    }
    Ok((
        Dims {
            b,
            cin,
            cout,
            n: h * w,
            precision,
        },
        h,
        w,
    ))
}

fn forward(x: &[f32], w: &[f32], d: Dims) -> candle_core::Result<Vec<f32>> {
    let mut out = super::buffers::take(d.b * d.cout * d.n);
    forward_into(x, w, d, &mut out)?;
    Ok(out)
}

/// `out_b = w · x_b` for every image (`out` overwritten).
pub(crate) fn forward_into(x: &[f32], w: &[f32], d: Dims, out: &mut [f32]) -> candle_core::Result<()> {
    forward_with(
        x,
        &SharedLhs::new(View::rows(w, d.cout, d.cin), d.precision),
        d,
        out,
    )
}

/// [`forward_into`] with the weights `w (cout, cin)` already prepared as a product's operand.
pub(crate) fn forward_with(
    x: &[f32],
    w: &SharedLhs<'_>,
    d: Dims,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let threads = inner_threads(d.b);
    out.par_chunks_mut(d.cout * d.n)
        .zip(x.par_chunks(d.cin * d.n))
        .try_for_each(|(o, xb)| w.matmul(o, d.n, View::rows(xb, d.cin, d.n), false, threads))
}

fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d: Dims,
    need_dx: bool,
) -> candle_core::Result<(Option<Vec<f32>>, Vec<f32>)> {
    let mut dx = if need_dx {
        super::buffers::take(d.b * d.cin * d.n)
    } else {
        Vec::new()
    };
    let dw = backward_into(x, w, dy, d, &mut dx)?;
    Ok((need_dx.then_some(dx), dw))
}

/// The gradients of `out_b = w · x_b`: returns `dw` and, when `dx` is not empty, overwrites it with
/// the input gradient.
pub(crate) fn backward_into(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d: Dims,
    dx: &mut [f32],
) -> candle_core::Result<Vec<f32>> {
    let threads = rayon::current_num_threads().clamp(1, d.b.max(1));
    let per = d.b.div_ceil(threads);
    let inner = if d.b >= rayon::current_num_threads() {
        Threads::One
    } else {
        inner_threads(d.b)
    };
    let img_in = d.cin * d.n;
    let need_dx = !dx.is_empty();
    let wt = SharedLhs::new(View::transposed(w, d.cout, d.cin), d.precision);
    // No bias: the helper's db is empty.
    let (dw, _) =
        super::conv::weight_grads_by_runs(dx, d.b, per, img_in, (d.cout * d.cin, 0), |t, dx_run, dw, _| {
            for (j, bi) in (t * per..((t + 1) * per).min(d.b)).enumerate() {
                let g = &dy[bi * d.cout * d.n..][..d.cout * d.n];
                let xb = &x[bi * img_in..][..img_in];
                // dw (cout × cin) += dy_b (cout × n) · x_bᵀ (n × cin)
                matmul(
                    dw,
                    d.cin,
                    View::rows(g, d.cout, d.n),
                    View::transposed(xb, d.cin, d.n),
                    true,
                    inner,
                    d.precision,
                )?;
                if need_dx {
                    // dx_b (cin × n) = wᵀ (cin × cout) · dy_b (cout × n)
                    wt.matmul(
                        &mut dx_run[j * img_in..(j + 1) * img_in],
                        d.n,
                        View::rows(g, d.cout, d.n),
                        false,
                        inner,
                    )?;
                }
            }
            Ok(())
        })?;
    Ok(dw)
}

/// The custom op: inputs `x (B, Cin, H, W)` and `w (Cout, Cin, 1, 1)`.
pub(crate) struct PointwiseOp(pub(crate) Precision);

impl CustomOp2 for PointwiseOp {
    fn name(&self) -> &'static str {
        "fracture-conv1x1"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d, h, w) = dims(l1.dims(), l2.dims(), self.0)?;
        let out = forward(contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?, d)?;
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.cout, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (d, _, _) = dims(x.dims(), w.dims(), self.0)?;
        let grad = grad_res.contiguous()?;
        let need_dx = x.track_op();
        let (dx, dw) = {
            let (xs, ws, gs) = (tensor_f32(x)?, tensor_f32(w)?, tensor_f32(&grad)?);
            backward(xs.slice()?, ws.slice()?, gs.slice()?, d, need_dx)?
        };
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        Ok((dx, Some(Tensor::from_vec(dw, w.shape(), dev)?)))
    }
}
