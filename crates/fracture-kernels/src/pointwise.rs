//! 1×1 convolution without bias on `(B, Cin, H, W)` f32: per image one GEMM,
//! `y_b (Cout × HW) = W (Cout × Cin) · x_b (Cin × HW)`, with no unfolding. Backward: `dX_b = Wᵀ · dY_b`
//! and `dW = Σ_b dY_b · x_bᵀ` (per-thread partial sums, added up after).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{self, Threads, View, inner_threads};
use super::norm::{self, NormGrad};
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
    let mut out = super::buffers::take_output(d.b * d.cout * d.n);
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

/// [`forward_with`], also returning each output run's moments ([`norm::run_moments`], in
/// `(image, channel)` order, for [`norm::combine_moments`]), taken right after each image's product
/// while its output is still in cache instead of in a pass of their own over the whole batch.
pub(crate) fn forward_with_moments(
    x: &[f32],
    w: &SharedLhs<'_>,
    d: Dims,
    out: &mut [f32],
) -> candle_core::Result<Vec<(f64, f64)>> {
    let threads = inner_threads(d.b);
    let runs = out
        .par_chunks_mut(d.cout * d.n)
        .zip(x.par_chunks(d.cin * d.n))
        .map(|(o, xb)| {
            w.matmul(o, d.n, View::rows(xb, d.cin, d.n), false, threads)?;
            Ok(o.chunks_exact(d.n.max(1))
                .map(|run| {
                    super::simd(
                        #[inline(always)]
                        || norm::run_moments(run),
                    )
                })
                .collect::<Vec<_>>())
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(runs.concat())
}

fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d: Dims,
    need_dx: bool,
) -> candle_core::Result<(Option<Vec<f32>>, Vec<f32>)> {
    let mut dx = if need_dx {
        super::buffers::take_output(d.b * d.cin * d.n)
    } else {
        Vec::new()
    };
    let dw = backward_into(x, w, dy, d, &mut dx)?;
    Ok((need_dx.then_some(dx), dw))
}

/// How a backward pass over `b` images splits between the threads: images per thread (each
/// thread's run sums its own weight gradient) and the threads each image's products get (all of
/// them with fewer images than threads, else one).
fn batch_split(b: usize) -> (usize, Threads) {
    let threads = rayon::current_num_threads().clamp(1, b.max(1));
    let inner = if b >= rayon::current_num_threads() {
        Threads::One
    } else {
        inner_threads(b)
    };
    (b.div_ceil(threads), inner)
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
    let (per, inner) = batch_split(d.b);
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

/// The gradients of `y_b = w · x_b` followed by a normalization whose input gradient is
/// `dy = a ⊙ dz + k1 ⊙ y + k0` (per output channel; `norm`'s coefficients, `dz` its masked
/// gradient), without forming `dy`: since `y_b = w · x_b`,
///
/// - `dx_b = (diag(a)·w)ᵀ · dz_b + (wᵀ·diag(k1)·w) · x_b + wᵀ·k0`,
/// - `dw = diag(a) · Σ_b dz_b·x_bᵀ + diag(k1)·w · Σ_b x_b·x_bᵀ + k0 · (Σ_b x_b·1)ᵀ`.
///
/// The extra products are `cin × cin`, a `cout/cin`-th (a sixth in an inverted bottleneck) of the
/// main ones, and spare a read and a write of `dz` and a read of `y` (`b·cout·n` values each, the
/// block's largest tensors) that applying the coefficients first would take. Those extra products
/// run in FP32 whatever `d.precision`; the main ones in it. Returns `dw`; `dx` (when not empty) is
/// overwritten with the input gradient.
pub(crate) fn backward_through_norm(
    x: &[f32],
    w: &[f32],
    dz: &[f32],
    norm: &NormGrad,
    d: Dims,
    dx: &mut [f32],
) -> candle_core::Result<Vec<f32>> {
    let (cin, cout, n) = (d.cin, d.cout, d.n);
    let (a, k1, k0) = norm.coefficients();
    if w.len() != cout * cin || a.len() != cout {
        candle_core::bail!(
            "1×1 conv through a normalization: {} weights and {} channels for {cout}×{cin}",
            w.len(),
            a.len()
        );
    }
    let scaled = |s: &[f32]| -> Vec<f32> {
        w.chunks_exact(cin)
            .zip(s)
            .flat_map(|(row, &f)| row.iter().map(move |&v| v * f))
            .collect()
    };
    let (wa, wk) = (scaled(a), scaled(k1));
    // m = wᵀ·diag(k1)·w and c = wᵀ·k0 (cin × cin and cin).
    let mut m = vec![0.0f32; cin * cin];
    gemm::sgemm(
        &mut m,
        cin,
        View::transposed(w, cout, cin),
        View::rows(&wk, cout, cin),
        false,
        Threads::One,
    )?;
    let c: Vec<f32> = (0..cin)
        .map(|i| {
            (0..cout)
                .map(|o| f64::from(w[o * cin + i]) * f64::from(k0[o]))
                .sum::<f64>() as f32
        })
        .collect();
    let (per, inner) = batch_split(d.b);
    let img_in = cin * n;
    let need_dx = !dx.is_empty();
    let wat = SharedLhs::new(View::transposed(&wa, cout, cin), d.precision);
    // Per thread: Σ dz_b·x_bᵀ and the Gram matrix Σ x_b·x_bᵀ side by side, and Σ x_b·1.
    let (sums, sx) = super::conv::weight_grads_by_runs(
        dx,
        d.b,
        per,
        img_in,
        (cout * cin + cin * cin, cin),
        |t, dx_run, dw, sx| {
            let (dzx, gram) = dw.split_at_mut(cout * cin);
            for (j, bi) in (t * per..((t + 1) * per).min(d.b)).enumerate() {
                let g = &dz[bi * cout * n..][..cout * n];
                let xb = &x[bi * img_in..][..img_in];
                let xv = View::rows(xb, cin, n);
                matmul(
                    dzx,
                    cin,
                    View::rows(g, cout, n),
                    View::transposed(xb, cin, n),
                    true,
                    inner,
                    d.precision,
                )?;
                gemm::sgemm(gram, cin, xv, View::transposed(xb, cin, n), true, inner)?;
                for (s, row) in sx.iter_mut().zip(xb.chunks_exact(n)) {
                    *s += row.iter().sum::<f32>();
                }
                if need_dx {
                    let dxb = &mut dx_run[j * img_in..(j + 1) * img_in];
                    wat.matmul(dxb, n, View::rows(g, cout, n), false, inner)?;
                    gemm::sgemm(dxb, n, View::rows(&m, cin, cin), xv, true, inner)?;
                    for (row, &ci) in dxb.chunks_exact_mut(n).zip(&c) {
                        row.iter_mut().for_each(|v| *v += ci);
                    }
                }
            }
            Ok(())
        },
    )?;
    let (dzx, gram) = sums.split_at(cout * cin);
    // dw = diag(a)·Σ dz·xᵀ + diag(k1)·w·G + k0·sxᵀ.
    let mut wg = vec![0.0f32; cout * cin];
    gemm::sgemm(
        &mut wg,
        cin,
        View::rows(w, cout, cin),
        View::rows(gram, cin, cin),
        false,
        Threads::One,
    )?;
    let mut dw = vec![0.0f32; cout * cin];
    for (o, row) in dw.chunks_exact_mut(cin).enumerate() {
        let (dzx, wg) = (&dzx[o * cin..][..cin], &wg[o * cin..][..cin]);
        for (i, v) in row.iter_mut().enumerate() {
            *v = a[o] * dzx[i] + k1[o] * wg[i] + k0[o] * sx[i];
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Activation;
    use crate::norm::{self, Norm};
    use crate::test_values as values;

    /// The fold of a batch normalization's input gradient into the products gives the gradients
    /// of applying it first, with batch statistics (k1, k0 ≠ 0) and with fixed ones, and with BF16
    /// operands.
    #[test]
    fn folding_the_normalization_into_the_products_gives_the_same_gradients() {
        let (b, cin, cout, n) = (3, 5, 30, 37);
        // An offset input, so the normalization's centring matters.
        let x: Vec<f32> = values(b * cin * n, 1).iter().map(|v| v + 0.7).collect();
        let (w, dz0) = (values(cout * cin, 2), values(b * cout * n, 3));
        let (gamma, beta) = (values(cout, 4), values(cout, 5));
        let fp32 = Dims {
            b,
            cin,
            cout,
            n,
            precision: Precision::Fp32,
        };
        let mut y = vec![0.0f32; b * cout * n];
        forward_into(&x, &w, fp32, &mut y).unwrap();
        // BF16 operands in the main products (on whichever backend this machine has): within
        // BF16 rounding of the same products on the applied gradient.
        let cases = [
            (true, Precision::Fp32, 1e-4),
            (false, Precision::Fp32, 1e-4),
            (true, Precision::Bf16, 2e-2),
        ];
        for (batch, precision, tolerance) in cases {
            let d = Dims { precision, ..fp32 };
            let stats = if batch {
                norm::channel_stats(&y, cout, n)
            } else {
                vec![(0.3, 2.0); cout]
            };
            let nm = Norm::new(&stats, &gamma, &beta, 1e-3, batch);
            let mut dz = dz0.clone();
            let sums: Vec<(f64, f64)> = dz
                .chunks_exact_mut(n)
                .zip(y.chunks_exact(n))
                .enumerate()
                .map(|(k, (g, yv))| {
                    let c = k % cout;
                    norm::backward_sums_run(g, yv, nm.scale[c], nm.shift[c], nm.center[c], Activation::None)
                })
                .collect();
            let grad = NormGrad::new(&nm, &gamma, &sums, n);
            let mut dy = dz.clone();
            grad.input_grad(&mut dy, &y, n);
            let mut dx_ref = vec![0.0f32; b * cin * n];
            let dw_ref = backward_into(&x, &w, &dy, d, &mut dx_ref).unwrap();
            let mut dx = vec![0.0f32; b * cin * n];
            let dw = backward_through_norm(&x, &w, &dz, &grad, d, &mut dx).unwrap();
            for (what, got, want) in [("dx", &dx, &dx_ref), ("dw", &dw, &dw_ref)] {
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let worst = got
                    .iter()
                    .zip(want.iter())
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    scale > 0.0 && worst <= tolerance * scale,
                    "{what} (batch statistics: {batch}, {precision:?}): off by {worst} of {scale}"
                );
            }
        }
    }
}
