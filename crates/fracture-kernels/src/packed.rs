//! FP32 products of the channels-last inference blocks (`banded.rs`) against a weight matrix packed
//! once per block call, on AVX-512 or AVX2 with FMA (the third module with `unsafe`: processor
//! intrinsics, used only after runtime detection; elsewhere [`PackedF32::new`] says `None` and the
//! caller keeps the `gemm` crate's product).
//!
//! The `gemm` crate packs both operands of every product, and in these blocks the operand it packs
//! on every call is the activations: the planar input of the expansion and the channels-last
//! depthwise output the projection reads. Here only the weights are packed (blocks of 16 output
//! channels, each `k × 16`, zero-padded), and the activations are read where they lie, one value
//! broadcast against 16 output channels at a time:
//!
//! - [`PackedF32::expand`]: `dst (p × rows) = xᵀ · Wᵀ` with `x` planar (`k` rows of `p`
//!   positions), so each position's output channels come out side by side (channels-last), as the
//!   depthwise stage reads them;
//! - [`PackedF32::project`]: `dst (rows × p) = W · aᵀ` with `a` channels-last (`p` rows of `k`),
//!   each tile of positions × 16 channels transposed on its way out, so the output is planar. The
//!   tile transposed is `rows × 14` (AVX-512; `rows × 6` on AVX2), a sixth of the `k × 14` values
//!   the `gemm` crate moves when it packs `a` (the blocks expand six times).
//!
//! The same packed weights serve both instruction sets: AVX-512 holds a block of 16 channels in one
//! register, AVX2 in two halves of 8 (tiles of 6 positions × 16 channels there: 12 accumulators,
//! two weight halves and a broadcast in its 16 registers).
//!
//! `FRACTURE_FP32_KERNEL=gemm` turns these kernels off (to compare, or should one misbehave).
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::MbConvSpec;

/// Output channels per packed block: one 512-bit vector of f32 (two 256-bit ones on AVX2).
const LANES: usize = 16;

/// The instruction set a [`PackedF32`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX-512F: tiles of 14 positions × 32 channels.
    Avx512,
    /// AVX2 with FMA (processors without AVX-512, such as AMD's Zen 3): tiles of 6 positions × 16
    /// channels.
    Avx2,
}

impl Isa {
    /// Every instruction set of the packed kernels this processor runs, fastest first.
    fn detected() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    fn supported(self) -> bool {
        match self {
            Isa::Avx512 => avx512::supported(),
            Isa::Avx2 => avx2::supported(),
        }
    }
}

/// The instruction set the packed kernels run on in this process: the fastest one detected, none
/// where `FRACTURE_FP32_KERNEL` is `gemm` or the processor has neither AVX-512F nor AVX2 with FMA.
/// Decided once.
fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let off = std::env::var("FRACTURE_FP32_KERNEL").is_ok_and(|v| v.trim().eq_ignore_ascii_case("gemm"));
        if off {
            None
        } else {
            Isa::detected().first().copied()
        }
    })
}

/// Whether the packed kernels run in this process (see [`isa`]).
pub(crate) fn available() -> bool {
    isa().is_some()
}

/// A weight matrix `W (rows × k)` packed for the kernels of one instruction set: `rows` padded to
/// whole blocks of [`LANES`], block `b` holding `W[16b + j][q]` at `(b·k + q)·16 + j`.
#[derive(Debug)]
pub(crate) struct PackedF32 {
    w: Vec<f32>,
    rows: usize,
    k: usize,
    isa: Isa,
}

impl PackedF32 {
    /// Packs `w`, row-major `rows × k`; `None` where the kernels do not run ([`available`]), or
    /// for an empty matrix or a slice of the wrong length.
    pub(crate) fn new(w: &[f32], rows: usize, k: usize) -> Option<Self> {
        Self::pack(w, rows, k, isa()?)
    }

