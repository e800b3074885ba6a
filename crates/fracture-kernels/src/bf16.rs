//! Matrix products with BF16 operands and FP32 accumulation ([`super::Kernels::Bf16`]), the second
//! module with `unsafe` (processor intrinsics and AMX instructions), chosen at run time:
//!
//! | backend | when | how |
//! |---|---|---|
//! | [`Bf16Backend::Amx`] | the processor has AMX-BF16 and Linux grants the tile state | 16×16 FP32 tiles, each `tdpbf16ps` a 16×32 · 32×16 BF16 product |
//! | [`Bf16Backend::Avx512`] | AVX-512 BF16 without AMX | `vdpbf16ps`: 16 FP32 lanes, each adding two BF16 products |
//! | [`Bf16Backend::Fp32`] | neither | the FP32 product (nothing is rounded) |
//! | [`Bf16Backend::Emulated`] | only when asked for | operands rounded to BF16, then the FP32 product: the hardware's numbers at FP32 speed |
//!
//! Both operands are rounded to BF16 (to nearest, ties to even) while being packed: the left one
//! as rows of BF16 pairs along `k`, the right one as blocks of 16 columns, each row of a block the
//! 16 pairs `(B[2p][j], B[2p+1][j])` (the layout both instructions read). `k` is padded with zeros
//! to a multiple of 32 and rows to a multiple of 16, so the kernels have no edge cases; the FP32
//! result is added to (or written over) the destination afterwards, clipped to its shape.
//!
//! The environment variable `FRACTURE_BF16` (`amx`, `avx512`, `emulated` or `fp32`) forces a
//! backend; a hardware backend the processor lacks is refused with a message. Every hardware
//! backend is checked against [`Bf16Backend::Emulated`] once, on a small odd-shaped product,
//! before it is used: one that disagrees is not used, and [`bf16_status`] says why.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::gemm::{Threads, View, check_shapes, sgemm};

/// How the BF16 matrix products run on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bf16Backend {
    /// Intel AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 BF16 (`vdpbf16ps`).
    Avx512,
    /// Operands rounded to BF16, then multiplied by the FP32 kernel: the numbers of the hardware
    /// backends (up to the order of the FP32 sums) on any processor, at FP32 speed or below.
    Emulated,
    /// The FP32 product: what `bf16` means on a processor without BF16 instructions.
    Fp32,
}

impl Bf16Backend {
    /// Every backend, fastest first.
    pub const ALL: [Bf16Backend; 4] = [
        Bf16Backend::Amx,
        Bf16Backend::Avx512,
        Bf16Backend::Emulated,
        Bf16Backend::Fp32,
    ];

    /// The name `FRACTURE_BF16` takes and the run records.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Backend::Amx => "amx",
            Bf16Backend::Avx512 => "avx512",
            Bf16Backend::Emulated => "emulated",
            Bf16Backend::Fp32 => "fp32",
        }
    }

    /// Whether this processor (and, for AMX, the operating system) can run the backend.
    /// [`Bf16Backend::Emulated`] and [`Bf16Backend::Fp32`] run everywhere.
    pub fn is_supported(self) -> bool {
        match self {
            Bf16Backend::Amx => hw::amx_ready(),
            Bf16Backend::Avx512 => hw::avx512_bf16(),
            Bf16Backend::Emulated | Bf16Backend::Fp32 => true,
        }
    }

    /// The backends this machine can run, fastest first.
    pub fn available() -> Vec<Bf16Backend> {
        Self::ALL.into_iter().filter(|b| b.is_supported()).collect()
    }
}

impl std::fmt::Display for Bf16Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The backend [`super::Kernels::Bf16`] uses in this process, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bf16Status {
    /// The backend in use.
    pub backend: Bf16Backend,
    /// How it was chosen: forced by `FRACTURE_BF16`, the best the processor has, or the reason a
    /// faster one was passed over.
    pub reason: String,
}

