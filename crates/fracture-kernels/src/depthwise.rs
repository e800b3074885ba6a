//! Depthwise convolution (one k×k filter per channel, no bias) on `(B, C, H, W)` f32 with explicit,
//! possibly asymmetric, zero padding and stride 1 or 2, with its backward pass (dX and dW).
//!
//! Each `(image, channel)` plane is copied once into a zero-bordered scratch plane, so the inner
//! loops run without bounds tests; for stride 2 the scratch rows are split into even and odd columns,
//! so every tap is a contiguous multiply-add over an output row. Planes are spread over threads; the
//! filter gradient is summed per plane and then over the batch, so no two threads write the same value.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, tensor_f32};

/// Zero padding on each side of a plane, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    /// Rows above.
    pub top: usize,
    /// Rows below.
    pub bottom: usize,
    /// Columns on the left.
    pub left: usize,
    /// Columns on the right.
    pub right: usize,
}

impl Padding {
    /// TensorFlow's "SAME" padding for a `k × k` kernel with stride `s` on an `h × w` input: the
    /// output has `ceil(h/s) × ceil(w/s)` values, and along each axis the total padding
    /// `max((ceil(n/s) − 1)·s + k − n, 0)` is split with the smaller half before.
    pub fn same(h: usize, w: usize, kernel: usize, stride: usize) -> Padding {
        let axis = |n: usize| -> (usize, usize) {
            let out = n.div_ceil(stride.max(1));
            let total = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(n);
            (total / 2, total - total / 2)
        };
        let (top, bottom) = axis(h);
        let (left, right) = axis(w);
        Padding {
            top,
            bottom,
            left,
            right,
        }
    }
}

/// The geometry of a depthwise convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthwiseSpec {
    /// Kernel side.
    pub kernel: usize,
    /// Stride (1 or 2).
    pub stride: usize,
    /// Zero padding.
    pub padding: Padding,
}

impl DepthwiseSpec {
    /// Output `(rows, columns)` for an `h × w` input.
    pub fn out_dims(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.padding;
        (
            (h + p.top + p.bottom).saturating_sub(self.kernel) / self.stride + 1,
            (w + p.left + p.right).saturating_sub(self.kernel) / self.stride + 1,
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub(crate) b: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) k: usize,
    s: usize,
    pad: Padding,
    /// Scratch plane rows and (per parity, for stride 2) columns.
    ph: usize,
    pw: usize,
}

impl Geometry {
    fn new(spec: &DepthwiseSpec, xs: &[usize], ws: &[usize]) -> candle_core::Result<Self> {
        let (&[b, c, h, w], &[wc, one, kh, kw]) = (xs, ws) else {
            candle_core::bail!(
                "depthwise conv: expected (B, C, H, W) input and (C, 1, k, k) weight, got {xs:?} and {ws:?}"
            );
        };
        let k = spec.kernel;
        if wc != c || one != 1 || kh != k || kw != k {
            candle_core::bail!("depthwise conv: weight {ws:?} does not fit input {xs:?} and kernel {k}");
        }
        Self::of(spec, b, c, h, w)
    }

