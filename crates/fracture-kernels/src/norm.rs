//! Slice-level batch normalization on `(B, C, H, W)` f32 laid out as `B·C` runs of `H·W` values
//! (run `k` belongs to channel `k mod C`): statistics, the affine map with its activation, and the
//! backward pass, each parallel over runs and vectorized inside a run. The batch-norm ops and the
//! fused inverted-bottleneck block are built from these.

use rayon::prelude::*;

use super::{Activation, simd};

const LANES: usize = 16;

/// Σ x over a run, in sixteen f32 lanes, returned in f64.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(tail)
}

/// Σ (x − m)² over a run, in sixteen f32 lanes, returned in f64.
#[inline(always)]
fn lane_sq_dev(x: &[f32], m: f32) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| (v - m) * (v - m)).sum();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            acc[i] += d * d;
        }
    }
    acc.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(tail)
}

/// The mean and the sum of squared deviations of one run (two passes over a run that stays in
/// cache; exact enough for any activation range).
#[inline(always)]
pub(crate) fn run_moments(x: &[f32]) -> (f64, f64) {
    if x.is_empty() {
        return (0.0, 0.0);
    }
    let mean = lane_sum(x) / x.len() as f64;
    (mean, lane_sq_dev(x, mean as f32))
}

/// Per-channel mean and biased variance from per-run moments (`(mean, Σ squared deviations)`
/// of `B·C` runs of `hw` values each, in `(image, channel)` order), by the parallel-variance rule.
pub(crate) fn combine_moments(runs: &[(f64, f64)], ch: usize, hw: usize) -> Vec<(f64, f64)> {
    let b = runs.len() / ch.max(1);
    (0..ch)
        .map(|c| {
            let mean = (0..b).map(|i| runs[i * ch + c].0).sum::<f64>() / b.max(1) as f64;
            let m2: f64 = (0..b)
                .map(|i| {
                    let (m, s) = runs[i * ch + c];
                    s + hw as f64 * (m - mean) * (m - mean)
                })
                .sum();
            (mean, m2 / (b * hw).max(1) as f64)
        })
        .collect()
}

/// Per-channel mean and biased variance of `x`.
pub(crate) fn channel_stats(x: &[f32], ch: usize, hw: usize) -> Vec<(f64, f64)> {
    let runs: Vec<(f64, f64)> = x
        .par_chunks(hw)
        .map(|run| {
            simd(
                #[inline(always)]
                || run_moments(run),
            )
        })
        .collect();
    combine_moments(&runs, ch, hw)
}

/// A per-channel normalization: `z = x · scale + shift`, from the statistics it used (`center`,
/// `invstd`), which the backward pass needs.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
    pub(crate) center: Vec<f32>,
    pub(crate) invstd: Vec<f32>,
    /// Whether the statistics are the batch's own (their dependence on the input enters the
    /// backward pass) or fixed.
    pub(crate) batch: bool,
}

impl Norm {
    /// From the channel statistics `(mean, biased variance)` and the learnt scale and shift.
    pub(crate) fn new(stats: &[(f64, f64)], gamma: &[f32], beta: &[f32], eps: f64, batch: bool) -> Norm {
        let invstd: Vec<f32> = stats
            .iter()
            .map(|&(_, v)| (1.0 / (v + eps).sqrt()) as f32)
            .collect();
        let center: Vec<f32> = stats.iter().map(|&(m, _)| m as f32).collect();
        let scale: Vec<f32> = invstd.iter().zip(gamma).map(|(&i, &g)| g * i).collect();
        let shift: Vec<f32> = beta
            .iter()
            .zip(&scale)
            .zip(&center)
            .map(|((&b, &s), &m)| b - m * s)
            .collect();
        Norm {
            scale,
            shift,
            center,
            invstd,
            batch,
        }
    }
}