/// The backend BF16 products use in this process (chosen once, on first use): `FRACTURE_BF16`
/// when set, else the fastest supported backend that agrees with [`Bf16Backend::Emulated`] on a
/// check product, else [`Bf16Backend::Fp32`].
pub fn bf16_status() -> &'static Bf16Status {
    static STATUS: OnceLock<Bf16Status> = OnceLock::new();
    STATUS.get_or_init(|| choose(std::env::var("FRACTURE_BF16").ok().as_deref(), self_check))
}

/// The backend of [`bf16_status`].
pub fn bf16_backend() -> Bf16Backend {
    bf16_status().backend
}

/// The choice behind [`bf16_status`], with the check passed in (so tests can fail it).
fn choose(forced: Option<&str>, check: impl Fn(Bf16Backend) -> Result<(), String>) -> Bf16Status {
    if let Some(name) = forced.map(str::trim).filter(|s| !s.is_empty()) {
        let wanted = Bf16Backend::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name));
        return match wanted {
            Some(b) if b.is_supported() => match check(b) {
                Ok(()) => Bf16Status {
                    backend: b,
                    reason: format!("FRACTURE_BF16={name}"),
                },
                Err(e) => Bf16Status {
                    backend: Bf16Backend::Fp32,
                    reason: format!("FRACTURE_BF16={name}, but its check failed ({e}): using fp32"),
                },
            },
            Some(b) => Bf16Status {
                backend: Bf16Backend::Fp32,
                reason: format!("FRACTURE_BF16={name}, but this processor cannot run {b}: using fp32"),
            },
            None => Bf16Status {
                backend: Bf16Backend::Fp32,
                reason: format!("FRACTURE_BF16={name} is not one of amx, avx512, emulated, fp32: using fp32"),
            },
        };
    }
    let mut passed_over = Vec::new();
    for b in [Bf16Backend::Amx, Bf16Backend::Avx512] {
        if !b.is_supported() {
            continue;
        }
        match check(b) {
            Ok(()) => {
                let reason = if passed_over.is_empty() {
                    "the fastest this processor has".to_string()
                } else {
                    passed_over.join("; ")
                };
                return Bf16Status { backend: b, reason };
            }
            Err(e) => passed_over.push(format!("{b} failed its check ({e})")),
        }
    }
    passed_over.push("no BF16 instructions usable here: products stay fp32".into());
    Bf16Status {
        backend: Bf16Backend::Fp32,
        reason: passed_over.join("; "),
    }
}

/// Runs `backend` on a deterministic odd-shaped product and compares it with the emulated one.
fn self_check(backend: Bf16Backend) -> Result<(), String> {
    let (m, k, n) = (37, 75, 45);
    let val = |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.0 - 1.0;
    let a: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect();
    let b: Vec<f32> = (0..k * n).map(|i| val(i, 2)).collect();
    let run = |be| -> Result<Vec<f32>, String> {
        let mut out = vec![0.0; m * n];
        gemm_with(
            &mut out,
            n,
            View::rows(&a, m, k),
            View::rows(&b, k, n),
            false,
            Threads::One,
            be,
        )
        .map_err(|e| e.to_string())?;
        Ok(out)
    };
    let (got, want) = (run(backend)?, run(Bf16Backend::Emulated)?);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    // Each sum has 75 terms of size ≤ 1: the order of FP32 additions moves it by ~1e-5.
    if worst <= 1e-3 {
        Ok(())
    } else {
        Err(format!("differs from the emulated product by up to {worst}"))
    }
}

/// f32 → BF16 bits, rounded to nearest with ties to even; NaN stays NaN.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest BF16 value, as f32.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(to_bf16(x)) << 16)
}

/// Pairs along `k` per packed row: `k` halved and padded to a multiple of 16 (one AMX tile row).
fn padded_pairs(k: usize) -> usize {
    k.div_ceil(2).div_ceil(16) * 16
}