    /// The expansion and projection weights of an inverted bottleneck's flat `params` (laid out
    /// as [`MbConvSpec::layout`] says), packed: `None` for a block without expansion or where the
    /// kernels do not run.
    pub(crate) fn block(params: &[f32], spec: MbConvSpec) -> Option<(Self, Self)> {
        let lay = spec.layout();
        let we = lay.expand.as_ref()?;
        Some((
            Self::new(params.get(we.clone())?, spec.mid, spec.cin)?,
            Self::new(params.get(lay.project.clone())?, spec.cout, spec.mid)?,
        ))
    }

    /// `w` packed for the kernels of `isa` (which the caller has seen this processor run).
    fn pack(w: &[f32], rows: usize, k: usize, isa: Isa) -> Option<Self> {
        if rows == 0 || k == 0 || w.len() != rows * k {
            return None;
        }
        let mut packed = vec![0.0; rows.div_ceil(LANES) * k * LANES];
        for (r, row) in w.chunks_exact(k).enumerate() {
            let (b, j) = (r / LANES, r % LANES);
            for (q, &v) in row.iter().enumerate() {
                packed[(b * k + q) * LANES + j] = v;
            }
        }
        Some(PackedF32 {
            w: packed,
            rows,
            k,
            isa,
        })
    }

    /// `dst (p × rows, row stride ds) = xᵀ · Wᵀ`, overwritten: `x` holds the `k` input channels of
    /// `p` positions planar, channel `q`'s at `x[q·xs..q·xs + p]`. An error when a slice is too
    /// short for its shape or `ds < rows`.
    pub(crate) fn expand(
        &self,
        dst: &mut [f32],
        ds: usize,
        x: &[f32],
        xs: usize,
        p: usize,
    ) -> candle_core::Result<()> {
        let (rows, k) = (self.rows, self.k);
        if p == 0 {
            return Ok(());
        }
        if ds < rows || (p - 1) * ds + rows > dst.len() || (k - 1) * xs + p > x.len() {
            candle_core::bail!(
                "packed expansion: {p} positions of {k} channels (stride {xs}, {} values) into {rows} \
                 (stride {ds}, {} values) do not fit",
                x.len(),
                dst.len()
            );
        }
        let (w, dst, x) = (&self.w[..], dst.as_mut_ptr(), x.as_ptr());
        // SAFETY: `self.isa` was detected on this processor (`new`, or a test after `detected`);
        // the checks above keep every read of `x` below `(k − 1)·xs + p` and every write below
        // `(p − 1)·ds + rows`.
        unsafe {
            match self.isa {
                Isa::Avx512 => avx512::expand(w, rows, k, dst, ds, x, xs, p),
                Isa::Avx2 => avx2::expand(w, rows, k, dst, ds, x, xs, p),
            }
        }
        Ok(())
    }

    /// How many blocks of 16 rows the packed matrix has.
    pub(crate) fn blocks(&self) -> usize {
        self.rows.div_ceil(LANES)
    }

    /// `dst (rows × p, row stride ds) = W · aᵀ`, overwritten: `a` holds `p` positions of `k`
    /// channels each (channels-last, row stride `a_s`). An error when a slice is too short for its
    /// shape or `ds < p`.
    pub(crate) fn project(
        &self,
        dst: &mut [f32],
        ds: usize,
        a: &[f32],
        a_s: usize,
        p: usize,
    ) -> candle_core::Result<()> {
        self.project_planes(dst, ds, 0..self.rows, a, a_s, p)
    }