/// `y = act(x · scale + shift)` over one run.
#[inline(always)]
pub(crate) fn apply_run(y: &mut [f32], x: &[f32], scale: f32, shift: f32, act: Activation) {
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

/// `y = act(x · scale_c + shift_c)` over all runs, in parallel.
pub(crate) fn apply(y: &mut [f32], x: &[f32], scale: &[f32], shift: &[f32], hw: usize, act: Activation) {
    let ch = scale.len();
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(k, (yo, xi))| {
            simd(
                #[inline(always)]
                || apply_run(yo, xi, scale[k % ch], shift[k % ch], act),
            )
        });
}

/// An activation as a type, so that each inner loop is compiled (and vectorized) for one of them.
pub(crate) trait Act {
    /// The gradient mask at pre-activation value `z`: 1 where the activation passes it, else 0
    /// (the same test as on the output: `act(z) > 0`, and `< 6` for ReLU6).
    fn mask(z: f32) -> f32;
}

pub(crate) struct Identity;
pub(crate) struct ReluAct;
pub(crate) struct Relu6Act;

impl Act for Identity {
    #[inline(always)]
    fn mask(_: f32) -> f32 {
        1.0
    }
}
impl Act for ReluAct {
    #[inline(always)]
    fn mask(z: f32) -> f32 {
        if z > 0.0 { 1.0 } else { 0.0 }
    }
}
impl Act for Relu6Act {
    #[inline(always)]
    fn mask(z: f32) -> f32 {
        if z > 0.0 && z < 6.0 { 1.0 } else { 0.0 }
    }
}

/// Runs `$body` with `$t` bound to the activation type of `$act`.
macro_rules! with_act {
    ($act:expr, $t:ident => $body:expr) => {
        match $act {
            Activation::None => {
                type $t = Identity;
                $body
            }
            Activation::Relu => {
                type $t = ReluAct;
                $body
            }
            Activation::Relu6 => {
                type $t = Relu6Act;
                $body
            }
        }
    };
}

/// For one run: `dz = dy` where the activation at `z = x · scale + shift` passes (else 0), written
/// over `dy`, and the sums `(Σ dz, Σ dz · (x − center))`.
#[inline(always)]
pub(crate) fn backward_sums_run(
    dy: &mut [f32],
    x: &[f32],
    scale: f32,
    shift: f32,
    center: f32,
    act: Activation,
) -> (f64, f64) {
    with_act!(act, A => sums_run::<A>(dy, x, scale, shift, center))
}

#[inline(always)]
fn sums_run<A: Act>(dy: &mut [f32], x: &[f32], scale: f32, shift: f32, center: f32) -> (f64, f64) {
    let mut s1 = [0.0f32; LANES];
    let mut s2 = [0.0f32; LANES];
    let n = dy.len().min(x.len());
    let full = n - n % LANES;
    let (dh, dt) = dy[..n].split_at_mut(full);
    let (xh, xt) = x[..n].split_at(full);
    for (d, xv) in dh.chunks_exact_mut(LANES).zip(xh.chunks_exact(LANES)) {
        for i in 0..LANES {
            let z = xv[i] * scale + shift;
            let g = d[i] * A::mask(z);
            d[i] = g;
            s1[i] += g;
            s2[i] += g * (xv[i] - center);
        }
    }
    let (mut t1, mut t2) = (0.0f32, 0.0f32);
    for (d, &xv) in dt.iter_mut().zip(xt) {
        let z = xv * scale + shift;
        let g = *d * A::mask(z);
        *d = g;
        t1 += g;
        t2 += g * (xv - center);
    }
    let sum = |a: &[f32; LANES], t: f32| a.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(t);
    (sum(&s1, t1), sum(&s2, t2))
}