/// The left operand `m × k` as BF16 pairs: `mp × kpp` words, `mp` = `m` padded to 16, the low half
/// of word `(i, p)` element `(i, 2p)`, the high half `(i, 2p + 1)`; padding is zero.
fn pack_lhs(a: &View<'_>, kpp: usize) -> Vec<u32> {
    let mp = a.rows.div_ceil(16) * 16;
    let mut out = vec![0u32; mp * kpp];
    super::simd(|| {
        for i in 0..a.rows {
            let row = &mut out[i * kpp..(i + 1) * kpp];
            let at = |kk: usize| a.data[i * a.row_stride + kk * a.col_stride];
            for (p, w) in row.iter_mut().enumerate().take(a.cols.div_ceil(2)) {
                let lo = to_bf16(at(2 * p));
                let hi = if 2 * p + 1 < a.cols {
                    to_bf16(at(2 * p + 1))
                } else {
                    0
                };
                *w = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    });
    out
}

/// The right operand `k × n` in blocks of 16 columns: word `((jb · kpp) + p) · 16 + jj` holds the
/// pair `(B[2p][j], B[2p + 1][j])` for `j = 16·jb + jj`; padding is zero.
fn pack_rhs(b: &View<'_>, kpp: usize) -> Vec<u32> {
    let blocks = b.cols.div_ceil(16);
    let mut out = vec![0u32; blocks * kpp * 16];
    super::simd(|| {
        for p in 0..b.rows.div_ceil(2) {
            let (r0, r1) = (2 * p, 2 * p + 1);
            for j in 0..b.cols {
                let lo = to_bf16(b.data[r0 * b.row_stride + j * b.col_stride]);
                let hi = if r1 < b.rows {
                    to_bf16(b.data[r1 * b.row_stride + j * b.col_stride])
                } else {
                    0
                };
                out[((j / 16) * kpp + p) * 16 + j % 16] = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    });
    out
}

/// `dst (m × n, stride dst_stride) = lhs · rhs` (+ the old `dst` when `accumulate`) with BF16
/// operands on `backend`, FP32 accumulation. Shapes are checked as [`sgemm`] checks them.
pub(crate) fn gemm_with(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    threads: Threads,
    backend: Bf16Backend,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    match backend {
        Bf16Backend::Fp32 => return sgemm(dst, dst_stride, lhs, rhs, accumulate, threads),
        Bf16Backend::Emulated => {
            check_shapes("bf16 gemm", dst.len(), dst_stride, &lhs, &rhs)?;
            let round = |v: &View<'_>| -> Vec<f32> {
                let mut out = Vec::with_capacity(v.rows * v.cols);
                for i in 0..v.rows {
                    out.extend((0..v.cols).map(|j| round_bf16(v.data[i * v.row_stride + j * v.col_stride])));
                }
                out
            };
            let (a, b) = (round(&lhs), round(&rhs));
            return sgemm(
                dst,
                dst_stride,
                View::rows(&a, m, k),
                View::rows(&b, k, n),
                accumulate,
                threads,
            );
        }
        Bf16Backend::Amx | Bf16Backend::Avx512 => {}
    }
    if !backend.is_supported() {
        candle_core::bail!("bf16 matrix product: this processor cannot run the {backend} backend");
    }
    check_shapes("bf16 gemm", dst.len(), dst_stride, &lhs, &rhs)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let kpp = padded_pairs(k);
    let a = pack_lhs(&lhs, kpp);
    let b = pack_rhs(&rhs, kpp);
    let packed = Packed {
        a: &a,
        b: &b,
        m,
        n,
        kpp,
    };
    let blocks = n.div_ceil(16);
    let workers = match threads {
        Threads::One => 1,
        Threads::Pool(t) => t.max(1).min(blocks.div_ceil(2)),
    };
    if workers <= 1 {
        return run_blocks(&packed, 0..blocks, dst, dst_stride, accumulate, backend);
    }
    // Each worker takes a run of 16-column blocks (an even count, so AMX keeps 2×2 tiles) and
    // writes those columns of every row: copies of its share, added back one worker at a time.
    let per = blocks.div_ceil(workers).next_multiple_of(2);
    let parts: Vec<candle_core::Result<(usize, Vec<f32>)>> = {
        use rayon::prelude::*;
        (0..workers)
            .into_par_iter()
            .filter(|w| w * per < blocks)
            .map(|w| {
                let range = w * per..((w + 1) * per).min(blocks);
                let (c0, c1) = (range.start * 16, (range.end * 16).min(n));
                let width = c1 - c0;
                let mut part = vec![0.0f32; m * width];
                if accumulate {
                    for i in 0..m {
                        part[i * width..(i + 1) * width]
                            .copy_from_slice(&dst[i * dst_stride + c0..i * dst_stride + c1]);
                    }
                }
                run_blocks(&packed, range, &mut part, width, accumulate, backend).map(|()| (c0, part))
            })
            .collect()
    };
    for part in parts {
        let (c0, part) = part?;
        let width = part.len() / m;
        for i in 0..m {
            dst[i * dst_stride + c0..i * dst_stride + c0 + width]
                .copy_from_slice(&part[i * width..(i + 1) * width]);
        }
    }
    Ok(())
}

/// Both operands packed (see [`pack_lhs`], [`pack_rhs`]) and the product's shape.
struct Packed<'a> {
    a: &'a [u32],
    b: &'a [u32],
    m: usize,
    n: usize,
    kpp: usize,
}

/// Computes the columns of the 16-column `blocks` into `dst`, whose column 0 is the first column
/// of `blocks.start` (so `dst` may be a worker's share): rows in steps of 32, columns in steps of
/// 32, each step's FP32 block added to (or written over) `dst`.
fn run_blocks(
    p: &Packed<'_>,
    blocks: std::ops::Range<usize>,
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    backend: Bf16Backend,
) -> candle_core::Result<()> {
    let col0 = blocks.start * 16;
    let mut tile = [0.0f32; 32 * 32];
    let tiles = hw::Tiles::begin(backend)?;
    for jb in blocks.clone().step_by(2) {
        let two_cols = jb + 1 < blocks.end;
        for i0 in (0..p.m).step_by(32) {
            let two_rows = i0 + 16 < p.m;
            tiles.block(p, i0, jb, two_rows, two_cols, &mut tile);
            let rows = (p.m - i0).min(32);
            let (c0, c1) = (jb * 16, ((jb + 2) * 16).min(p.n));
            for r in 0..rows {
                let out = &mut dst[(i0 + r) * dst_stride + c0 - col0..][..c1 - c0];
                let src = &tile[r * 32..r * 32 + (c1 - c0)];
                if accumulate {
                    out.iter_mut().zip(src).for_each(|(o, s)| *o += s);
                } else {
                    out.copy_from_slice(src);
                }
            }
        }
    }
    Ok(())
}

/// The processor-specific parts: detection and the two hardware kernels.
#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{Bf16Backend, Packed};

    pub(super) fn avx512_bf16() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }

    /// AMX-TILE and AMX-BF16 in CPUID, and Linux's permission to use the tile state (asked for
    /// once per process with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; refused on
    /// kernels before 5.16 and on other systems).
    pub(super) fn amx_ready() -> bool {
        static READY: OnceLock<bool> = OnceLock::new();
        *READY.get_or_init(|| {
            let leaf7 = __cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
            amx_bf16 && amx_tile && request_tile_permission()
        })
    }

    #[cfg(target_os = "linux")]
    fn request_tile_permission() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with two integer arguments; it changes only which register
        // state this process may use.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_permission() -> bool {
        false
    }

    /// One thread's use of a hardware backend: for AMX the tile configuration is loaded on
    /// creation and released on drop.
    pub(super) struct Tiles {
        backend: Bf16Backend,
    }

    /// The AMX tile configuration: palette 1, tiles 0-7 each 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn full() -> Self {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
                c[48 + t] = 16; // rows
            }
            TileConfig(c)
        }
    }

    impl Tiles {
        pub(super) fn begin(backend: Bf16Backend) -> candle_core::Result<Self> {
            if !backend.is_supported() {
                candle_core::bail!("bf16 matrix product: this processor cannot run the {backend} backend");
            }
            if backend == Bf16Backend::Amx {
                let cfg = TileConfig::full();
                // SAFETY: AMX is supported and permitted (checked above); the configuration is a
                // valid palette-1 layout in a 64-byte aligned buffer that lives across the call.
                unsafe { amx::load_config(&cfg.0) };
            }
            Ok(Tiles { backend })
        }

        /// The FP32 product of rows `i0..i0+16` (and the next 16 when `two_rows`) and 16-column
        /// blocks `jb` (and `jb + 1` when `two_cols`) into `tile` (32 × 32, row-major; parts not
        /// computed are left as they are).
        pub(super) fn block(
            &self,
            p: &Packed<'_>,
            i0: usize,
            jb: usize,
            two_rows: bool,
            two_cols: bool,
            tile: &mut [f32; 1024],
        ) {
            let kpp = p.kpp;
            let rows = if two_rows { 32 } else { 16 };
            // Bounds the kernels rely on: the packed lhs has its rows padded to 16 and the packed
            // rhs whole 16-column blocks.
            assert!((i0 + rows) * kpp <= p.a.len(), "bf16 gemm: lhs rows out of range");
            let blocks = if two_cols { 2 } else { 1 };
            assert!(
                (jb + blocks) * kpp * 16 <= p.b.len(),
                "bf16 gemm: rhs blocks out of range"
            );
            match self.backend {
                // SAFETY: the asserts above keep every load inside the packed buffers; the tile
                // configuration was loaded by `begin` on this thread.
                Bf16Backend::Amx => unsafe { amx::block(p, i0, jb, two_rows, two_cols, tile) },
                // SAFETY: as above; AVX-512 BF16 is supported (checked in `begin`).
                _ => unsafe { avx512::block(p, i0, jb, rows, two_cols, tile) },
            }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            if self.backend == Bf16Backend::Amx {
                // SAFETY: releases the tile state this thread configured in `begin`.
                unsafe { amx::release() };
            }
        }
    }

    mod avx512 {
        use super::*;

        /// Rows `i0..i0 + rows` × columns of blocks `jb` and `jb + 1` (the second computed even
        /// when not wanted: it is then block `jb` again and never read).
        ///
        /// # Safety
        /// AVX-512 BF16 must be available and the packed buffers must hold those rows and blocks.
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub(super) unsafe fn block(
            p: &Packed<'_>,
            i0: usize,
            jb: usize,
            rows: usize,
            two_cols: bool,
            tile: &mut [f32; 1024],
        ) {
            let b0 = p.b.as_ptr().wrapping_add(jb * p.kpp * 16);
            let b1 = if two_cols {
                p.b.as_ptr().wrapping_add((jb + 1) * p.kpp * 16)
            } else {
                b0
            };
            for r0 in (0..rows).step_by(8) {
                // SAFETY: as for the function.
                unsafe { rows8(p, i0 + r0, b0, b1, &mut tile[r0 * 32..(r0 + 8) * 32]) };
            }
        }

        /// Eight rows from `i` against two column blocks: 16 accumulators, one broadcast pair of
        /// the left operand and two loads of the right per step along `k`.
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn rows8(p: &Packed<'_>, i: usize, b0: *const u32, b1: *const u32, out: &mut [f32]) {
            let kpp = p.kpp;
            let a = p.a.as_ptr().wrapping_add(i * kpp);
            let mut acc0 = [_mm512_setzero_ps(); 8];
            let mut acc1 = [_mm512_setzero_ps(); 8];
            for q in 0..kpp {
                // SAFETY: q < kpp, and blocks jb, jb + 1 hold kpp rows of 16 words each.
                let (v0, v1): (__m512bh, __m512bh) = unsafe {
                    (
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b0.add(q * 16).cast())),
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b1.add(q * 16).cast())),
                    )
                };
                for r in 0..8 {
                    // SAFETY: rows i..i + 8 lie inside the row-padded lhs (checked by the caller).
                    let pair = unsafe { *a.add(r * kpp + q) };
                    let av: __m512bh =
                        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32)) };
                    acc0[r] = _mm512_dpbf16_ps(acc0[r], av, v0);
                    acc1[r] = _mm512_dpbf16_ps(acc1[r], av, v1);
                }
            }
            for r in 0..8 {
                // SAFETY: `out` holds 8 rows of 32 floats.
                unsafe {
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * 32), acc0[r]);
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * 32 + 16), acc1[r]);
                }
            }
        }
    }

    /// AMX through inline assembly (its intrinsics are not stable Rust). The compiler never uses
    /// tile registers, so they keep their values from one `asm!` block to the next.
    mod amx {
        use std::arch::asm;

        use super::Packed;

        /// # Safety
        /// AMX must be supported and permitted; `cfg` must be a valid tile configuration.
        pub(super) unsafe fn load_config(cfg: &[u8; 64]) {
            // SAFETY: per the function's contract.
            unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly)) };
        }

        /// # Safety
        /// Only after [`load_config`] on this thread.
        pub(super) unsafe fn release() {
            // SAFETY: per the function's contract.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }

        /// Tiles: C in tmm0 (rows 0-15, block jb), tmm1 (rows 0-15, jb + 1), tmm2 (rows 16-31,
        /// jb), tmm3 (rows 16-31, jb + 1); A rows in tmm4 and tmm5; B blocks in tmm6 and tmm7.
        ///
        /// # Safety
        /// The configuration of `Tiles::full` is loaded on this thread and the packed buffers
        /// hold rows `i0..i0 + 16·(1 + two_rows)` and blocks `jb..jb + 1 + two_cols`.
        pub(super) unsafe fn block(
            p: &Packed<'_>,
            i0: usize,
            jb: usize,
            two_rows: bool,
            two_cols: bool,
            tile: &mut [f32; 1024],
        ) {
            let kpp = p.kpp;
            let a_stride = kpp * 4; // bytes between lhs rows
            let b_stride = 64usize; // bytes between rows of a packed rhs block
            let a0 = p.a.as_ptr().wrapping_add(i0 * kpp);
            let a1 = p.a.as_ptr().wrapping_add((i0 + 16) * kpp);
            let b0 = p.b.as_ptr().wrapping_add(jb * kpp * 16);
            let b1 = p.b.as_ptr().wrapping_add((jb + 1) * kpp * 16);
            // SAFETY (all blocks below): per the function's contract; every load reads 16 rows of
            // 64 bytes that lie inside the packed buffers, and every store writes 16 rows of 64
            // bytes inside `tile` (stride 128 bytes: 32 floats per row).
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for q in (0..kpp).step_by(16) {
                    asm!("tileloadd tmm4, [{0} + {1}*1]", in(reg) a0.add(q), in(reg) a_stride, options(nostack, readonly));
                    asm!("tileloadd tmm6, [{0} + {1}*1]", in(reg) b0.add(q * 16), in(reg) b_stride, options(nostack, readonly));
                    asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem));
                    if two_cols {
                        asm!("tileloadd tmm7, [{0} + {1}*1]", in(reg) b1.add(q * 16), in(reg) b_stride, options(nostack, readonly));
                        asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem));
                    }
                    if two_rows {
                        asm!("tileloadd tmm5, [{0} + {1}*1]", in(reg) a1.add(q), in(reg) a_stride, options(nostack, readonly));
                        asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem));
                        if two_cols {
                            asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                        }
                    }
                }
                let out = tile.as_mut_ptr();
                let stride = 128usize;
                asm!("tilestored [{0} + {1}*1], tmm0", in(reg) out, in(reg) stride, options(nostack));
                if two_cols {
                    asm!("tilestored [{0} + {1}*1], tmm1", in(reg) out.add(16), in(reg) stride, options(nostack));
                }
                if two_rows {
                    asm!("tilestored [{0} + {1}*1], tmm2", in(reg) out.add(16 * 32), in(reg) stride, options(nostack));
                    if two_cols {
                        asm!("tilestored [{0} + {1}*1], tmm3", in(reg) out.add(16 * 32 + 16), in(reg) stride, options(nostack));
                    }
                }
            }
        }
    }
}