    /// [`PackedF32::project`] for rows `planes` of `W` only (`planes.start` a multiple of 16), into
    /// `dst` holding just those rows: one thread's share of a projection split by output channels.
    pub(crate) fn project_planes(
        &self,
        dst: &mut [f32],
        ds: usize,
        planes: std::ops::Range<usize>,
        a: &[f32],
        a_s: usize,
        p: usize,
    ) -> candle_core::Result<()> {
        let k = self.k;
        if p == 0 || planes.is_empty() {
            return Ok(());
        }
        if !planes.start.is_multiple_of(LANES) || planes.end > self.rows {
            candle_core::bail!(
                "packed projection: planes {planes:?} of {} do not start a block of {LANES}",
                self.rows
            );
        }
        let (first, rows) = (planes.start / LANES, planes.len());
        if ds < p || (rows - 1) * ds + p > dst.len() || (p - 1) * a_s + k > a.len() {
            candle_core::bail!(
                "packed projection: {p} positions of {k} channels (stride {a_s}, {} values) into {rows} \
                 planes (stride {ds}, {} values) do not fit",
                a.len(),
                dst.len()
            );
        }
        let w = &self.w[first * k * LANES..];
        let (dst, a) = (dst.as_mut_ptr(), a.as_ptr());
        // SAFETY: as for `expand`: `self.isa` was detected, reads stay below `(p − 1)·a_s + k` and
        // writes below `(rows − 1)·ds + p`; the packed blocks from `first` hold those `rows`.
        unsafe {
            match self.isa {
                Isa::Avx512 => avx512::project(w, rows, k, dst, ds, a, a_s, p),
                Isa::Avx2 => avx2::project(w, rows, k, dst, ds, a, a_s, p),
            }
        }
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// Positions per tile: 14 positions × 2 blocks are 28 accumulators, with the two weight vectors
    /// and a broadcast value 31 of the 32 vector registers.
    const MR: usize = 14;

    pub(super) fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// The lanes of a block with `valid` rows (all when 16 or more).
    fn mask(valid: usize) -> __mmask16 {
        if valid >= LANES {
            0xffff
        } else {
            (1u16 << valid) - 1
        }
    }

    /// Runs `$tile::<MR, $nv>` for the tile's `$mr` positions (1..=14).
    macro_rules! by_positions {
        ($mr:expr, $nv:literal, $tile:ident($($arg:expr),*)) => {
            match $mr {
                1 => $tile::<1, $nv>($($arg),*),
                2 => $tile::<2, $nv>($($arg),*),
                3 => $tile::<3, $nv>($($arg),*),
                4 => $tile::<4, $nv>($($arg),*),
                5 => $tile::<5, $nv>($($arg),*),
                6 => $tile::<6, $nv>($($arg),*),
                7 => $tile::<7, $nv>($($arg),*),
                8 => $tile::<8, $nv>($($arg),*),
                9 => $tile::<9, $nv>($($arg),*),
                10 => $tile::<10, $nv>($($arg),*),
                11 => $tile::<11, $nv>($($arg),*),
                12 => $tile::<12, $nv>($($arg),*),
                13 => $tile::<13, $nv>($($arg),*),
                _ => $tile::<14, $nv>($($arg),*),
            }
        };
    }

    /// [`super::PackedF32::expand`]: tiles of 14 positions × 32 output channels (16 at the last
    /// odd block), all `k` in one pass.
    ///
    /// # Safety
    /// AVX-512F must be available; `w` must hold `rows.div_ceil(16)` blocks of `k × 16`; `x` must
    /// be readable at `q·xs + i` for `q < k`, `i < p`, and `dst` writable at `i·ds + r` for
    /// `i < p`, `r < rows`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn expand(
        w: &[f32],
        rows: usize,
        k: usize,
        dst: *mut f32,
        ds: usize,
        x: *const f32,
        xs: usize,
        p: usize,
    ) {
        let blocks = rows.div_ceil(LANES);
        let mut p0 = 0;
        while p0 < p {
            let mr = (p - p0).min(MR);
            let mut b = 0;
            while b < blocks {
                let masks = [mask(rows - b * LANES), mask(rows.saturating_sub((b + 1) * LANES))];
                let wb = w.as_ptr().wrapping_add(b * k * LANES);
                let (xt, out) = (x.wrapping_add(p0), dst.wrapping_add(p0 * ds + b * LANES));
                // SAFETY: blocks b (and b + 1) are in `w`; positions p0..p0 + mr < p and output
                // channels 16b.. (masked to `rows`) are in bounds per the function's contract.
                unsafe {
                    if b + 1 < blocks {
                        by_positions!(mr, 2, expand_tile(wb, k, xt, xs, out, ds, masks));
                        b += 2;
                    } else {
                        by_positions!(mr, 1, expand_tile(wb, k, xt, xs, out, ds, masks));
                        b += 1;
                    }
                }
            }
            p0 += mr;
        }
    }

