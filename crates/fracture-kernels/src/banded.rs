//! The inverted bottleneck at inference, image by image and band by band of output rows, so that
//! its expanded activations never reach main memory.
//!
//! The whole-batch pass writes the expansion `y1` (six times the input's channels, at the input's
//! resolution: 4.8 MB per image in EfficientNet-Lite0's first expanding block at 224 px) and reads it
//! back in the depthwise stage, then writes and reads the depthwise output again for the projection.
//! Here each image is worked through in bands of output rows, each band's expanded rows sized to
//! about one core's L2 cache: expand the input rows the band reads, the depthwise filter with BN0 +
//! ReLU6 on the way in and BN1 + ReLU6 on the way out, then the projection straight into the band's
//! columns of the output, and BN2 (+ the input) in place. The rows a band shares with the one before
//! (`k − s` of them) are copied over, not expanded twice. Images are spread over threads, one image
//! per task.
//!
//! A block that expands to whole groups of 16 channels (every expanding block of
//! EfficientNet-Lite0) runs channels-last between its products ([`Banded::image_channels_last`]):
//! each position's expanded values side by side, so the depthwise filter works on 16 channels per
//! vector at every position, whatever the plane's width. Otherwise the planes stay planar: a block
//! without an expansion reads the input's rows where they are (only the depthwise output then stays
//! in cache), each plane filtered row by row, or narrow planes (at most one vector wide) through a
//! channel-interleaved scratch, each image as one band. Only for fixed statistics and no backward
//! pass (nothing is kept), and at least one image per thread: see [`applies`]. Checked against
//! candle's ops in this module's tests.

use std::sync::Arc;

use rayon::prelude::*;

use super::SharedLhs;
use super::depthwise::{GROUP, Geometry, SCRATCH, with_scratch};
use super::gemm::{Threads, View};
use super::mbconv::{
    MbConvSpec, bn_out, convolve_group_bn, convolve_group_bn_channels_last, convolve_plane_bn, fill_group,
    fill_group_channels_last, fill_plane,
};
use super::norm::Norm;
use super::packed::PackedF32;
use super::simd;

/// Bytes of expanded activations one band aims to hold, about one core's L2. Chosen by measurement
/// (`bench_blocks 224 32 6 --infer`, AMD EPYC with 1 MiB of L2 per core): budgets from 768 KiB to
/// 4 MiB ran within the noise of each other, 128-256 KiB slower (more, smaller products).
pub(crate) const BAND_BYTES: usize = 1 << 20;

/// Whether the banded pass applies to `b` images of geometry `g` (a block that expands or not;
/// `packed`: FP32 products on the packed kernels of `packed.rs`): one image or more per thread, or
/// fewer images split between the threads ([`split_images`]). Otherwise the whole-batch pass splits
/// each layer's work between the threads. Splitting one image's channels-last pass between the
/// threads on the `gemm` crate's products made EfficientNet-Lite0's one-image latency about 5%
/// longer (`bench_step infer 224 1 40`, five alternated runs): the crate packs the activations of
/// each share afresh.
pub(crate) fn applies(b: usize, g: &Geometry, expand: bool, packed: bool) -> bool {
    b >= rayon::current_num_threads() || split_images(b, g, expand, packed)
}

/// Whether the banded pass takes `b` images one after another, each split between the threads
/// ([`Banded::image_split`]): fewer images than threads, a channels-last block on narrow planes
/// ([`Geometry::grouped`]), and the packed FP32 kernels (`packed.rs`), which need no packing of the
/// activations however the work is cut. On wider planes a whole image's expansion outgrows the
/// caches and the whole-batch pass was faster (`bench_blocks 224 1 60 --infer`, blocks 2.1 and 2.2:
/// 1.3-1.4 vs 1.1 ms and 1.1 vs 0.6-1.0 ms; blocks 4.1-7.1 0.3-0.8 vs 0.4-0.9 ms).
fn split_images(b: usize, g: &Geometry, expand: bool, packed: bool) -> bool {
    b < rayon::current_num_threads() && packed && g.grouped() && channels_last(g, expand)
}