/// The sums of [`backward_sums_run`] over every run of `dy` and `x` (`B·C` runs of `hw` values,
/// channel `k % C` for run `k`), in parallel, without writing the masked gradient: a pass that only
/// reads, for a backward pass that applies the mask again where it next reads `dy`
/// ([`NormGrad::masked_input_grad_run`]).
pub(crate) fn masked_sums(dy: &[f32], x: &[f32], norm: &Norm, hw: usize, act: Activation) -> Vec<(f64, f64)> {
    let ch = norm.scale.len();
    dy.par_chunks(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .map(|(k, (d, xv))| {
            let c = k % ch;
            simd(
                #[inline(always)]
                || {
                    with_act!(act, A => read_sums_run::<A>(d, xv, norm.scale[c], norm.shift[c], norm.center[c]))
                },
            )
        })
        .collect()
}

/// [`backward_sums_run`]'s sums, with `dy` left as it is.
#[inline(always)]
fn read_sums_run<A: Act>(dy: &[f32], x: &[f32], scale: f32, shift: f32, center: f32) -> (f64, f64) {
    let mut s1 = [0.0f32; LANES];
    let mut s2 = [0.0f32; LANES];
    let n = dy.len().min(x.len());
    let full = n - n % LANES;
    for (d, xv) in dy[..full].chunks_exact(LANES).zip(x[..full].chunks_exact(LANES)) {
        for i in 0..LANES {
            let g = d[i] * A::mask(xv[i] * scale + shift);
            s1[i] += g;
            s2[i] += g * (xv[i] - center);
        }
    }
    let (mut t1, mut t2) = (0.0f32, 0.0f32);
    for (&d, &xv) in dy[full..n].iter().zip(&x[full..n]) {
        let g = d * A::mask(xv * scale + shift);
        t1 += g;
        t2 += g * (xv - center);
    }
    let sum = |a: &[f32; LANES], t: f32| a.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(t);
    (sum(&s1, t1), sum(&s2, t2))
}

/// The per-channel gradients `(dgamma, dbeta)` and the input-gradient coefficients
/// `dx = a · dz + k1 · x + k0` of a normalization, from the per-run sums of
/// [`backward_sums_run`] (`B·C` runs of `hw` values).
pub(crate) struct NormGrad {
    pub(crate) dgamma: Vec<f32>,
    pub(crate) dbeta: Vec<f32>,
    a: Vec<f32>,
    k1: Vec<f32>,
    k0: Vec<f32>,
}

impl NormGrad {
    pub(crate) fn new(norm: &Norm, gamma: &[f32], sums: &[(f64, f64)], hw: usize) -> NormGrad {
        let ch = gamma.len();
        let b = sums.len() / ch.max(1);
        let n = (b * hw).max(1) as f64;
        let (mut s1, mut s2) = (vec![0.0f64; ch], vec![0.0f64; ch]);
        for (k, &(a, c)) in sums.iter().enumerate() {
            s1[k % ch] += a;
            s2[k % ch] += c;
        }
        let mut out = NormGrad {
            dgamma: Vec::with_capacity(ch),
            dbeta: Vec::with_capacity(ch),
            a: Vec::with_capacity(ch),
            k1: Vec::with_capacity(ch),
            k0: Vec::with_capacity(ch),
        };
        for c in 0..ch {
            let is = f64::from(norm.invstd[c]);
            out.dgamma.push((s2[c] * is) as f32);
            out.dbeta.push(s1[c] as f32);
            let a = f64::from(gamma[c]) * is;
            out.a.push(a as f32);
            if norm.batch {
                // dx = a·(dz − mean(dz) − x̂·mean(dz·x̂)), x̂ = (x − μ)·invstd.
                let (m1, m2) = (s1[c] / n, s2[c] / n);
                let k1 = -a * is * is * m2;
                out.k1.push(k1 as f32);
                out.k0.push((-a * m1 - k1 * f64::from(norm.center[c])) as f32);
            } else {
                out.k1.push(0.0);
                out.k0.push(0.0);
            }
        }
        out
    }

    /// The input-gradient coefficients `(a, k1, k0)`, one of each per channel.
    pub(crate) fn coefficients(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.a, &self.k1, &self.k0)
    }

    /// `dz` (the masked gradient) becomes `dx = a · dz + k1 · x + k0` in place, over one run of
    /// channel `c`.
    #[inline(always)]
    pub(crate) fn input_grad_run(&self, dz: &mut [f32], x: &[f32], c: usize) {
        let (a, k1, k0) = (self.a[c], self.k1[c], self.k0[c]);
        dz.iter_mut().zip(x).for_each(|(d, &v)| *d = a * *d + k1 * v + k0);
    }

    /// `dx = a · dz + k1 · x + k0` into `dx`, over one run of channel `c`, from the unmasked
    /// gradient `dy` of the activation's output: `dz` is `dy` where the activation passes
    /// `z = x · scale + shift` (`norm`'s), else 0, as [`masked_sums`] summed it.
    #[inline(always)]
    pub(crate) fn masked_input_grad_run(
        &self,
        norm: &Norm,
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
        c: usize,
        act: Activation,
    ) {
        with_act!(act, A => self.masked_run::<A>(norm, dx, dy, x, c))
    }

    #[inline(always)]
    fn masked_run<A: Act>(&self, norm: &Norm, dx: &mut [f32], dy: &[f32], x: &[f32], c: usize) {
        let (a, k1, k0) = (self.a[c], self.k1[c], self.k0[c]);
        let (scale, shift) = (norm.scale[c], norm.shift[c]);
        for ((o, &d), &v) in dx.iter_mut().zip(dy).zip(x) {
            *o = a * (d * A::mask(v * scale + shift)) + k1 * v + k0;
        }
    }

    /// [`NormGrad::input_grad_run`] over all runs, in parallel.
    pub(crate) fn input_grad(&self, dz: &mut [f32], x: &[f32], hw: usize) {
        let ch = self.a.len();
        dz.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(k, (d, xv))| {
                simd(
                    #[inline(always)]
                    || self.input_grad_run(d, xv, k % ch),
                )
            });
    }
}