    /// `M` positions × `NV` blocks of the expansion: per input channel, `NV` weight vectors and
    /// `M` broadcast inputs; each position's channels stored under the blocks' masks.
    ///
    /// # Safety
    /// As for [`expand`], for this tile.
    // Indexed loops over constant bounds: unrolled, with every accumulator in a register.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn expand_tile<const M: usize, const NV: usize>(
        w: *const f32,
        k: usize,
        x: *const f32,
        xs: usize,
        out: *mut f32,
        ds: usize,
        masks: [__mmask16; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); M]; NV];
        for q in 0..k {
            // SAFETY: per the contract, `NV` blocks of `k × 16` at `w` and inputs `q·xs + i`.
            unsafe {
                let wv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(w.add((v * k + q) * LANES)));
                let xq = x.add(q * xs);
                for i in 0..M {
                    let s = _mm512_set1_ps(*xq.add(i));
                    for v in 0..NV {
                        acc[v][i] = _mm512_fmadd_ps(s, wv[v], acc[v][i]);
                    }
                }
            }
        }
        for i in 0..M {
            for v in 0..NV {
                // SAFETY: row i of the output, the block's lanes masked to the valid channels.
                unsafe { _mm512_mask_storeu_ps(out.add(i * ds + v * LANES), masks[v], acc[v][i]) };
            }
        }
    }

    /// [`super::PackedF32::project`]: tiles of 14 positions × 32 output channels (16 at the last
    /// odd block), all `k` in one pass, each block's 16 × 14 sums transposed on the way out.
    ///
    /// # Safety
    /// AVX-512F must be available; `w` as for [`expand`]; `a` must be readable at `i·a_s + q` for
    /// `i < p`, `q < k`, and `dst` writable at `r·ds + i` for `r < rows`, `i < p`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn project(
        w: &[f32],
        rows: usize,
        k: usize,
        dst: *mut f32,
        ds: usize,
        a: *const f32,
        a_s: usize,
        p: usize,
    ) {
        let blocks = rows.div_ceil(LANES);
        let mut p0 = 0;
        while p0 < p {
            let mr = (p - p0).min(MR);
            let mut b = 0;
            while b < blocks {
                let valid = [
                    (rows - b * LANES).min(LANES),
                    rows.saturating_sub((b + 1) * LANES).min(LANES),
                ];
                let wb = w.as_ptr().wrapping_add(b * k * LANES);
                let (at, out) = (a.wrapping_add(p0 * a_s), dst.wrapping_add(b * LANES * ds + p0));
                // SAFETY: as in `expand`, with the roles of positions and channels in the output
                // swapped.
                unsafe {
                    if b + 1 < blocks {
                        by_positions!(mr, 2, project_tile(wb, k, at, a_s, out, ds, valid));
                        b += 2;
                    } else {
                        by_positions!(mr, 1, project_tile(wb, k, at, a_s, out, ds, valid));
                        b += 1;
                    }
                }
            }
            p0 += mr;
        }
    }

    /// `M` positions × `NV` blocks of the projection; each block's accumulators (one per position,
    /// 16 channels each) transposed into 16 vectors of `M` positions, stored to the planes of the
    /// block's `valid` channels.
    ///
    /// # Safety
    /// As for [`project`], for this tile.
    // Indexed loops over constant bounds: unrolled, with every accumulator in a register.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn project_tile<const M: usize, const NV: usize>(
        w: *const f32,
        k: usize,
        a: *const f32,
        a_s: usize,
        out: *mut f32,
        ds: usize,
        valid: [usize; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); M]; NV];
        for q in 0..k {
            // SAFETY: per the contract, `NV` blocks of `k × 16` at `w` and inputs `i·a_s + q`.
            unsafe {
                let wv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(w.add((v * k + q) * LANES)));
                for i in 0..M {
                    let s = _mm512_set1_ps(*a.add(i * a_s + q));
                    for v in 0..NV {
                        acc[v][i] = _mm512_fmadd_ps(s, wv[v], acc[v][i]);
                    }
                }
            }
        }
        let positions = mask(M);
        for (v, sums) in acc.iter().enumerate() {
            let mut t = [_mm512_setzero_ps(); LANES];
            t[..M].copy_from_slice(sums);
            transpose(&mut t);
            for (o, row) in t.iter().enumerate().take(valid[v]) {
                // SAFETY: plane 16v + o < rows of the output, positions masked to the tile's M.
                unsafe { _mm512_mask_storeu_ps(out.add((v * LANES + o) * ds), positions, *row) };
            }
        }
    }

    /// Transposes a 16 × 16 matrix held as 16 row vectors: for each bit `s` of the index (8, 4, 2,
    /// 1), rows `i` and `i + s` (bit `s` of `i` clear) swap their off-diagonal halves of every
    /// `2s`-wide column pair, which exchanges bit `s` of the row and column indices of every value.
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose(r: &mut [__m512; LANES]) {
        for s in [8usize, 4, 2, 1] {
            // Lane j of the first output: a[j] where bit s of j is clear, else b[j − s]; of the
            // second: a[j + s] where it is clear, else b[j] (indices ≥ 16 pick from b).
            let lo: [i32; 16] =
                std::array::from_fn(|j| if j & s == 0 { j as i32 } else { (16 + j - s) as i32 });
            let hi: [i32; 16] = std::array::from_fn(|j| {
                if j & s == 0 {
                    (j + s) as i32
                } else {
                    (16 + j) as i32
                }
            });
            // SAFETY: unaligned loads from two local 16-lane arrays.
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_si512(lo.as_ptr().cast()),
                    _mm512_loadu_si512(hi.as_ptr().cast()),
                )
            };
            for i in 0..LANES {
                if i & s == 0 {
                    let (x, y) = (r[i], r[i + s]);
                    r[i] = _mm512_permutex2var_ps(x, lo, y);
                    r[i + s] = _mm512_permutex2var_ps(x, hi, y);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// Positions per tile: 6 positions × 2 halves of a block are 12 accumulators, with the two
    /// weight halves and a broadcast value 15 of the 16 vector registers.
    const MR: usize = 6;

    /// Lanes of one 256-bit vector of f32: half a packed block.
    const HALF: usize = 8;

    pub(super) fn supported() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Runs `$tile::<M>` for the tile's `$mr` positions (1..=6).
    macro_rules! by_positions {
        ($mr:expr, $tile:ident($($arg:expr),*)) => {
            match $mr {
                1 => $tile::<1>($($arg),*),
                2 => $tile::<2>($($arg),*),
                3 => $tile::<3>($($arg),*),
                4 => $tile::<4>($($arg),*),
                5 => $tile::<5>($($arg),*),
                _ => $tile::<6>($($arg),*),
            }
        };
    }

    /// The `M × 16` sums of a tile: per input channel, the block's two weight halves and `M`
    /// broadcast inputs, the input of position `i` and channel `q` read at `a(i, q)`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `w` must hold a block of `k × 16` and `a(i, q)` be readable
    /// for `i < M`, `q < k`.
    // Indexed loops over constant bounds: unrolled, with every accumulator in a register.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_sums<const M: usize>(
        w: *const f32,
        k: usize,
        a: impl Fn(usize, usize) -> *const f32,
    ) -> [[__m256; M]; 2] {
        // SAFETY: reads as the contract says.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); M]; 2];
            for q in 0..k {
                let w0 = _mm256_loadu_ps(w.add(q * LANES));
                let w1 = _mm256_loadu_ps(w.add(q * LANES + HALF));
                for i in 0..M {
                    let s = _mm256_broadcast_ss(&*a(i, q));
                    acc[0][i] = _mm256_fmadd_ps(s, w0, acc[0][i]);
                    acc[1][i] = _mm256_fmadd_ps(s, w1, acc[1][i]);
                }
            }
            acc
        }
    }

    /// [`super::PackedF32::expand`]: tiles of 6 positions × 16 output channels, all `k` in one
    /// pass.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `w` must hold `rows.div_ceil(16)` blocks of `k × 16`; `x`
    /// must be readable at `q·xs + i` for `q < k`, `i < p`, and `dst` writable at `i·ds + r` for
    /// `i < p`, `r < rows`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expand(
        w: &[f32],
        rows: usize,
        k: usize,
        dst: *mut f32,
        ds: usize,
        x: *const f32,
        xs: usize,
        p: usize,
    ) {
        tiles(p, rows, |p0, mr, b, valid| {
            let wb = w.as_ptr().wrapping_add(b * k * LANES);
            let (xt, out) = (x.wrapping_add(p0), dst.wrapping_add(p0 * ds + b * LANES));
            // SAFETY: block b is in `w`; positions p0..p0 + mr < p and output channels
            // 16b..16b + valid ≤ rows are in bounds per the function's contract.
            unsafe { by_positions!(mr, expand_tile(wb, k, xt, xs, out, ds, valid)) };
        });
    }

    /// Calls `tile(p0, mr, b, valid)` for every tile of `p` positions × `rows` output channels:
    /// positions `p0..p0 + mr` (at most [`MR`]) against block `b`, whose first `valid` channels
    /// (at most 16) are below `rows`.
    fn tiles(p: usize, rows: usize, mut tile: impl FnMut(usize, usize, usize, usize)) {
        let mut p0 = 0;
        while p0 < p {
            let mr = (p - p0).min(MR);
            for b in 0..rows.div_ceil(LANES) {
                tile(p0, mr, b, (rows - b * LANES).min(LANES));
            }
            p0 += mr;
        }
    }

    /// `M` positions × one block of the expansion, each position's `valid` channels stored.
    ///
    /// # Safety
    /// As for [`expand`], for this tile.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn expand_tile<const M: usize>(
        w: *const f32,
        k: usize,
        x: *const f32,
        xs: usize,
        out: *mut f32,
        ds: usize,
        valid: usize,
    ) {
        // SAFETY: inputs `q·xs + i` per the contract.
        let acc = unsafe { tile_sums::<M>(w, k, |i, q| x.add(q * xs + i)) };
        if valid == LANES {
            for (i, (lo, hi)) in acc[0].iter().zip(&acc[1]).enumerate() {
                // SAFETY: row i of the output, its 16 channels all below `rows`.
                unsafe {
                    _mm256_storeu_ps(out.add(i * ds), *lo);
                    _mm256_storeu_ps(out.add(i * ds + HALF), *hi);
                }
            }
        } else {
            let mut sums = [0.0f32; LANES];
            for (i, (lo, hi)) in acc[0].iter().zip(&acc[1]).enumerate() {
                // SAFETY: stores into the local array; then `valid` values to row i of the output.
                unsafe {
                    _mm256_storeu_ps(sums.as_mut_ptr(), *lo);
                    _mm256_storeu_ps(sums.as_mut_ptr().add(HALF), *hi);
                    std::ptr::copy_nonoverlapping(sums.as_ptr(), out.add(i * ds), valid);
                }
            }
        }
    }

    /// [`super::PackedF32::project`]: tiles of 6 positions × 16 output channels, all `k` in one
    /// pass, each tile's sums transposed through a local array on the way out.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `w` as for [`expand`]; `a` must be readable at `i·a_s + q`
    /// for `i < p`, `q < k`, and `dst` writable at `r·ds + i` for `r < rows`, `i < p`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn project(
        w: &[f32],
        rows: usize,
        k: usize,
        dst: *mut f32,
        ds: usize,
        a: *const f32,
        a_s: usize,
        p: usize,
    ) {
        tiles(p, rows, |p0, mr, b, valid| {
            let wb = w.as_ptr().wrapping_add(b * k * LANES);
            let (at, out) = (a.wrapping_add(p0 * a_s), dst.wrapping_add(b * LANES * ds + p0));
            // SAFETY: as in `expand`, with the roles of positions and channels in the output
            // swapped.
            unsafe { by_positions!(mr, project_tile(wb, k, at, a_s, out, ds, valid)) };
        });
    }

    /// `M` positions × one block of the projection, stored to the planes of the block's `valid`
    /// channels.
    ///
    /// # Safety
    /// As for [`project`], for this tile.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn project_tile<const M: usize>(
        w: *const f32,
        k: usize,
        a: *const f32,
        a_s: usize,
        out: *mut f32,
        ds: usize,
        valid: usize,
    ) {
        // SAFETY: inputs `i·a_s + q` per the contract.
        let acc = unsafe { tile_sums::<M>(w, k, |i, q| a.add(i * a_s + q)) };
        let mut sums = [[0.0f32; LANES]; M];
        for (row, (lo, hi)) in sums.iter_mut().zip(acc[0].iter().zip(&acc[1])) {
            // SAFETY: two stores of 8 lanes into a local row of 16.
            unsafe {
                _mm256_storeu_ps(row.as_mut_ptr(), *lo);
                _mm256_storeu_ps(row.as_mut_ptr().add(HALF), *hi);
            }
        }
        for o in 0..valid {
            for (i, row) in sums.iter().enumerate() {
                // SAFETY: plane o < valid of the block, position i < M of the tile.
                unsafe { *out.add(o * ds + i) = row[o] };
            }
        }
    }
}