/// Whether a block of geometry `g` (its depthwise stage: `g.c` is the expanded width) that expands
/// or not runs channels-last between its products ([`Banded::image_channels_last`]): it expands
/// to whole groups of channels.
pub(crate) fn channels_last(g: &Geometry, expand: bool) -> bool {
    expand && g.c.is_multiple_of(GROUP)
}

/// Whether the block's depthwise filters go to [`Banded`] interleaved by groups of channels
/// ([`Geometry::interleave_filters`]): for the channel-interleaved depthwise path, planar or
/// channels-last.
pub(crate) fn interleaved(g: &Geometry, expand: bool) -> bool {
    g.grouped() || channels_last(g, expand)
}

/// Output rows per band so that the input rows they read hold about `bytes` of `mid` expanded
/// channels (at least one row; at most the whole output); the whole output for narrow planes.
fn band_rows(g: &Geometry, stride: usize, mid: usize, bytes: usize) -> usize {
    if g.grouped() {
        return g.oh.max(1);
    }
    let rows_in = bytes / (g.w * mid * size_of::<f32>()).max(1);
    (rows_in.saturating_sub(g.k) / stride.max(1) + 1).clamp(1, g.oh.max(1))
}

/// One block's operands for the banded pass.
pub(crate) struct Banded<'a> {
    pub(crate) spec: MbConvSpec,
    /// The depthwise geometry of the whole batch.
    pub(crate) geom: Geometry,
    /// `We (mid × cin)` prepared for the block's precision, and BN0 (fixed statistics), when the
    /// block expands.
    pub(crate) expand: Option<(SharedLhs<'a>, &'a Norm)>,
    /// `Wp (cout × mid)`, prepared likewise.
    pub(crate) project: SharedLhs<'a>,
    /// The depthwise filters, `(mid, k, k)`; where [`interleaved`] says so, interleaved by groups
    /// of channels (`Geometry::interleave_filters`).
    pub(crate) filters: &'a [f32],
    /// BN1 and BN2 with fixed statistics.
    pub(crate) norms: [&'a Norm; 2],
    /// Without expansion: a normalization + ReLU6 the depthwise stage applies to the input as it
    /// reads it (the layer before's batch norm, folded in), if any.
    pub(crate) input: Option<&'a Norm>,
    /// Bytes of expanded rows per band ([`BAND_BYTES`] outside tests).
    pub(crate) band_bytes: usize,
    /// `We` and `Wp` packed for the FP32 kernels of `packed.rs`, used by the channels-last pass in
    /// place of the `gemm` crate's products where given.
    pub(crate) packed: Option<Arc<(PackedF32, PackedF32)>>,
}

/// Per-task buffers: the expanded rows of the band before and of this one, and the band's
/// depthwise output.
#[derive(Default)]
struct Bufs {
    prev: Vec<f32>,
    cur: Vec<f32>,
    a2: Vec<f32>,
}