/// Other processors: no BF16 instructions.
#[cfg(not(target_arch = "x86_64"))]
mod hw {
    use super::{Bf16Backend, Packed};

    pub(super) fn avx512_bf16() -> bool {
        false
    }

    pub(super) fn amx_ready() -> bool {
        false
    }

    pub(super) struct Tiles;

    impl Tiles {
        pub(super) fn begin(backend: Bf16Backend) -> candle_core::Result<Self> {
            candle_core::bail!("bf16 matrix product: this processor cannot run the {backend} backend")
        }

        pub(super) fn block(
            &self,
            _: &Packed<'_>,
            _: usize,
            _: usize,
            _: bool,
            _: bool,
            _: &mut [f32; 1024],
        ) {
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to 1 + 2^-6 (even).
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_bf16(1.0 + 1.5 / 256.0), 1.0 + 1.0 / 128.0);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        // Past the largest BF16 value, rounding goes to infinity, as IEEE rounding does.
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(-1.5), -1.5);
    }

    #[test]
    fn the_choice_honours_the_switch_and_refuses_what_fails() {
        let ok = |_: Bf16Backend| Ok(());
        let s = choose(Some("fp32"), ok);
        assert_eq!(s.backend, Bf16Backend::Fp32);
        assert!(s.reason.contains("FRACTURE_BF16=fp32"), "{}", s.reason);
        assert_eq!(choose(Some("EMULATED"), ok).backend, Bf16Backend::Emulated);
        let s = choose(Some("tpu"), ok);
        assert_eq!(s.backend, Bf16Backend::Fp32);
        assert!(s.reason.contains("not one of"), "{}", s.reason);
        // A backend whose check fails is never chosen.
        let s = choose(None, |_| Err("wrong".into()));
        assert_eq!(s.backend, Bf16Backend::Fp32);
        for b in [Bf16Backend::Amx, Bf16Backend::Avx512] {
            if b.is_supported() {
                assert!(
                    s.reason.contains(&format!("{b} failed its check (wrong)")),
                    "{}",
                    s.reason
                );
            }
        }
        // Without a switch, the fastest supported hardware backend, or fp32.
        let want = Bf16Backend::available()
            .into_iter()
            .find(|b| matches!(b, Bf16Backend::Amx | Bf16Backend::Avx512))
            .unwrap_or(Bf16Backend::Fp32);
        assert_eq!(choose(None, ok).backend, want);
        // Forcing a hardware backend this processor lacks falls back with a message.
        for b in [Bf16Backend::Amx, Bf16Backend::Avx512] {
            if !b.is_supported() {
                let s = choose(Some(b.name()), ok);
                assert_eq!(s.backend, Bf16Backend::Fp32);
                assert!(s.reason.contains("cannot run"), "{}", s.reason);
            }
        }
    }

    #[test]
    fn every_supported_hardware_backend_passes_the_self_check() {
        let hardware = [Bf16Backend::Amx, Bf16Backend::Avx512];
        for b in Bf16Backend::available()
            .into_iter()
            .filter(|b| hardware.contains(b))
        {
            self_check(b).unwrap_or_else(|e| panic!("{b}: {e}"));
        }
    }
}