/// Where the processor is not x86-64: no packed kernels ([`Isa::supported`] is false for both).
#[cfg(not(target_arch = "x86_64"))]
mod unsupported {
    pub(super) fn supported() -> bool {
        false
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn expand(
        _: &[f32],
        _: usize,
        _: usize,
        _: *mut f32,
        _: usize,
        _: *const f32,
        _: usize,
        _: usize,
    ) {
        unreachable!("PackedF32 is only made where its instruction set was detected")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn project(
        _: &[f32],
        _: usize,
        _: usize,
        _: *mut f32,
        _: usize,
        _: *const f32,
        _: usize,
        _: usize,
    ) {
        unreachable!("PackedF32 is only made where its instruction set was detected")
    }
}
#[cfg(not(target_arch = "x86_64"))]
use unsupported as avx2;
#[cfg(not(target_arch = "x86_64"))]
use unsupported as avx512;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 2 + 1) * 2_654_435_761 % 1009) as f32 / 1009.0) * 2.0 - 1.0)
            .collect()
    }

    /// Every shape class: rows in whole and partial blocks (odd and even block counts), positions in
    /// whole and partial tiles, strides wider than the operands.
    const SHAPES: [(usize, usize, usize); 9] = [
        (16, 16, 14),
        (96, 16, 200),
        (144, 24, 29),
        (24, 144, 31),
        (40, 240, 15),
        (112, 672, 1),
        (8, 5, 3),
        (320, 1152, 27),
        (48, 7, 13),
    ];

    /// The instruction sets to test on this processor: every one it runs (on an AVX-512 machine
    /// the AVX2 kernels too), after checking that without any nothing may be packed (callers then
    /// keep the gemm crate's product).
    fn instruction_sets() -> Vec<Isa> {
        let isas = Isa::detected();
        if isas.is_empty() || !available() {
            assert!(PackedF32::new(&values(32, 1), 4, 8).is_none());
        }
        isas
    }

    #[test]
    fn the_fastest_instruction_set_detected_is_chosen() {
        let detected = Isa::detected();
        let off = std::env::var("FRACTURE_FP32_KERNEL").is_ok_and(|v| v.trim().eq_ignore_ascii_case("gemm"));
        assert_eq!(isa(), if off { None } else { detected.first().copied() });
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            assert_eq!(detected, [Isa::Avx512, Isa::Avx2]);
        }
    }

    #[test]
    fn expansion_matches_a_naive_product() {
        for isa in instruction_sets() {
            expansion_case(isa);
        }
    }

    fn expansion_case(isa: Isa) {
        for &(rows, k, p) in &SHAPES {
            let w = values(rows * k, 1);
            let (xs, ds) = (p + 3, rows + 5);
            let x = values((k - 1) * xs + p, 2);
            let packed = PackedF32::pack(&w, rows, k, isa).unwrap();
            let mut dst = vec![7.0; (p - 1) * ds + rows + 2];
            packed.expand(&mut dst, ds, &x, xs, p).unwrap();
            for i in 0..p {
                for r in 0..rows {
                    let want: f32 = (0..k).map(|q| x[q * xs + i] * w[r * k + q]).sum();
                    let got = dst[i * ds + r];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{isa:?} {rows}×{k}×{p} at ({i}, {r}): {got} vs {want}"
                    );
                }
                // The gap between rows and the values past the last one are untouched.
                let end = if i + 1 < p { (i + 1) * ds } else { dst.len() };
                assert!(
                    dst[i * ds + rows..end].iter().all(|&v| v == 7.0),
                    "{isa:?} {rows}×{k}×{p}: wrote past row {i}"
                );
            }
        }
    }

    #[test]
    fn projection_matches_a_naive_product() {
        for isa in instruction_sets() {
            projection_case(isa);
        }
    }

    fn projection_case(isa: Isa) {
        for &(rows, k, p) in &SHAPES {
            let w = values(rows * k, 3);
            let (a_s, ds) = (k + 2, p + 4);
            let a = values((p - 1) * a_s + k, 4);
            let packed = PackedF32::pack(&w, rows, k, isa).unwrap();
            let mut dst = vec![7.0; (rows - 1) * ds + p + 3];
            packed.project(&mut dst, ds, &a, a_s, p).unwrap();
            for r in 0..rows {
                for i in 0..p {
                    let want: f32 = (0..k).map(|q| a[i * a_s + q] * w[r * k + q]).sum();
                    let got = dst[r * ds + i];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{isa:?} {rows}×{k}×{p} at ({r}, {i}): {got} vs {want}"
                    );
                }
                let end = if r + 1 < rows { (r + 1) * ds } else { dst.len() };
                assert!(
                    dst[r * ds + p..end].iter().all(|&v| v == 7.0),
                    "{isa:?} {rows}×{k}×{p}: wrote past plane {r}"
                );
            }
            // The planes from the second block on, into a destination holding only them: the
            // same values.
            if rows > LANES {
                let mut part = vec![7.0; (rows - LANES - 1) * ds + p];
                packed
                    .project_planes(&mut part, ds, LANES..rows, &a, a_s, p)
                    .unwrap();
                assert_eq!(part[..], dst[LANES * ds..LANES * ds + part.len()]);
                assert!(packed.project_planes(&mut part, ds, 8..rows, &a, a_s, p).is_err());
            }
        }
    }

    #[test]
    fn short_slices_are_errors_not_reads_past_the_end() {
        let w = values(32 * 8, 5);
        assert!(PackedF32::pack(&w, 32, 7, Isa::Avx2).is_none());
        assert!(PackedF32::pack(&w, 0, 8, Isa::Avx2).is_none());
        for isa in instruction_sets() {
            short_slices_case(PackedF32::pack(&w, 32, 8, isa).unwrap());
        }
    }

    fn short_slices_case(packed: PackedF32) {
        let mut dst = vec![0.0; 32 * 10];
        let x = values(8 * 10, 6);
        assert!(packed.expand(&mut dst, 32, &x, 10, 10).is_ok());
        assert!(packed.expand(&mut dst, 32, &x[..79], 10, 10).is_err());
        assert!(packed.expand(&mut dst[..319], 32, &x, 10, 10).is_err());
        assert!(packed.expand(&mut dst, 31, &x, 10, 10).is_err());
        let a = values(10 * 8, 7);
        assert!(packed.project(&mut dst, 10, &a, 8, 10).is_ok());
        assert!(packed.project(&mut dst, 10, &a[..79], 8, 10).is_err());
        assert!(packed.project(&mut dst, 9, &a, 8, 10).is_err());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_register_transpose_transposes() {
        use std::arch::x86_64::*;
        if !avx512::supported() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|v| v as f32).collect();
        // SAFETY: AVX-512F was detected just above; loads and stores of 16 lanes within `m` / `out`.
        unsafe {
            let mut r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(i * 16)));
            avx512::transpose(&mut r);
            let mut out = [0.0f32; 256];
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(i * 16), *v);
            }
            for i in 0..16 {
                for j in 0..16 {
                    assert_eq!(out[i * 16 + j], m[j * 16 + i]);
                }
            }
        }
    }
}