impl Banded<'_> {
    /// The block's output for `x (B, cin, H, W)` into `out (B, cout, H', W')`, overwritten.
    pub(crate) fn forward(&self, x: &[f32], out: &mut [f32]) -> candle_core::Result<()> {
        let (s, g) = (&self.spec, &self.geom);
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        let rows = band_rows(g, s.stride, s.mid, self.band_bytes);
        if let (Some((_, n0)), Some(packed)) = (&self.expand, self.packed.as_deref())
            && split_images(g.b, g, true, true)
        {
            let mut bufs = Bufs::default();
            return out
                .chunks_mut(s.cout * ohw)
                .zip(x.chunks(s.cin * hw))
                .try_for_each(|(o, xi)| self.image_split(xi, o, n0, packed, &mut bufs));
        }
        out.par_chunks_mut(s.cout * ohw)
            .zip(x.par_chunks(s.cin * hw))
            .try_for_each_init(Bufs::default, |bufs, (o, xi)| self.image(xi, o, rows, bufs))
    }

    /// One image, `rows` output rows at a time.
    fn image(&self, x: &[f32], out: &mut [f32], rows: usize, bufs: &mut Bufs) -> candle_core::Result<()> {
        if let (true, Some(expand)) = (channels_last(&self.geom, true), &self.expand) {
            return self.image_channels_last(x, out, expand, rows, bufs);
        }
        let (s, g) = (&self.spec, &self.geom);
        let (w, hw) = (g.w, g.h * g.w);
        // The input rows `prev` holds, once a band is done.
        let mut held: Option<(usize, usize)> = None;
        let mut or0 = 0;
        while or0 < g.oh {
            let or1 = (or0 + rows).min(g.oh);
            let (gb, lo, hi) = g.band(s.mid, or0, or1)?;
            let hb = hi - lo;
            let Some((we, n0)) = &self.expand else {
                // No expansion: the depthwise stage reads the input's rows where they are.
                self.depthwise(
                    &gb,
                    |c| &x[c * hw + lo * w..],
                    self.input,
                    or1 - or0,
                    &mut bufs.a2,
                );
                let a2 = View::rows(&bufs.a2, s.mid, (or1 - or0) * g.ow);
                self.project_band(x, out, or0, or1, a2)?;
                or0 = or1;
                continue;
            };
            bufs.cur.resize(s.mid * hb * w, 0.0);
            // Rows the band before expanded are copied; the rest are expanded here.
            let start = match held {
                Some((plo, phi)) if phi > lo => {
                    let (shared, phb) = (phi - lo, phi - plo);
                    for c in 0..s.mid {
                        bufs.cur[c * hb * w..][..shared * w]
                            .copy_from_slice(&bufs.prev[(c * phb + lo - plo) * w..][..shared * w]);
                    }
                    phi
                }
                _ => lo,
            };
            if start < hi {
                let rhs = View {
                    data: &x[start * w..],
                    rows: s.cin,
                    cols: (hi - start) * w,
                    row_stride: hw,
                    col_stride: 1,
                };
                we.matmul(
                    &mut bufs.cur[(start - lo) * w..],
                    hb * w,
                    rhs,
                    false,
                    Threads::One,
                )?;
            }
            let cur = &bufs.cur;
            self.depthwise(&gb, |c| &cur[c * hb * w..], Some(n0), or1 - or0, &mut bufs.a2);
            let a2 = View::rows(&bufs.a2, s.mid, (or1 - or0) * g.ow);
            self.project_band(x, out, or0, or1, a2)?;
            std::mem::swap(&mut bufs.prev, &mut bufs.cur);
            held = Some((lo, hi));
            or0 = or1;
        }
        Ok(())
    }

    /// One image of a block that expands to whole groups of channels, channels-last between its
    /// products, `rows` output rows at a time: the expansion written position by position
    /// (`y1ᵀ = xᵀ · Weᵀ`, so each position's `mid` values lie side by side), each group's
    /// interleaved scratch filled from it with one vector copy per position, the depthwise output
    /// stored the same way, and the projection reading it as a transposed operand. Every tap is
    /// then one full-width multiply-add for any plane width. The planar layout instead moves every
    /// value through a scalar transpose into and out of an interleaved scratch (narrow planes), or
    /// runs each plane row by row with partial vectors at the row ends (wide ones): with 14×14
    /// planes and 5×5 filters those transposes took longer than the filter itself (`perf` on
    /// `bench_blocks 224 32 40 --infer --block 5.2`).
    fn image_channels_last(
        &self,
        x: &[f32],
        out: &mut [f32],
        (we, n0): &(SharedLhs<'_>, &Norm),
        rows: usize,
        bufs: &mut Bufs,
    ) -> candle_core::Result<()> {
        let (s, g) = (&self.spec, &self.geom);
        let (mid, w, hw) = (s.mid, g.w, g.h * g.w);
        // The input rows `prev` holds, once a band is done.
        let mut held: Option<(usize, usize)> = None;
        let mut or0 = 0;
        while or0 < g.oh {
            let or1 = (or0 + rows.max(1)).min(g.oh);
            let (gb, lo, hi) = g.band(mid, or0, or1)?;
            bufs.cur.resize((hi - lo) * w * mid, 0.0);
            // Rows the band before expanded are copied (one block: rows are contiguous here).
            let start = match held {
                Some((plo, phi)) if phi > lo => {
                    let shared = (phi - lo) * w * mid;
                    bufs.cur[..shared].copy_from_slice(&bufs.prev[(lo - plo) * w * mid..][..shared]);
                    phi
                }
                _ => lo,
            };
            if start < hi {
                // Input positions start·w.. as the rows of a (positions × cin) operand.
                let xt = View {
                    data: &x[start * w..],
                    rows: (hi - start) * w,
                    cols: s.cin,
                    row_stride: 1,
                    col_stride: hw,
                };
                let dst = &mut bufs.cur[(start - lo) * w * mid..];
                match self.packed.as_deref() {
                    Some((pe, _)) => pe.expand(dst, mid, &x[start * w..], hw, (hi - start) * w)?,
                    None => we.matmul_transposed(dst, mid, xt, Threads::One)?,
                }
            }
            let band_out = (or1 - or0) * g.ow;
            bufs.a2.resize(band_out * mid, 0.0);
            self.depthwise_channels_last(&gb, n0, &bufs.cur, &mut bufs.a2);
            match self.packed.as_deref() {
                Some((_, pp)) => {
                    pp.project(&mut out[or0 * g.ow..], g.oh * g.ow, &bufs.a2, mid, band_out)?;
                    self.project_norm(x, out, or0, or1);
                }
                None => self.project_band(x, out, or0, or1, View::transposed(&bufs.a2, band_out, mid))?,
            }
            std::mem::swap(&mut bufs.prev, &mut bufs.cur);
            held = Some((lo, hi));
            or0 = or1;
        }
        Ok(())
    }

    /// One image of a channels-last block, whole (no bands), its work split between the threads at
    /// each stage: the expansion by positions, the depthwise stage by output rows, the projection by
    /// blocks of 16 output channels. For one-image latency, with the packed FP32 kernels.
    fn image_split(
        &self,
        x: &[f32],
        out: &mut [f32],
        n0: &Norm,
        (pe, pp): &(PackedF32, PackedF32),
        bufs: &mut Bufs,
    ) -> candle_core::Result<()> {
        let (s, g) = (&self.spec, &self.geom);
        let (mid, w, hw, ohw) = (s.mid, g.w, g.h * g.w, g.oh * g.ow);
        let threads = rayon::current_num_threads().max(1);
        bufs.cur.resize(hw * mid, 0.0);
        let per = hw.div_ceil(threads);
        bufs.cur
            .par_chunks_mut(per * mid)
            .enumerate()
            .try_for_each(|(i, c)| pe.expand(c, mid, &x[i * per..], hw, c.len() / mid))?;
        bufs.a2.resize(ohw * mid, 0.0);
        let y1 = &bufs.cur;
        let rows = g.oh.div_ceil(threads);
        bufs.a2
            .par_chunks_mut(rows * g.ow * mid)
            .enumerate()
            .try_for_each(|(i, a2)| -> candle_core::Result<()> {
                let or0 = i * rows;
                let (gb, lo, _) = g.band(mid, or0, or0 + a2.len() / (g.ow * mid))?;
                self.depthwise_channels_last(&gb, n0, &y1[lo * w * mid..], a2);
                Ok(())
            })?;
        let a2 = &bufs.a2;
        let blocks = pp.blocks().div_ceil(threads) * GROUP;
        out.par_chunks_mut(blocks * ohw)
            .enumerate()
            .try_for_each(|(i, o)| -> candle_core::Result<()> {
                let co0 = i * blocks;
                pp.project_planes(o, ohw, co0..co0 + o.len() / ohw, a2, mid, ohw)?;
                self.norm_planes(x, o, co0, 0, g.oh);
                Ok(())
            })
    }

    /// The channels-last depthwise stage of the band `gb`: each group of [`GROUP`] channels of the
    /// expanded rows `y1` (position by position, `mid` values each, from the band's first input
    /// row) through BN0 + ReLU6 into the interleaved scratch, then the filter with BN1 + ReLU6 into
    /// `a2` (the band's output positions, `mid` values each).
    fn depthwise_channels_last(&self, gb: &Geometry, n0: &Norm, y1: &[f32], a2: &mut [f32]) {
        let (mid, kk, n1) = (self.spec.mid, self.spec.kernel * self.spec.kernel, self.norms[0]);
        with_scratch(&SCRATCH, gb.group_scratch_len(), |q| {
            simd(
                #[inline(always)]
                || {
                    for c0 in (0..mid).step_by(GROUP) {
                        fill_group_channels_last(gb, n0, c0, &y1[c0..], mid, q);
                        convolve_group_bn_channels_last(
                            gb,
                            q,
                            &self.filters[c0 * kk..(c0 + GROUP) * kk],
                            &mut a2[c0..],
                            mid,
                            n1,
                            c0,
                        );
                    }
                },
            )
        });
    }

    /// The depthwise stage of one band into `a2` (`mid` planes of `rows × ow`, resized): each
    /// input plane (the band's rows, at the start of `plane(c)`; for narrow planes the next ones
    /// follow it) through BN0 + ReLU6 when given, then the filter with BN1 + ReLU6 on the way out.
    fn depthwise<'x>(
        &self,
        gb: &Geometry,
        plane: impl Fn(usize) -> &'x [f32],
        n0: Option<&Norm>,
        rows: usize,
        a2: &mut Vec<f32>,
    ) {
        let (mid, kk, n1) = (self.spec.mid, self.spec.kernel * self.spec.kernel, self.norms[0]);
        let band_out = rows * gb.ow;
        a2.resize(mid * band_out, 0.0);
        if gb.grouped() {
            let planes = gb.h * gb.w;
            return with_scratch(&SCRATCH, gb.group_scratch_len(), |q| {
                simd(
                    #[inline(always)]
                    || {
                        for c0 in (0..mid).step_by(GROUP) {
                            // The group's planes lie one after another in the source.
                            fill_group(gb, n0, c0, &plane(c0)[..GROUP * planes], q);
                            convolve_group_bn(
                                gb,
                                q,
                                &self.filters[c0 * kk..(c0 + GROUP) * kk],
                                &mut a2[c0 * band_out..(c0 + GROUP) * band_out],
                                Some(n1),
                                c0,
                            );
                        }
                    },
                )
            });
        }
        with_scratch(&SCRATCH, gb.scratch_len(), |p| {
            simd(
                #[inline(always)]
                || {
                    for c in 0..mid {
                        fill_plane(gb, n0, c, &plane(c)[..gb.h * gb.w], p);
                        convolve_plane_bn(
                            gb,
                            p,
                            &self.filters[c * kk..][..kk],
                            &mut a2[c * band_out..][..band_out],
                            Some(n1),
                            c,
                        );
                    }
                },
            )
        });
    }

    /// The projection of a band's depthwise output `a2` (`mid × (or1 − or0)·ow`) into output rows
    /// `or0..or1` of every plane of `out`, then BN2 (+ the input `x` when the block has the skip)
    /// in place.
    fn project_band(
        &self,
        x: &[f32],
        out: &mut [f32],
        or0: usize,
        or1: usize,
        a2: View<'_>,
    ) -> candle_core::Result<()> {
        let (ow, ohw) = (self.geom.ow, self.geom.oh * self.geom.ow);
        self.project
            .matmul(&mut out[or0 * ow..], ohw, a2, false, Threads::One)?;
        self.project_norm(x, out, or0, or1);
        Ok(())
    }

    /// BN2 (+ the input `x` when the block has the skip) in place on output rows `or0..or1` of
    /// every plane of `out`, once the projection has written them.
    fn project_norm(&self, x: &[f32], out: &mut [f32], or0: usize, or1: usize) {
        self.norm_planes(x, out, 0, or0, or1);
    }

    /// [`Banded::project_norm`] on the whole planes `out` holds, the first of them output channel
    /// `co0`.
    fn norm_planes(&self, x: &[f32], out: &mut [f32], co0: usize, or0: usize, or1: usize) {
        let (s, g) = (&self.spec, &self.geom);
        let (ow, hw, ohw) = (g.ow, g.h * g.w, g.oh * g.ow);
        let band_out = (or1 - or0) * ow;
        let planes = out.len() / ohw;
        let (skip, n2) = (s.skip(), self.norms[1]);
        simd(
            #[inline(always)]
            || {
                for (j, co) in (co0..s.cout).take(planes).enumerate() {
                    let o = &mut out[j * ohw + or0 * ow..][..band_out];
                    // With the skip (stride 1, cin = cout) the input plane has the output's shape.
                    let xs = skip.then(|| &x[co * hw + or0 * ow..][..band_out]);
                    bn_out(o, None, xs, n2.scale[co], n2.shift[co]);
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::depthwise::{DepthwiseSpec, Padding};

    #[test]
    fn bands_cover_the_output_and_read_the_rows_they_need() {
        for (h, k, s) in [(9, 3, 1), (9, 3, 2), (10, 5, 2), (7, 5, 1), (1, 3, 1), (2, 5, 2)] {
            let spec = DepthwiseSpec {
                kernel: k,
                stride: s,
                padding: Padding::same(h, 4, k, s),
            };
            let g = Geometry::of(&spec, 1, 2, h, 4).unwrap();
            for rows in 1..=g.oh {
                let mut or0 = 0;
                while or0 < g.oh {
                    let or1 = (or0 + rows).min(g.oh);
                    let (gb, lo, hi) = g.band(2, or0, or1).unwrap();
                    assert_eq!(
                        (gb.oh, gb.ow),
                        (or1 - or0, g.ow),
                        "h {h} k {k} s {s} rows {or0}..{or1}"
                    );
                    let top = spec.padding.top;
                    // The first and last input rows a window of the band touches, clamped.
                    let want_lo = (or0 * s).saturating_sub(top);
                    let want_hi = ((or1 - 1) * s + k - top).min(h);
                    assert_eq!(
                        (lo, hi),
                        (want_lo, want_hi),
                        "h {h} k {k} s {s} rows {or0}..{or1}"
                    );
                    or0 = or1;
                }
            }
            assert!(g.band(2, 0, g.oh + 1).is_err());
            assert!(g.band(2, 1, 1).is_err());
        }
    }

    /// Deterministic values in `[lo, hi)`.
    fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((state >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    /// The banded pass with bands of one row, a few rows and the whole image against the composition
    /// of candle's own ops, on odd sizes, both strides and kernels, with and without the skip; and
    /// with BF16 products against the whole-batch pass in BF16.
    #[test]
    fn banded_pass_matches_the_whole_batch_pass() {
        use crate::mbconv::MbConvOp;
        use crate::{Kernels, Precision};
        use candle_core::{Device, Tensor};
        use std::sync::{Arc, Mutex};

        let shapes = [
            // (b, cin, expansion, cout, k, s, h, w)
            (2, 3, 6, 5, 3, 2, 13, 35),
            (1, 4, 3, 4, 3, 1, 9, 33),
            (3, 2, 6, 2, 5, 1, 8, 20),
            (2, 5, 2, 7, 5, 2, 11, 37),
            (1, 3, 4, 3, 5, 1, 1, 17),
            // No expansion: the depthwise stage reads the input.
            (2, 4, 1, 4, 3, 1, 10, 21),
            (1, 3, 1, 5, 5, 2, 9, 19),
            // Narrow planes in whole groups of channels: the channel-interleaved path.
            (2, 8, 2, 8, 3, 1, 6, 7),
            (2, 16, 6, 24, 5, 2, 9, 11),
            (3, 16, 1, 16, 3, 1, 5, 9),
            // Wide planes expanded to whole groups of channels: channels-last, band by band.
            (2, 8, 2, 8, 3, 1, 9, 40),
            (2, 16, 3, 24, 5, 2, 11, 37),
            // One image, narrow and wide planes, stride 2.
            (1, 16, 6, 24, 3, 1, 9, 11),
            (1, 8, 2, 16, 5, 2, 13, 9),
        ];
        for (i, &(b, cin, e, cout, k, s, h, w)) in shapes.iter().enumerate() {
            let spec = MbConvSpec {
                cin,
                mid: cin * e,
                cout,
                kernel: k,
                stride: s,
                expand: e != 1,
                eps: 1e-3,
            };
            let lay = spec.layout();
            let seed = i as u64 * 7 + 1;
            let x = values(b * cin * h * w, seed, -1.0, 2.0);
            let mut params = values(lay.len, seed + 1, -0.6, 0.6);
            for (g, bt) in lay.bn0.iter().cloned().chain([lay.bn1.clone(), lay.bn2.clone()]) {
                params[g.clone()].copy_from_slice(&values(g.len(), seed + 2, 0.5, 1.5));
                params[bt.clone()].copy_from_slice(&values(bt.len(), seed + 3, -0.5, 0.5));
            }
            let widths = if spec.expand {
                vec![spec.mid, spec.mid, cout]
            } else {
                vec![spec.mid, cout]
            };
            let running: crate::BlockStats = widths
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    (
                        values(n, seed + 4 + j as u64, -0.3, 0.3),
                        values(n, seed + 8 + j as u64, 0.5, 1.5),
                    )
                })
                .collect();
            let dev = Device::Cpu;
            let xt = Tensor::from_vec(x.clone(), (b, cin, h, w), &dev).unwrap();
            let pt = Tensor::from_vec(params.clone(), lay.len, &dev).unwrap();
            let dspec = DepthwiseSpec {
                kernel: k,
                stride: s,
                padding: Padding::same(h, w, k, s),
            };
            let g = Geometry::of(&dspec, b, spec.mid, h, w).unwrap();
            for (precision, kernels, tol) in [
                (Precision::Fp32, Kernels::Reference, 1e-4f32),
                (Precision::Bf16, Kernels::Bf16, 2e-3),
            ] {
                let want = crate::mbconv(&xt, &pt, spec, Some(running.clone()), kernels)
                    .unwrap()
                    .0
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let op = || {
                    MbConvOp::new(
                        spec,
                        Some(running.clone()),
                        Arc::new(Mutex::new(Vec::new())),
                        precision,
                        false,
                        None,
                    )
                };
                // FP32 also with the gemm crate's products where the packed kernels run.
                let ops: Vec<MbConvOp> = match precision {
                    Precision::Fp32 => vec![op(), op().without_packed_fp32()],
                    Precision::Bf16 => vec![op()],
                };
                for (rows, op) in [1, 2, 3, h]
                    .into_iter()
                    .flat_map(|r| ops.iter().map(move |op| (r, op)))
                {
                    let bytes = ((rows - 1) * s + k) * w * spec.mid * 4;
                    let got = op.banded(&x, &params, b, &g, bytes).unwrap();
                    assert_eq!(got.len(), want.len());
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(a, r)| (a - r).abs() / (1.0 + r.abs()))
                        .fold(0.0f32, f32::max);
                    assert!(
                        worst <= tol,
                        "shape {i} {precision:?}, {rows} rows per band: off by {worst} (relative)"
                    );
                }
            }
        }
    }

    #[test]
    fn band_rows_fit_the_budget() {
        let spec = DepthwiseSpec {
            kernel: 3,
            stride: 2,
            padding: Padding::same(112, 112, 3, 2),
        };
        let g = Geometry::of(&spec, 1, 96, 112, 112).unwrap();
        let rows = band_rows(&g, 2, 96, BAND_BYTES);
        let rows_in = (rows - 1) * 2 + 3;
        assert!(rows_in * 112 * 96 * 4 <= BAND_BYTES, "{rows} rows");
        assert!((rows_in + 2) * 112 * 96 * 4 > BAND_BYTES, "{rows} rows");
        assert_eq!(band_rows(&g, 2, 96, 1), 1);
        assert_eq!(band_rows(&g, 2, 96, usize::MAX / 2), g.oh);
    }
}