/// The whole backward pass of a normalization + activation over all runs: `dy` (the gradient of the
/// activation's output) becomes the input gradient in place; returns `(dgamma, dbeta)` inside the
/// [`NormGrad`].
pub(crate) fn backward(
    dy: &mut [f32],
    x: &[f32],
    norm: &Norm,
    gamma: &[f32],
    hw: usize,
    act: Activation,
) -> NormGrad {
    let ch = gamma.len();
    let sums: Vec<(f64, f64)> = dy
        .par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .map(|(k, (d, xv))| {
            let c = k % ch;
            simd(
                #[inline(always)]
                || backward_sums_run(d, xv, norm.scale[c], norm.shift[c], norm.center[c], act),
            )
        })
        .collect();
    let grad = NormGrad::new(norm, gamma, &sums, hw);
    grad.input_grad(dy, x, hw);
    grad
}

/// [`backward`] from `dy` left where it is: the sums read it, and the input gradient is written
/// from it into `dx` (same length), a read and a write of `dy` fewer than copying it and
/// normalizing the copy in place. The same arithmetic as [`backward`].
pub(crate) fn backward_into(
    dy: &[f32],
    x: &[f32],
    norm: &Norm,
    gamma: &[f32],
    hw: usize,
    act: Activation,
    dx: &mut [f32],
) -> NormGrad {
    let ch = gamma.len();
    let sums = masked_sums(dy, x, norm, hw, act);
    let grad = NormGrad::new(norm, gamma, &sums, hw);
    dx.par_chunks_mut(hw)
        .zip(dy.par_chunks(hw))
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(k, ((d, g), xv))| {
            simd(
                #[inline(always)]
                || grad.masked_input_grad_run(norm, d, g, xv, k % ch, act),
            )
        });
    grad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_combine_to_the_channel_statistics() {
        // 2 images × 3 channels × 5 values.
        let x: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
        let stats = channel_stats(&x, 3, 5);
        for (c, &(mean, var)) in stats.iter().enumerate() {
            let vals: Vec<f64> = (0..2)
                .flat_map(|b| x[(b * 3 + c) * 5..][..5].iter().map(|&v| f64::from(v)))
                .collect();
            let m = vals.iter().sum::<f64>() / 10.0;
            let v = vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 10.0;
            assert!(
                (mean - m).abs() < 1e-6 && (var - v).abs() < 1e-6,
                "{c}: {mean} {var} vs {m} {v}"
            );
        }
    }
}