    /// The geometry of `b` images of `c` planes of `h × w` under `spec`.
    pub(crate) fn of(
        spec: &DepthwiseSpec,
        b: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> candle_core::Result<Self> {
        let k = spec.kernel;
        if !(1..=2).contains(&spec.stride) || k == 0 || k > 7 {
            candle_core::bail!(
                "depthwise conv: stride {} and kernel {k} are not supported (stride 1 or 2, kernel 1 to 7)",
                spec.stride
            );
        }
        let p = spec.padding;
        if h + p.top + p.bottom < k || w + p.left + p.right < k {
            candle_core::bail!(
                "depthwise conv: input {h}×{w} with its padding is smaller than the {k}×{k} kernel"
            );
        }
        let (oh, ow) = spec.out_dims(h, w);
        // The scratch plane covers every input position an output reads, padding included.
        let ph = (oh - 1) * spec.stride + k;
        let pw_full = (ow - 1) * spec.stride + k;
        let pw = if spec.stride == 2 {
            pw_full.div_ceil(2)
        } else {
            pw_full
        };
        Ok(Geometry {
            b,
            c,
            h,
            w,
            oh,
            ow,
            k,
            s: spec.stride,
            pad: p,
            ph,
            pw,
        })
    }

    /// The output rows `or0..or1` of one image of `c` planes as a convolution of their own: the
    /// input rows `lo..hi` they read, and the geometry of an input of those `hi − lo` rows whose
    /// padding above and below is the part of the full padding the band reaches (so its output is
    /// exactly those rows). Errors when the range is empty or past the output.
    pub(crate) fn band(
        &self,
        c: usize,
        or0: usize,
        or1: usize,
    ) -> candle_core::Result<(Geometry, usize, usize)> {
        if or0 >= or1 || or1 > self.oh {
            candle_core::bail!(
                "depthwise band: rows {or0}..{or1} of an output of {} rows",
                self.oh
            );
        }
        // The band reads rows first..end of the padded input; padded row r is input row r − top.
        let (first, end) = (or0 * self.s, (or1 - 1) * self.s + self.k);
        let lo = first.saturating_sub(self.pad.top).min(self.h);
        let hi = end.saturating_sub(self.pad.top).min(self.h);
        let top = self.pad.top.saturating_sub(first);
        if hi <= lo || top + (hi - lo) > end - first {
            candle_core::bail!("depthwise band: rows {or0}..{or1} read no input row");
        }
        let spec = DepthwiseSpec {
            kernel: self.k,
            stride: self.s,
            padding: Padding {
                top,
                bottom: end - first - top - (hi - lo),
                left: self.pad.left,
                right: self.pad.right,
            },
        };
        let g = Geometry::of(&spec, 1, c, hi - lo, self.w)?;
        debug_assert_eq!((g.oh, g.ow), (or1 - or0, self.ow));
        Ok((g, lo, hi))
    }

    /// Values of one scratch plane (both parities for stride 2), plus one vector of zeros at the
    /// end, so that the inner loops may always read whole vectors.
    pub(crate) fn scratch_len(&self) -> usize {
        self.ph * self.pw * self.s + CH
    }

    /// Copies input plane `x` (`h × w`) into the zero-bordered scratch `p`. For stride 2, scratch
    /// row `r` holds its even columns in `p[r·pw..]` and its odd ones in `p[(ph + r)·pw..]`.
    fn fill_scratch(&self, x: &[f32], p: &mut [f32]) {
        self.fill_scratch_with(x, p, |v| v);
    }

    /// The input columns `0..n` that land in the scratch plane, and for stride 2 where input
    /// columns `2j` and `2j + 1` go: `((parity plane, start) of the even input columns, (…) of the
    /// odd ones)`, the planes numbered 0 (even scratch columns) and 1 (odd).
    #[inline(always)]
    fn columns(&self) -> (usize, (usize, usize), (usize, usize)) {
        let full_w = (self.ow - 1) * self.s + self.k;
        let n = self.w.min(full_w.saturating_sub(self.pad.left));
        let l = self.pad.left;
        // Input column ix sits in scratch column ix + l.
        let (even_in, odd_in) = if l.is_multiple_of(2) {
            ((0, l / 2), (1, l / 2))
        } else {
            ((1, (l - 1) / 2), (0, l.div_ceil(2)))
        };
        (n, even_in, odd_in)
    }

    /// [`Geometry::fill_scratch`] of `f(x)`: the input plane through a per-value map (a fused
    /// normalization and activation of the layer before).
    #[inline(always)]
    pub(crate) fn fill_scratch_with(&self, x: &[f32], p: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
        let (n, even_in, odd_in) = self.columns();
        let plane = self.ph * self.pw;
        // Zero only what the copy below leaves unwritten: the rows without input, each row's
        // margins (per parity plane for stride 2) and the tail.
        for parity in 0..self.s {
            let (start, count) = match self.s {
                1 => (self.pad.left, n),
                _ if parity == even_in.0 => (even_in.1, n.div_ceil(2)),
                _ => (odd_in.1, n / 2),
            };
            for r in 0..self.ph {
                let at = parity * plane + r * self.pw;
                if r >= self.pad.top && r - self.pad.top < self.h {
                    // A few values at each end of the row: stores of a whole vector of zeros
                    // (which may run on into values the copy below writes), not a call to memset
                    // per margin.
                    let end = (start + count).min(self.pw);
                    zero_short(p, at, start.min(end));
                    zero_short(p, at + end, self.pw - end);
                } else {
                    p[at..at + self.pw].fill(0.0);
                }
            }
        }
        p[self.s * plane..].fill(0.0);
        for iy in 0..self.h {
            let r = iy + self.pad.top;
            if r >= self.ph {
                break;
            }
            let src = &x[iy * self.w..][..n];
            if self.s == 1 {
                let dst = &mut p[r * self.pw + self.pad.left..][..n];
                dst.iter_mut().zip(src).for_each(|(d, &v)| *d = f(v));
            } else {
                let (e, o) = (
                    even_in.0 * plane + r * self.pw + even_in.1,
                    odd_in.0 * plane + r * self.pw + odd_in.1,
                );
                let pairs = n / 2;
                // The two parity planes, split apart so both can be written in one pass.
                let (first, second) = p.split_at_mut(plane);
                let (pe, po) = if even_in.0 == 0 {
                    (&mut first[e..], &mut second[o - plane..])
                } else {
                    (&mut second[e - plane..], &mut first[o..])
                };
                let (pe, po) = (&mut pe[..n.div_ceil(2)], &mut po[..pairs]);
                let mut split = pe.chunks_exact_mut(CH).zip(po.chunks_exact_mut(CH));
                let mut pairs_in = src.chunks_exact(2 * CH);
                for ((de, dodd), s) in (&mut split).zip(&mut pairs_in) {
                    for j in 0..CH {
                        de[j] = f(s[2 * j]);
                        dodd[j] = f(s[2 * j + 1]);
                    }
                }
                let done = (pairs / CH) * CH;
                for j in done..pairs {
                    pe[j] = f(src[2 * j]);
                    po[j] = f(src[2 * j + 1]);
                }
                if n % 2 == 1 {
                    pe[pairs] = f(src[n - 1]);
                }
            }
        }
    }

    /// Zeroes what a fill leaves unwritten in scratch row `r`: all of it when the row is padding
    /// (no input row lands there), else everything outside `[start, end)` (clamped to the row).
    #[inline(always)]
    fn zero_unwritten(&self, row: &mut [f32], r: usize, start: usize, end: usize) {
        if r >= self.pad.top && r - self.pad.top < self.h {
            let end = end.min(row.len());
            row[..start.min(end)].fill(0.0);
            row[end..].fill(0.0);
        } else {
            row.fill(0.0);
        }
    }

    /// Writes the input part of a scratch-plane gradient `p` into `dx` (`h × w`), the positions
    /// outside the scratch plane (never read by any output) getting 0.
    #[inline(always)]
    pub(crate) fn crop_scratch(&self, p: &[f32], dx: &mut [f32]) {
        let (n, even_in, odd_in) = self.columns();
        let plane = self.ph * self.pw;
        for iy in 0..self.h {
            let dst = &mut dx[iy * self.w..(iy + 1) * self.w];
            let r = iy + self.pad.top;
            if r >= self.ph {
                dst.fill(0.0);
                continue;
            }
            dst[n..].fill(0.0);
            if self.s == 1 {
                dst[..n].copy_from_slice(&p[r * self.pw + self.pad.left..][..n]);
            } else {
                let (e, o) = (
                    even_in.0 * plane + r * self.pw + even_in.1,
                    odd_in.0 * plane + r * self.pw + odd_in.1,
                );
                let pairs = n / 2;
                for (j, pair) in dst[..2 * pairs].chunks_exact_mut(2).enumerate() {
                    pair[0] = p[e + j];
                    pair[1] = p[o + j];
                }
                if n % 2 == 1 {
                    dst[n - 1] = p[e + pairs];
                }
            }
        }
    }
}

/// Zeroes `p[at..at + n]`; where `n` is at most one vector and a whole vector fits from `at`, by
/// storing a whole vector of zeros (the values past `n` must be written again later).
#[inline(always)]
fn zero_short(p: &mut [f32], at: usize, n: usize) {
    if n <= CH && at + CH <= p.len() {
        p[at..at + CH].copy_from_slice(&[0.0; CH]);
    } else {
        p[at..at + n].fill(0.0);
    }
}

thread_local! {
    pub(crate) static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    pub(crate) static DSCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    pub(crate) static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    pub(crate) static GRAD: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the first `len` values of this thread's scratch buffer `key` (grown as needed,
/// contents left over from earlier use): the one helper behind every per-thread f32 buffer of the
/// convolutions (im2col columns in `conv`, padded planes here).
pub(crate) fn with_scratch<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Values a vector register holds (AVX-512, f32); the inner loops work in chunks of this many.
const CH: usize = 16;

/// Output rows a plane's convolution computes together: each has its own accumulator, so their
/// multiply-adds are independent and overlap (one accumulator alone waits out each multiply-add's
/// latency, four cycles, before the next can start).
const ROWS: usize = 4;

/// `Σ_t filter[t] · p[base_t + x0 + r · step ..][..CH]` for `R` output rows `r`: one chunk of each
/// of `R` depthwise output rows, `step` apart in the scratch. Returned by value, so that the
/// accumulators stay in registers; `mul_add`, as Rust never fuses `a * b + c` on its own and a fused
/// multiply-add is one instruction where the two are two.
#[inline(always)]
fn taps_rows<const R: usize>(
    p: &[f32],
    filter: &[f32],
    taps: &[usize],
    x0: usize,
    step: usize,
) -> [[f32; CH]; R] {
    let mut acc = [[0.0f32; CH]; R];
    for (t, &base) in taps.iter().enumerate() {
        let w = filter[t];
        for (r, acc) in acc.iter_mut().enumerate() {
            let src = &p[base + x0 + r * step..][..CH];
            for i in 0..CH {
                acc[i] = w.mul_add(src[i], acc[i]);
            }
        }
    }
    acc
}

/// `R` neighbouring output positions of a channel-interleaved group: position `j` sums, over the
/// taps, the tap's [`GROUP`] filter values (`wt`, one vector per tap) times the scratch vector at
/// `taps[t] + x0 + j · step`. A function of its own, returning the sums by value, so that the
/// accumulators stay in registers.
#[inline(always)]
fn group_taps<const R: usize>(
    q: &[f32],
    wt: &[f32],
    taps: &[usize],
    x0: usize,
    step: usize,
) -> [[f32; GROUP]; R] {
    let mut acc = [[0.0f32; GROUP]; R];
    for (t, &base) in taps.iter().enumerate() {
        let w = &wt[t * GROUP..][..GROUP];
        for (j, acc) in acc.iter_mut().enumerate() {
            let src = &q[base + x0 + j * step..][..GROUP];
            for i in 0..GROUP {
                acc[i] = w[i].mul_add(src[i], acc[i]);
            }
        }
    }
    acc
}

/// `acc += Σ (w, off) w · dyp[j0 + off ..][..CH]`: one chunk of a transposed depthwise row.
#[inline(always)]
fn add_taps(acc: &mut [f32; CH], dyp: &[f32], taps: &[(f32, usize)], j0: usize) {
    for &(w, off) in taps {
        let src = &dyp[j0 + off..][..CH];
        for i in 0..CH {
            acc[i] += w * src[i];
        }
    }
}

impl Geometry {
    /// The offset in the scratch plane of the run that tap `(r, kj)` reads (see `tap_row`).
    #[inline(always)]
    fn tap_base(&self, r: usize, kj: usize) -> usize {
        let plane = if self.s == 1 || kj.is_multiple_of(2) {
            0
        } else {
            self.ph * self.pw
        };
        plane + r * self.pw + kj / self.s
    }

    /// One output plane `out` (`oh × ow`, overwritten) from a filled scratch plane `p` and the
    /// plane's `k × k` filter. Each chunk of outputs is summed over all taps in registers, for
    /// [`ROWS`] output rows together; reads run whole vectors past the row's end (into the next row
    /// or the scratch's zero tail) and only the row's values are stored.
    #[inline(always)]
    pub(crate) fn convolve_plane(&self, p: &[f32], filter: &[f32], out: &mut [f32]) {
        self.convolve_plane_map(p, filter, out, |v| v);
    }

    /// [`Geometry::convolve_plane`] with `f` applied to each output before it is stored (a fused
    /// normalization and activation of the layer after).
    #[inline(always)]
    pub(crate) fn convolve_plane_map(
        &self,
        p: &[f32],
        filter: &[f32],
        out: &mut [f32],
        f: impl Fn(f32) -> f32 + Copy,
    ) {
        let (k, ow) = (self.k, self.ow);
        // The scratch offset from one output row's taps to the next one's.
        let step = self.s * self.pw;
        let mut bases = [0usize; 49];
        let mut oy = 0;
        while oy < self.oh {
            let rows = (self.oh - oy).min(ROWS);
            for ki in 0..k {
                for kj in 0..k {
                    bases[ki * k + kj] = self.tap_base(oy * self.s + ki, kj);
                }
            }
            let taps = &bases[..k * k];
            let block = &mut out[oy * ow..(oy + rows) * ow];
            for x0 in (0..ow).step_by(CH) {
                let n = (ow - x0).min(CH);
                if rows == ROWS {
                    let acc = taps_rows::<ROWS>(p, filter, taps, x0, step);
                    for (row, acc) in block.chunks_exact_mut(ow).zip(&acc) {
                        for (o, &a) in row[x0..x0 + n].iter_mut().zip(acc) {
                            *o = f(a);
                        }
                    }
                } else {
                    for (r, row) in block.chunks_exact_mut(ow).enumerate() {
                        let [acc] = taps_rows::<1>(p, filter, taps, x0 + r * step, 0);
                        for (o, &a) in row[x0..x0 + n].iter_mut().zip(&acc) {
                            *o = f(a);
                        }
                    }
                }
            }
            oy += rows;
        }
    }

    /// Adds the filter gradient of one plane, `Σ dy · input` per tap, into `dw` (`k × k`), from the
    /// plane's output gradient `dy` and its filled scratch plane `p`; `dyq` is scratch for `dy` with
    /// its rows padded with zeros to whole vectors ([`Geometry::padded_dy_len`] values). Every tap
    /// is summed in the same sweep over the plane (with AVX-512; with narrower registers, the taps
    /// of one filter row per sweep: [`Geometry::filter_grad_taps`]), each in a vector register of
    /// its own (9 for 3×3, 25 for 5×5): each chunk of `dy` is loaded once per sweep, and the
    /// multiply-adds per chunk are independent, so they overlap instead of each waiting for the one
    /// before.
    #[inline(always)]
    pub(crate) fn filter_grad_plane(&self, p: &[f32], dy: &[f32], dw: &mut [f32], dyq: &mut [f32]) {
        let ow = self.ow;
        let owq = ow.div_ceil(CH) * CH;
        let dyq = &mut dyq[..self.oh * owq];
        for (q, d) in dyq.chunks_exact_mut(owq).zip(dy.chunks_exact(ow)) {
            q[..ow].copy_from_slice(d);
            q[ow..].fill(0.0);
        }
        match self.k {
            3 => self.filter_grad_taps::<3, 9>(p, dyq, owq, dw),
            5 => self.filter_grad_taps::<5, 25>(p, dyq, owq, dw),
            k => {
                for ki in 0..k {
                    for kj in 0..k {
                        let mut acc = [0.0f32; CH];
                        for (oy, drow) in dyq.chunks_exact(owq).enumerate() {
                            let src = &p[self.tap_base(oy * self.s + ki, kj)..][..owq];
                            for (d, x) in drow.chunks_exact(CH).zip(src.chunks_exact(CH)) {
                                for i in 0..CH {
                                    acc[i] = d[i].mul_add(x[i], acc[i]);
                                }
                            }
                        }
                        dw[ki * k + kj] += acc.iter().sum::<f32>();
                    }
                }
            }
        }
    }

    /// [`Geometry::filter_grad_plane`]'s sums for a `K × K` filter (`KK = K²` taps): all taps in
    /// one sweep where a vector register holds [`CH`] values (AVX-512), else one sweep per filter
    /// row ([`Geometry::filter_grad_sweep`]): with 8-lane registers (AVX2) each tap's accumulator
    /// takes two of the 16, and 9 or 25 taps at once would live on the stack, a load and a store
    /// around every multiply-add. The sums are the same either way, value for value.
    #[inline(always)]
    fn filter_grad_taps<const K: usize, const KK: usize>(
        &self,
        p: &[f32],
        dyq: &[f32],
        owq: usize,
        dw: &mut [f32],
    ) {
        if super::vector_lanes() >= CH {
            self.filter_grad_sweep::<K, KK>(p, dyq, owq, dw, 0);
        } else {
            for ki in 0..K {
                self.filter_grad_sweep::<K, K>(p, dyq, owq, dw, ki);
            }
        }
    }

    /// One sweep over the plane summing the `T` taps of filter rows `ki0..ki0 + T / K` (`T` a
    /// multiple of `K`), each in an accumulator of its own, into their places in `dw`.
    #[inline(always)]
    fn filter_grad_sweep<const K: usize, const T: usize>(
        &self,
        p: &[f32],
        dyq: &[f32],
        owq: usize,
        dw: &mut [f32],
        ki0: usize,
    ) {
        let mut acc = [[0.0f32; CH]; T];
        let mut bases = [0usize; T];
        for (oy, drow) in dyq.chunks_exact(owq).enumerate() {
            for (t, base) in bases.iter_mut().enumerate() {
                *base = self.tap_base(oy * self.s + ki0 + t / K, t % K);
            }
            for (x0, d) in (0..owq).step_by(CH).zip(drow.chunks_exact(CH)) {
                // A copy in an array of its own, so that the loops below vectorize.
                let d: [f32; CH] = std::array::from_fn(|i| d[i]);
                for t in 0..T {
                    let src = &p[bases[t] + x0..][..CH];
                    for i in 0..CH {
                        acc[t][i] = d[i].mul_add(src[i], acc[t][i]);
                    }
                }
            }
        }
        for (d, acc) in dw[ki0 * K..][..T].iter_mut().zip(&acc) {
            *d += acc.iter().sum::<f32>();
        }
    }

    /// Values of the padded `dy` scratch of [`Geometry::filter_grad_plane`].
    pub(crate) fn padded_dy_len(&self) -> usize {
        self.oh * self.ow.div_ceil(CH) * CH
    }

    /// The input gradient of one plane in scratch layout: `dp` (overwritten) = the transposed
    /// convolution of `dy` with the filter; [`Geometry::crop_scratch`] takes it to the plane.
    /// Written as a gather per scratch row and parity, `dp[j] += Σ_taps w · dy[j − shift]`, over
    /// a zero-padded copy of each `dy` row (`dyp`, at least [`Geometry::padded_row_len`] long).
    #[inline(always)]
    pub(crate) fn input_grad_scratch(&self, filter: &[f32], dy: &[f32], dp: &mut [f32], dyp: &mut [f32]) {
        let (k, s, ow, pw) = (self.k, self.s, self.ow, self.pw);
        let lead = (k - 1) / s;
        dp.fill(0.0);
        let dyp = &mut dyp[..self.padded_row_len()];
        dyp.fill(0.0);
        for (oy, drow) in dy.chunks_exact(ow).enumerate() {
            dyp[lead..lead + ow].copy_from_slice(drow);
            for ki in 0..k {
                let r = oy * s + ki;
                for parity in 0..s {
                    let base = parity * self.ph * pw + r * pw;
                    // Taps kj ≡ parity (mod s) read dy at j − kj/s.
                    let mut taps = [(0.0f32, 0usize); 7];
                    let mut nt = 0;
                    for kj in (parity..k).step_by(s) {
                        taps[nt] = (filter[ki * k + kj], lead - kj / s);
                        nt += 1;
                    }
                    let taps = &taps[..nt];
                    let mut j0 = 0;
                    while j0 + CH <= pw {
                        let dst = &mut dp[base + j0..base + j0 + CH];
                        let mut acc = [0.0f32; CH];
                        acc.copy_from_slice(dst);
                        add_taps(&mut acc, dyp, taps, j0);
                        dst.copy_from_slice(&acc);
                        j0 += CH;
                    }
                    if j0 < pw {
                        let mut acc = [0.0f32; CH];
                        add_taps(&mut acc, dyp, taps, j0);
                        for (d, &a) in dp[base + j0..base + pw].iter_mut().zip(&acc) {
                            *d += a;
                        }
                    }
                }
            }
        }
    }

    /// The geometry of the input gradient as a stride-1 convolution of its own: `dy`
    /// (`oh × ow`), for stride 2 spread out with a zero between neighbours (`(2·oh − 1) ×
    /// (2·ow − 1)`), padded by `k − 1 − p` above and left (`p` this convolution's padding there)
    /// and by what makes the output `h × w` below and right, then convolved with the filter turned
    /// by 180°, gives `dx` (`h × w`) directly. `None` where a padding is wider than `k − 1` or the
    /// input has rows or columns past the last that any output reads beyond what padding covers.
    pub(crate) fn transposed(&self) -> Option<Geometry> {
        let (k, s, p) = (self.k, self.s, self.pad);
        // The spread-out dy: its rows and columns.
        let (uh, uw) = ((self.oh - 1) * s + 1, (self.ow - 1) * s + 1);
        let top = (k - 1).checked_sub(p.top)?;
        let left = (k - 1).checked_sub(p.left)?;
        // The stride-1 output has uh + top + bottom − k + 1 rows, which must be h.
        let bottom = (self.h + k - 1).checked_sub(uh + top)?;
        let right = (self.w + k - 1).checked_sub(uw + left)?;
        let spec = DepthwiseSpec {
            kernel: k,
            stride: 1,
            padding: Padding {
                top,
                bottom,
                left,
                right,
            },
        };
        let g = Geometry::of(&spec, 1, 1, uh, uw).ok()?;
        ((g.oh, g.ow) == (self.h, self.w)).then_some(g)
    }

    /// Fills the scratch of the transposed geometry `t` ([`Geometry::transposed`]) with one plane
    /// of `dy` (`oh × ow`): for stride 1 the plane with its zero border, for stride 2 each value
    /// at every other row and column and zeros between.
    #[inline(always)]
    fn fill_transposed(&self, t: &Geometry, dy: &[f32], dp: &mut [f32]) {
        if self.s == 1 {
            t.fill_scratch(dy, dp);
            return;
        }
        let dp = &mut dp[..t.scratch_len()];
        dp.fill(0.0);
        for (oy, row) in dy.chunks_exact(self.ow).enumerate() {
            let dst = &mut dp[(oy * self.s + t.pad.top) * t.pw + t.pad.left..];
            for (ox, &v) in row.iter().enumerate() {
                dst[ox * self.s] = v;
            }
        }
    }

    /// Values of the scratch [`Geometry::input_grad_plane`] needs (its `dp`).
    pub(crate) fn input_grad_scratch_len(&self) -> usize {
        if self.s == 2 {
            return self.polyphase_len();
        }
        self.transposed()
            .map_or(0, |t| t.scratch_len())
            .max(self.scratch_len())
    }

    /// The input gradient of one plane, `dx` (`h × w`, overwritten), from its output gradient `dy`
    /// and its `k × k` filter; `dp` ([`Geometry::input_grad_scratch_len`]) and `row`
    /// ([`Geometry::padded_row_len`]) are scratch. For stride 2, one stride-1 convolution per
    /// parity class of the input ([`Geometry::input_grad_polyphase`], `t` unused). For stride 1,
    /// where `t` (from [`Geometry::transposed`]) is given, a forward convolution of the padded `dy`
    /// with the turned filter: the forward pass's register-blocked kernel, no scatter; otherwise
    /// the scatter over the scratch plane of [`Geometry::input_grad_scratch`].
    #[inline(always)]
    pub(crate) fn input_grad_plane(
        &self,
        t: Option<&Geometry>,
        filter: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dp: &mut [f32],
        row: &mut [f32],
    ) {
        match t {
            _ if self.s == 2 => self.input_grad_polyphase(filter, dy, dx, dp),
            Some(t) => {
                let kk = self.k * self.k;
                let mut turned = [0.0f32; 49];
                for (d, &w) in turned[..kk].iter_mut().zip(filter[..kk].iter().rev()) {
                    *d = w;
                }
                self.fill_transposed(t, dy, dp);
                t.convolve_plane(dp, &turned[..kk], dx);
            }
            None => {
                self.input_grad_scratch(filter, dy, dp, row);
                self.crop_scratch(dp, dx);
            }
        }
    }

    /// Length of the zero-padded `dy` row [`Geometry::input_grad_scratch`] works on.
    pub(crate) fn padded_row_len(&self) -> usize {
        (self.k - 1) / self.s + self.pw.max(self.ow) + 1 + CH
    }
}

/// One parity class of the stride-2 input gradient along one axis: input index `2i + a` (for `i`
/// in `0..len`) is reached by the filter taps `k0, k0 + 2, …` (`n` of them), tap `k0 + 2m` from
/// output-gradient index `i + e − m`.
#[derive(Clone, Copy, Debug)]
struct Phase {
    k0: usize,
    n: usize,
    e: usize,
    len: usize,
}

/// The two parity classes of an axis of `size` inputs with `before` padding and a `k`-tap filter
/// at stride 2: input `y` is read by tap `t` of output `(y + before − t) / 2` when that is whole.
fn phases(k: usize, before: usize, size: usize) -> [Phase; 2] {
    std::array::from_fn(|a| {
        let k0 = (a + before) % 2;
        Phase {
            k0,
            n: if k0 < k { (k - k0).div_ceil(2) } else { 0 },
            e: (a + before - k0) / 2,
            len: (size + 1).saturating_sub(a) / 2,
        }
    })
}

/// The zero-padded output-gradient plane of the stride-2 input gradient: `(rows above, columns
/// left, rows, row pitch)`, enough that every tap of every parity class reads inside it.
fn phase_plane(
    k: usize,
    pad: Padding,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> (usize, usize, usize, usize) {
    let axis = |before: usize, size: usize, out: usize| {
        let ps = phases(k, before, size);
        let lead = ps.iter().map(|p| p.n.saturating_sub(1 + p.e)).max().unwrap_or(0);
        let span = ps.iter().map(|p| p.len + p.e).max().unwrap_or(0).max(out);
        (lead, lead + span)
    };
    let (top, rows) = axis(pad.top, h, oh);
    let (left, pitch) = axis(pad.left, w, ow);
    (top, left, rows, pitch)
}

impl Geometry {
    /// Values of the scratch [`Geometry::input_grad_polyphase`] needs.
    fn polyphase_len(&self) -> usize {
        let (_, _, rows, pitch) = phase_plane(self.k, self.pad, self.h, self.w, self.oh, self.ow);
        rows * pitch + CH + 2 * self.h.div_ceil(2) * self.class_width()
    }

    /// Columns of a parity class's output rows in [`Geometry::input_grad_polyphase`]: the wider
    /// class's, in whole vectors.
    fn class_width(&self) -> usize {
        self.w.div_ceil(2).div_ceil(CH) * CH
    }

    /// The stride-2 input gradient of one plane, `dx` (`h × w`, overwritten), from its output
    /// gradient `dy` and its `k × k` filter, one parity class of rows and columns at a time: input
    /// `(2i + a, 2j + b)` is reached only by the taps of row parity and column parity fixed by
    /// `(a, b)`, so each class is a stride-1 convolution of `dy` (copied into `dp` with a zero
    /// border, [`Geometry::polyphase_len`] values) with a sub-filter of about a quarter of the taps
    /// — the forward pass's register-blocked kernel, a quarter of the multiply-adds of convolving
    /// `dy` spread out with zeros. For each row class, the two column classes are computed into
    /// planes of their own (in `dp` after the padded `dy`) and interleaved row by row into `dx`.
    #[inline(always)]
    pub(crate) fn input_grad_polyphase(&self, filter: &[f32], dy: &[f32], dx: &mut [f32], dp: &mut [f32]) {
        let (k, w) = (self.k, self.w);
        let (top, left, rows, pitch) = phase_plane(k, self.pad, self.h, self.w, self.oh, self.ow);
        let cw = self.class_width();
        let (plane, classes) = dp.split_at_mut(rows * pitch + CH);
        let classes = &mut classes[..2 * self.h.div_ceil(2) * cw];
        plane.fill(0.0);
        for (r, src) in dy.chunks_exact(self.ow).enumerate() {
            plane[(r + top) * pitch + left..][..self.ow].copy_from_slice(src);
        }
        let row_phases = phases(k, self.pad.top, self.h);
        let col_phases = phases(k, self.pad.left, self.w);
        for (a, pr) in row_phases.iter().enumerate() {
            // Each column class's sub-filter, last tap first (a correlation over dy), and where
            // each tap reads in `dp` for output (0, 0) of the class.
            // At most 4 × 4 taps per class (k ≤ 7).
            let mut weights = [[0.0f32; 16]; 2];
            let mut offsets = [[0usize; 16]; 2];
            let mut count = [0usize; 2];
            for (b, pc) in col_phases.iter().enumerate() {
                for mi in 0..pr.n {
                    for ni in 0..pc.n {
                        let ki = pr.k0 + 2 * (pr.n - 1 - mi);
                        let kj = pc.k0 + 2 * (pc.n - 1 - ni);
                        weights[b][count[b]] = filter[ki * k + kj];
                        offsets[b][count[b]] =
                            (pr.e + top + 1 + mi - pr.n) * pitch + pc.e + left + 1 + ni - pc.n;
                        count[b] += 1;
                    }
                }
            }
            let (even, odd) = classes.split_at_mut(classes.len() / 2);
            for (b, out) in [&mut *even, &mut *odd].into_iter().enumerate() {
                let (wts, taps) = (&weights[b][..count[b]], &offsets[b][..count[b]]);
                let mut i = 0;
                while i < pr.len {
                    let block = (pr.len - i).min(ROWS);
                    for j0 in (0..cw).step_by(CH) {
                        if block == ROWS {
                            let acc = taps_rows::<ROWS>(plane, wts, taps, i * pitch + j0, pitch);
                            for (r, acc) in acc.iter().enumerate() {
                                out[(i + r) * cw + j0..][..CH].copy_from_slice(acc);
                            }
                        } else {
                            for r in i..i + block {
                                let [acc] = taps_rows::<1>(plane, wts, taps, r * pitch + j0, 0);
                                out[r * cw + j0..][..CH].copy_from_slice(&acc);
                            }
                        }
                    }
                    i += block;
                }
            }
            for i in 0..pr.len {
                let row = &mut dx[(2 * i + a) * w..][..w];
                let (e, o) = (&even[i * cw..][..cw], &odd[i * cw..][..cw]);
                for ((pair, &ev), &ov) in row.chunks_exact_mut(2).zip(e).zip(o) {
                    pair[0] = ev;
                    pair[1] = ov;
                }
                if w % 2 == 1 {
                    row[w - 1] = e[w / 2];
                }
            }
        }
    }
}

/// Planes the channel-interleaved path works on at once: one vector register of channels.
pub(crate) const GROUP: usize = CH;

/// The channel-interleaved path, for narrow planes (at most one vector wide, 7 and 14 columns in
/// EfficientNet-Lite0's late stages), where a row-wise vector would be mostly empty and per-row
/// overheads dominate: [`GROUP`] planes of consecutive channels are transposed into one scratch
/// whose every position holds a vector of their values, so each tap of each output position is one
/// full-width multiply-add. The transposes in and out are the price; for narrow planes it is small.
impl Geometry {
    /// Whether the interleaved path applies: outputs at most one vector wide, whole groups of
    /// channels.
    pub(crate) fn grouped(&self) -> bool {
        self.ow <= CH && self.c.is_multiple_of(GROUP)
    }

    /// Columns of the (not parity-split) padded scratch plane.
    fn pwf(&self) -> usize {
        (self.ow - 1) * self.s + self.k
    }

    /// Values of one interleaved scratch: `ph × pwf` positions of [`GROUP`] lanes.
    pub(crate) fn group_scratch_len(&self) -> usize {
        self.ph * self.pwf() * GROUP
    }

    /// Values of the interleaved output gradient: `oh × ow` positions of [`GROUP`] lanes.
    pub(crate) fn group_dy_len(&self) -> usize {
        self.oh * self.ow * GROUP
    }

    /// Transposes [`GROUP`] input planes (`planes`, `GROUP × h × w`) through `f(lane, value)` into
    /// the zero-bordered interleaved scratch `q`.
    #[inline(always)]
    pub(crate) fn fill_group(&self, planes: &[f32], q: &mut [f32], f: impl Fn(usize, f32) -> f32) {
        let n = self.zero_group_margins(q);
        for (lane, plane) in planes.chunks_exact(self.h * self.w).enumerate() {
            for (row, base) in self.group_rows() {
                for (ix, &v) in plane[row..][..n].iter().enumerate() {
                    q[(base + ix) * GROUP + lane] = f(lane, v);
                }
            }
        }
    }

    /// [`Geometry::fill_group`] from channels-last values: input position `p = iy·w + ix` holds the
    /// group's [`GROUP`] values side by side at `src[p · stride..]`, so each position is one
    /// vector copy (through `f(lane, value)`), not [`GROUP`] scattered ones.
    #[inline(always)]
    pub(crate) fn fill_group_channels_last(
        &self,
        src: &[f32],
        stride: usize,
        q: &mut [f32],
        f: impl Fn(usize, f32) -> f32,
    ) {
        let n = self.zero_group_margins(q);
        for (row, base) in self.group_rows() {
            for ix in 0..n {
                let v = &src[(row + ix) * stride..][..GROUP];
                let d = &mut q[(base + ix) * GROUP..][..GROUP];
                for lane in 0..GROUP {
                    d[lane] = f(lane, v[lane]);
                }
            }
        }
    }

    /// Zeroes the positions of the interleaved scratch `q` that a fill leaves unwritten (padding
    /// rows and each row's margins), and returns how many values of each input row a fill writes.
    #[inline(always)]
    fn zero_group_margins(&self, q: &mut [f32]) -> usize {
        let n = self.group_row_len();
        let (pwf, left) = (self.pwf(), self.pad.left);
        for (r, row) in q.chunks_exact_mut(pwf * GROUP).enumerate() {
            self.zero_unwritten(row, r, left * GROUP, (left + n) * GROUP);
        }
        n
    }

    /// The input rows that land in the interleaved scratch: the offset of each in its plane and the
    /// scratch position of its first value.
    #[inline(always)]
    fn group_rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let pwf = self.pwf();
        (0..self.h)
            .take_while(|iy| iy + self.pad.top < self.ph)
            .map(move |iy| (iy * self.w, (iy + self.pad.top) * pwf + self.pad.left))
    }

    /// How many values of each input row land in the interleaved scratch.
    #[inline(always)]
    fn group_row_len(&self) -> usize {
        self.w.min(self.pwf().saturating_sub(self.pad.left))
    }

    /// The filters of all `c` channels interleaved group by group, once per call of an op: the
    /// group starting at channel `g·GROUP` occupies `GROUP × k × k` values from `g·GROUP·k·k`,
    /// tap `t` of plane `lane` at `t·GROUP + lane` (`filters` holds `c × k × k` values).
    pub(crate) fn interleave_filters(&self, filters: &[f32]) -> Vec<f32> {
        let kk = self.k * self.k;
        let mut wt = vec![0.0f32; filters.len()];
        for (dst, src) in wt
            .chunks_exact_mut(GROUP * kk)
            .zip(filters.chunks_exact(GROUP * kk))
        {
            for lane in 0..GROUP {
                for t in 0..kk {
                    dst[t * GROUP + lane] = src[lane * kk + t];
                }
            }
        }
        wt
    }

    /// The scratch offset of tap `(ki, kj)` of output `(oy, ox)`.
    #[inline(always)]
    fn group_base(&self, oy: usize, ox: usize, ki: usize, kj: usize) -> usize {
        ((oy * self.s + ki) * self.pwf() + ox * self.s + kj) * GROUP
    }

    /// [`GROUP`] output planes (`out`, `GROUP × oh × ow`, overwritten) from a filled interleaved
    /// scratch and the group's interleaved filters `wt` (its part of
    /// [`Geometry::interleave_filters`]).
    #[inline(always)]
    pub(crate) fn convolve_group(&self, q: &[f32], wt: &[f32], out: &mut [f32]) {
        self.convolve_group_map(q, wt, out, |_| {});
    }

    /// [`Geometry::convolve_group`] with `f` applied to each output position's vector of
    /// [`GROUP`] values (one per plane) before it is stored.
    #[inline(always)]
    pub(crate) fn convolve_group_map(
        &self,
        q: &[f32],
        wt: &[f32],
        out: &mut [f32],
        f: impl Fn(&mut [f32; GROUP]),
    ) {
        let ohw = self.oh * self.ow;
        self.convolve_group_with(
            q,
            wt,
            #[inline(always)]
            |pos, acc| {
                f(acc);
                for (lane, &a) in acc.iter().enumerate() {
                    out[lane * ohw + pos] = a;
                }
            },
        );
    }

    /// The group's convolution from a filled interleaved scratch and its interleaved filters `wt`,
    /// handing each output position (`oy · ow + ox`) and its vector of [`GROUP`] sums (one per
    /// plane) to `store`, row by row.
    #[inline(always)]
    pub(crate) fn convolve_group_with(
        &self,
        q: &[f32],
        wt: &[f32],
        mut store: impl FnMut(usize, &mut [f32; GROUP]),
    ) {
        let k = self.k;
        // Scratch offset from one output position's taps to the next one's along the row.
        let step = self.s * GROUP;
        let mut bases = [0usize; 49];
        for oy in 0..self.oh {
            for ki in 0..k {
                for kj in 0..k {
                    bases[ki * k + kj] = self.group_base(oy, 0, ki, kj);
                }
            }
            let taps = &bases[..k * k];
            let row = oy * self.ow;
            let mut ox = 0;
            // ROWS positions at once: independent accumulators (see `ROWS`).
            while ox + ROWS <= self.ow {
                let mut acc = group_taps::<ROWS>(q, wt, taps, ox * step, step);
                for (j, acc) in acc.iter_mut().enumerate() {
                    store(row + ox + j, acc);
                }
                ox += ROWS;
            }
            for ox in ox..self.ow {
                let [mut acc] = group_taps::<1>(q, wt, taps, ox * step, step);
                store(row + ox, &mut acc);
            }
        }
    }

    /// Values of the scratch `dq` of [`Geometry::backward_group`].
    pub(crate) fn group_input_grad_scratch_len(&self) -> usize {
        self.transposed()
            .map_or(0, |t| t.group_scratch_len())
            .max(self.group_scratch_len())
    }

    /// [`Geometry::backward_group`]'s filter gradients for a `K × K` filter (`KK = K²` taps): all
    /// taps in one sweep over the output positions where a vector register holds [`GROUP`] values
    /// (AVX-512), else one sweep per filter row ([`Geometry::group_filter_grad_sweep`]): with
    /// AVX2's 8-lane registers the single sweep's 9 or 25 accumulators of 16 lanes take 18 or 50
    /// of the 16 registers and live on the stack. The sums are the same either way, value for
    /// value. (A first try of the row sweeps, timed only at block level, looked no faster; timed
    /// sweep by sweep they are 1.2-1.6× faster on AVX2.)
    #[inline(always)]
    fn group_filter_grad<const K: usize, const KK: usize>(&self, q: &[f32], dyq: &[f32], dw: &mut [f32]) {
        if super::vector_lanes() >= CH {
            self.group_filter_grad_sweep::<K, KK>(q, dyq, dw, 0);
        } else {
            for ki in 0..K {
                self.group_filter_grad_sweep::<K, K>(q, dyq, dw, ki);
            }
        }
    }

    /// One sweep over the output positions summing the `T` taps of filter rows `ki0..ki0 + T / K`
    /// (`T` a multiple of `K`) for the [`GROUP`] planes, each tap in an accumulator of its own,
    /// into their places in `dw` (`GROUP × K × K`). Each position's vector of output gradients is
    /// loaded once per sweep, and the multiply-adds per position are independent.
    #[inline(always)]
    fn group_filter_grad_sweep<const K: usize, const T: usize>(
        &self,
        q: &[f32],
        dyq: &[f32],
        dw: &mut [f32],
        ki0: usize,
    ) {
        let kk = K * K;
        let offs: [usize; T] = std::array::from_fn(|t| self.group_base(0, 0, ki0 + t / K, t % K));
        let mut acc = [[0.0f32; GROUP]; T];
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                let base = self.group_base(oy, ox, 0, 0);
                let d = &dyq[(oy * self.ow + ox) * GROUP..][..GROUP];
                let d: [f32; GROUP] = std::array::from_fn(|i| d[i]);
                for t in 0..T {
                    let src = &q[base + offs[t]..][..GROUP];
                    for i in 0..GROUP {
                        acc[t][i] = d[i].mul_add(src[i], acc[t][i]);
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (lane, &a) in acc.iter().enumerate() {
                dw[lane * kk + ki0 * K + t] += a;
            }
        }
    }

    /// The backward pass of a group: adds the filter gradients to `dw` (`GROUP × k × k`) and writes
    /// the input gradients `dx` (`GROUP × h × w`), from the output gradients `dy`
    /// (`GROUP × oh × ow`), the filled scratch `q`, the group's interleaved filters `wt` and
    /// scratch buffers `dyq` ([`Geometry::group_dy_len`]) and `dq`
    /// ([`Geometry::group_input_grad_scratch_len`]). The filter gradients of all taps are summed in
    /// one sweep over the positions, each tap in a register of its own; the input gradients are
    /// the forward kernel run on the padded (for stride 2 spread-out) `dy` with the turned filters
    /// where `t` is this geometry's [`Geometry::transposed`] (made once per call of an op), or,
    /// where that geometry does not exist (`None`), each output's gradient spread over its taps.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_group(
        &self,
        t: Option<&Geometry>,
        q: &[f32],
        wt: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        dx: &mut [f32],
        dyq: &mut [f32],
        dq: &mut [f32],
    ) {
        let (k, kk, ohw) = (self.k, self.k * self.k, self.oh * self.ow);
        let dyq = &mut dyq[..ohw * GROUP];
        for (lane, plane) in dy.chunks_exact(ohw).enumerate() {
            for (pos, &v) in plane.iter().enumerate() {
                dyq[pos * GROUP + lane] = v;
            }
        }
        match k {
            3 => self.group_filter_grad::<3, 9>(q, dyq, dw),
            5 => self.group_filter_grad::<5, 25>(q, dyq, dw),
            _ => {
                for ki in 0..k {
                    for kj in 0..k {
                        let mut acc = [0.0f32; GROUP];
                        for oy in 0..self.oh {
                            for ox in 0..self.ow {
                                let (d, src) = (
                                    &dyq[(oy * self.ow + ox) * GROUP..][..GROUP],
                                    &q[self.group_base(oy, ox, ki, kj)..][..GROUP],
                                );
                                for i in 0..GROUP {
                                    acc[i] = d[i].mul_add(src[i], acc[i]);
                                }
                            }
                        }
                        for (lane, &a) in acc.iter().enumerate() {
                            dw[lane * kk + ki * k + kj] += a;
                        }
                    }
                }
            }
        }
        if let Some(t) = t {
            let mut turned = [0.0f32; 49 * GROUP];
            for tap in 0..kk {
                turned[tap * GROUP..][..GROUP].copy_from_slice(&wt[(kk - 1 - tap) * GROUP..][..GROUP]);
            }
            let dq = &mut dq[..t.group_scratch_len()];
            if self.s == 1 {
                // dyq holds dy interleaved already: one vector copy per position.
                t.fill_group_channels_last(dyq, GROUP, dq, |_, v| v);
            } else {
                // Spread out: each position's vector at every other row and column.
                dq.fill(0.0);
                let pwf = t.pwf();
                for (pos, d) in dyq.chunks_exact(GROUP).enumerate() {
                    let (oy, ox) = (pos / self.ow, pos % self.ow);
                    let at = (oy * self.s + t.pad.top) * pwf + ox * self.s + t.pad.left;
                    dq[at * GROUP..][..GROUP].copy_from_slice(d);
                }
            }
            t.convolve_group(dq, &turned[..kk * GROUP], dx);
            return;
        }
        // Input gradients: each output position's gradient spread over its taps.
        let dq = &mut dq[..self.group_scratch_len()];
        dq.fill(0.0);
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                let d = &dyq[(oy * self.ow + ox) * GROUP..][..GROUP];
                let d: [f32; GROUP] = std::array::from_fn(|i| d[i]);
                for ki in 0..k {
                    for kj in 0..k {
                        let (w, dst) = (
                            &wt[(ki * k + kj) * GROUP..][..GROUP],
                            &mut dq[self.group_base(oy, ox, ki, kj)..][..GROUP],
                        );
                        for i in 0..GROUP {
                            dst[i] += w[i] * d[i];
                        }
                    }
                }
            }
        }
        let n = self.group_row_len();
        for (lane, plane) in dx.chunks_exact_mut(self.h * self.w).enumerate() {
            plane.fill(0.0);
            for (row, base) in self.group_rows() {
                for (ix, v) in plane[row..][..n].iter_mut().enumerate() {
                    *v = dq[(base + ix) * GROUP + lane];
                }
            }
        }
    }
}

fn forward(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    let (plane_in, plane_out, kk) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
    let mut out = vec![0.0f32; g.b * g.c * plane_out];
    out.par_chunks_mut(plane_out)
        .zip(x.par_chunks(plane_in))
        .enumerate()
        .for_each(|(i, (o, xp))| {
            let filter = &w[(i % g.c) * kk..][..kk];
            with_scratch(&SCRATCH, g.scratch_len(), |p| {
                super::simd(
                    #[inline(always)]
                    || {
                        g.fill_scratch(xp, p);
                        g.convolve_plane(p, filter, o);
                    },
                )
            });
        });
    out
}

/// `(dx, dw)`: `dx` only when asked for.
fn backward(x: &[f32], w: &[f32], dy: &[f32], g: &Geometry, need_dx: bool) -> (Option<Vec<f32>>, Vec<f32>) {
    let (plane_in, plane_out, kk) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
    let planes = g.b * g.c;
    let mut dx = if need_dx {
        vec![0.0f32; planes * plane_in]
    } else {
        Vec::new()
    };
    // The filter gradient of every plane; summed over the batch afterwards.
    let mut dw_planes = vec![0.0f32; planes * kk];
    let turned = g.transposed();
    let work = |i: usize, dx_plane: Option<&mut [f32]>, dw_plane: &mut [f32]| {
        let filter = &w[(i % g.c) * kk..][..kk];
        let dyp = &dy[i * plane_out..][..plane_out];
        with_scratch(&SCRATCH, g.scratch_len(), |p| {
            with_scratch(&ROW, g.padded_dy_len(), |dyq| {
                super::simd(
                    #[inline(always)]
                    || {
                        g.fill_scratch(&x[i * plane_in..][..plane_in], p);
                        g.filter_grad_plane(p, dyp, dw_plane, dyq);
                    },
                )
            })
        });
        if let Some(dx_plane) = dx_plane {
            with_scratch(&DSCRATCH, g.input_grad_scratch_len(), |dp| {
                with_scratch(&ROW, g.padded_row_len(), |row| {
                    super::simd(
                        #[inline(always)]
                        || g.input_grad_plane(turned.as_ref(), filter, dyp, dx_plane, dp, row),
                    )
                })
            });
        }
    };
    if need_dx {
        dx.par_chunks_mut(plane_in)
            .zip(dw_planes.par_chunks_mut(kk))
            .enumerate()
            .for_each(|(i, (dxp, dwp))| work(i, Some(dxp), dwp));
    } else {
        dw_planes
            .par_chunks_mut(kk)
            .enumerate()
            .for_each(|(i, dwp)| work(i, None, dwp));
    }
    let mut dw = vec![0.0f32; g.c * kk];
    for image in dw_planes.chunks_exact(g.c * kk) {
        dw.iter_mut().zip(image).for_each(|(a, b)| *a += b);
    }
    (need_dx.then_some(dx), dw)
}

/// The custom op: inputs `x (B, C, H, W)` and `w (C, 1, k, k)`.
pub(crate) struct DepthwiseOp {
    pub(crate) spec: DepthwiseSpec,
}

impl CustomOp2 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "fracture-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(&self.spec, l1.dims(), l2.dims())?;
        let out = forward(contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?, &g);
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(&self.spec, x.dims(), w.dims())?;
        let grad = grad_res.contiguous()?;
        let need_dx = x.track_op();
        let (dx, dw) = {
            let (xs, ws, gs) = (tensor_f32(x)?, tensor_f32(w)?, tensor_f32(&grad)?);
            backward(xs.slice()?, ws.slice()?, gs.slice()?, &g, need_dx)
        };
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        Ok((dx, Some(Tensor::from_vec(dw, w.shape(), dev)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    #[test]
    fn same_padding_follows_tensorflow() {
        // Stride 2 on an even side: 0 before, 1 after for k = 3; 1 before, 2 after for k = 5.
        assert_eq!(
            Padding::same(224, 224, 3, 2),
            Padding {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1
            }
        );
        assert_eq!(
            Padding::same(56, 56, 5, 2),
            Padding {
                top: 1,
                bottom: 2,
                left: 1,
                right: 2
            }
        );
        // Stride 1: symmetric (k − 1)/2.
        assert_eq!(
            Padding::same(14, 14, 5, 1),
            Padding {
                top: 2,
                bottom: 2,
                left: 2,
                right: 2
            }
        );
        // Stride 2 on an odd side: ceil(75/2) = 38 outputs need 4 padded pixels, 2 and 2.
        assert_eq!(Padding::same(75, 75, 5, 2).top, 2);
        let spec = DepthwiseSpec {
            kernel: 5,
            stride: 2,
            padding: Padding::same(75, 74, 5, 2),
        };
        assert_eq!(spec.out_dims(75, 74), (38, 37));
    }

    /// The filter-gradient sums in one sweep (AVX-512's way) and one sweep per filter row (the
    /// way of narrower registers) agree value for value, whichever of the two this processor runs.
    fn sweeps_agree<const K: usize, const KK: usize>(stride: usize, h: usize, w: usize) {
        let spec = DepthwiseSpec {
            kernel: K,
            stride,
            padding: Padding::same(h, w, K, stride),
        };
        let g = Geometry::of(&spec, 1, 1, h, w).unwrap();
        let p = values(g.scratch_len() + CH, 1);
        let owq = g.ow.div_ceil(CH) * CH;
        let dyq = values(g.oh * owq, 2);
        let (mut one, mut rows) = (vec![0.5f32; KK], vec![0.5f32; KK]);
        g.filter_grad_sweep::<K, KK>(&p, &dyq, owq, &mut one, 0);
        for ki in 0..K {
            g.filter_grad_sweep::<K, K>(&p, &dyq, owq, &mut rows, ki);
        }
        assert_eq!(one, rows, "plane sweeps, k {K}, stride {stride}, {h}×{w}");
    }

    #[test]
    fn filter_gradient_sweeps_by_row_match_the_single_sweep() {
        for stride in [1, 2] {
            for (h, w) in [(14, 14), (7, 9), (23, 37)] {
                sweeps_agree::<3, 9>(stride, h, w);
                sweeps_agree::<5, 25>(stride, h, w);
            }
        }
    }

    /// The stride-2 input gradient by parity classes equals the scatter over the scratch plane
    /// (the path of any padding) and, where it exists, the turned filter run over the spread-out
    /// output gradient, on planes narrow and wide, odd and even, with paddings of 0 to 3 on each
    /// side and kernels 1 to 7.
    #[test]
    fn stride_two_input_gradient_by_parity_classes_matches_the_scatter() {
        let mut checked = 0;
        for k in 1..=7 {
            for (h, w) in [(1, 1), (2, 5), (7, 9), (12, 40), (23, 37), (56, 56)] {
                for pads in [
                    [0, 0, 0, 0],
                    [0, 1, 0, 1],
                    [1, 2, 1, 2],
                    [3, 0, 2, 3],
                    [2, 3, 3, 1],
                ] {
                    let padding = Padding {
                        top: pads[0],
                        bottom: pads[1],
                        left: pads[2],
                        right: pads[3],
                    };
                    if h + pads[0] + pads[1] < k || w + pads[2] + pads[3] < k {
                        continue;
                    }
                    let spec = DepthwiseSpec {
                        kernel: k,
                        stride: 2,
                        padding,
                    };
                    let g = Geometry::of(&spec, 1, 1, h, w).unwrap();
                    let filter = values(k * k, 3);
                    let dy = values(g.oh * g.ow, 4);
                    let mut dp = vec![f32::NAN; g.input_grad_scratch_len().max(g.scratch_len())];
                    let mut row = vec![f32::NAN; g.padded_row_len()];
                    let mut ours = vec![f32::NAN; h * w];
                    g.input_grad_polyphase(&filter, &dy, &mut ours, &mut dp);
                    let mut scatter = vec![f32::NAN; h * w];
                    g.input_grad_scratch(&filter, &dy, &mut dp, &mut row);
                    g.crop_scratch(&dp, &mut scatter);
                    let what = format!("k {k}, {h}×{w}, padding {pads:?}");
                    for (i, (a, b)) in ours.iter().zip(&scatter).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5,
                            "{what}: dx[{i}] {a} against the scatter's {b}"
                        );
                    }
                    if let Some(t) = g.transposed() {
                        let mut spread = vec![f32::NAN; h * w];
                        let mut big = vec![f32::NAN; t.scratch_len().max(dp.len())];
                        let mut turned: Vec<f32> = filter.clone();
                        turned.reverse();
                        g.fill_transposed(&t, &dy, &mut big);
                        t.convolve_plane(&big, &turned, &mut spread);
                        assert_eq!(ours, spread, "{what}: against the spread-out gradient");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 150, "only {checked} geometries checked");
    }

    /// The channel-group filter gradients in one sweep (AVX-512's way) and one sweep per filter
    /// row (AVX2's) agree value for value.
    #[test]
    fn group_filter_gradient_sweeps_by_row_match_the_single_sweep() {
        fn agree<const K: usize, const KK: usize>(stride: usize, side: usize) {
            let spec = DepthwiseSpec {
                kernel: K,
                stride,
                padding: Padding::same(side, side, K, stride),
            };
            let g = Geometry::of(&spec, 1, GROUP, side, side).unwrap();
            let q = values(g.group_scratch_len(), 1);
            let dyq = values(g.group_dy_len(), 2);
            let (mut one, mut rows) = (vec![0.5f32; GROUP * KK], vec![0.5f32; GROUP * KK]);
            g.group_filter_grad_sweep::<K, KK>(&q, &dyq, &mut one, 0);
            for ki in 0..K {
                g.group_filter_grad_sweep::<K, K>(&q, &dyq, &mut rows, ki);
            }
            assert_eq!(one, rows, "group sweeps, k {K}, stride {stride}, {side}×{side}");
        }
        for stride in [1, 2] {
            for side in [1, 7, 14, 28] {
                agree::<3, 9>(stride, side);
                agree::<5, 25>(stride, side);
            }
        }
    }
}
