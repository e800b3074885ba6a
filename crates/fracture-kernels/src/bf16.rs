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
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    // A quiet NaN keeps its sign and payload's top bits (written without a branch, so that
    // packing loops vectorize).
    let nan = (bits >> 16) | 0x40;
    (if x.is_nan() { nan } else { rounded }) as u16
}

/// `x` rounded to the nearest BF16 value, as f32.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(to_bf16(x)) << 16)
}

/// Pairs along `k` per packed row: `k` halved (at least one), and for AMX padded to a multiple
/// of 16 (one tile row); the AVX-512 kernel takes any count.
fn padded_pairs(k: usize, backend: Bf16Backend) -> usize {
    let pairs = k.div_ceil(2).max(1);
    if backend == Bf16Backend::Amx {
        pairs.div_ceil(16) * 16
    } else {
        pairs
    }
}

/// Two values as one word of BF16 pairs: `lo` in the low half, `hi` in the high half.
#[inline(always)]
fn pack_pair(lo: f32, hi: f32) -> u32 {
    u32::from(to_bf16(lo)) | (u32::from(to_bf16(hi)) << 16)
}

/// The left operand `m × k` as BF16 pairs into `out` (every word written): `mp × kpp` words, `mp`
/// = `m` padded to 16, the low half of word `(i, p)` element `(i, 2p)`, the high half
/// `(i, 2p + 1)`; padding is zero.
fn pack_lhs(a: &View<'_>, kpp: usize, threads: Threads, out: &mut [u32]) {
    let pack_row = |i: usize, row: &mut [u32]| {
        if i >= a.rows {
            row.fill(0);
            return;
        }
        row[a.cols.div_ceil(2)..].fill(0);
        if a.col_stride == 1 {
            // A row-major view: each row's values lie side by side.
            let src = &a.data[i * a.row_stride..][..a.cols];
            let whole = a.cols / 2;
            for (w, pair) in row[..whole].iter_mut().zip(src.chunks_exact(2)) {
                *w = pack_pair(pair[0], pair[1]);
            }
            if a.cols % 2 == 1 {
                row[whole] = pack_pair(src[a.cols - 1], 0.0);
            }
        } else {
            let at = |kk: usize| a.data[i * a.row_stride + kk * a.col_stride];
            for (p, w) in row.iter_mut().enumerate().take(a.cols.div_ceil(2)) {
                let hi = if 2 * p + 1 < a.cols { at(2 * p + 1) } else { 0.0 };
                *w = pack_pair(at(2 * p), hi);
            }
        }
    };
    match threads {
        Threads::Pool(t) if t > 1 && a.rows >= 16 => {
            use rayon::prelude::*;
            out.par_chunks_mut(kpp * 16).enumerate().for_each(|(c, rows)| {
                super::simd(|| {
                    for (r, row) in rows.chunks_mut(kpp).enumerate() {
                        pack_row(c * 16 + r, row);
                    }
                })
            });
        }
        _ => super::simd(|| {
            for (i, row) in out.chunks_mut(kpp).enumerate() {
                pack_row(i, row);
            }
        }),
    }
}

/// The 16-column blocks `blocks` of the right operand `k × n`: word `(l · kpp + p) · 16 + jj` of
/// the `l`-th block holds the pair `(B[2p][j], B[2p + 1][j])` for `j = 16·(blocks.start + l) + jj`
/// (`out` holds `blocks.len() · kpp · 16` words, every one written; padding is zero). Each worker
/// packs only the blocks it multiplies.
fn pack_rhs(b: &View<'_>, kpp: usize, blocks: std::ops::Range<usize>, out: &mut [u32]) {
    let (k, n) = (b.rows, b.cols);
    super::simd(|| {
        for (l, jb) in blocks.clone().enumerate() {
            let (j0, j1) = (jb * 16, (jb * 16 + 16).min(n));
            let block = &mut out[l * kpp * 16..(l + 1) * kpp * 16];
            // Zero what the copy below leaves unwritten: a partial block's missing columns, the
            // pairs past `k` (AMX pads them to a tile row).
            if j1 - j0 < 16 {
                block.fill(0);
            } else {
                block[k.div_ceil(2) * 16..].fill(0);
            }
            if b.col_stride == 1 && j1 - j0 == 16 {
                // Row-major: 16 neighbouring values of two rows make one row of the block.
                let row = |r: usize| &b.data[r * b.row_stride + j0..][..16];
                for p in 0..k / 2 {
                    let words = &mut block[p * 16..p * 16 + 16];
                    for ((w, &lo), &hi) in words.iter_mut().zip(row(2 * p)).zip(row(2 * p + 1)) {
                        *w = pack_pair(lo, hi);
                    }
                }
                if k % 2 == 1 {
                    let p = k / 2;
                    for (w, &lo) in block[p * 16..p * 16 + 16].iter_mut().zip(row(k - 1)) {
                        *w = pack_pair(lo, 0.0);
                    }
                }
            } else if b.row_stride == 1 {
                // A transposed view (channels-last activations): each column's values lie side by
                // side. Each column's pairs are packed into a tile row as row-major rows are (the
                // rounding vectorizes), then the tile is transposed into the block: packing pair by
                // pair across the columns made every rounding scalar.
                const P: usize = 64;
                let mut tile = [0u32; 16 * P];
                let pairs = k.div_ceil(2);
                for p0 in (0..pairs).step_by(P) {
                    let np = (pairs - p0).min(P);
                    for (jj, t) in tile.chunks_exact_mut(P).take(j1 - j0).enumerate() {
                        let col = &b.data[(j0 + jj) * b.col_stride + 2 * p0..][..(k - 2 * p0).min(2 * np)];
                        let whole = col.len() / 2;
                        for (w, pair) in t[..whole].iter_mut().zip(col.chunks_exact(2)) {
                            *w = pack_pair(pair[0], pair[1]);
                        }
                        if whole < np {
                            t[whole] = pack_pair(col[col.len() - 1], 0.0);
                        }
                    }
                    for p in 0..np {
                        let row = &mut block[(p0 + p) * 16..][..j1 - j0];
                        for (jj, w) in row.iter_mut().enumerate() {
                            *w = tile[jj * P + p];
                        }
                    }
                }
            } else {
                let at = |r: usize, j: usize| b.data[r * b.row_stride + j * b.col_stride];
                for p in 0..k.div_ceil(2) {
                    for j in j0..j1 {
                        let hi = if 2 * p + 1 < k { at(2 * p + 1, j) } else { 0.0 };
                        block[p * 16 + j - j0] = pack_pair(at(2 * p, j), hi);
                    }
                }
            }
        }
    });
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
    let kpp = padded_pairs(k, backend);
    with_scratch(&LHS, m.div_ceil(16) * 16 * kpp, |a| {
        pack_lhs(&lhs, kpp, threads, a);
        product(dst, dst_stride, (a, m, kpp), &rhs, accumulate, threads, backend)
    })
}

/// `dst = a · rhs` (+ the old `dst`) with `a` already packed (`(words, m, kpp)`), on a hardware
/// backend; shapes already checked.
fn product(
    dst: &mut [f32],
    dst_stride: usize,
    (a, m, kpp): (&[u32], usize, usize),
    rhs: &View<'_>,
    accumulate: bool,
    threads: Threads,
    backend: Bf16Backend,
) -> candle_core::Result<()> {
    let n = rhs.cols;
    let out = Dst {
        ptr: dst.as_mut_ptr(),
        stride: dst_stride,
    };
    // Packs the rhs blocks `range` and writes their columns of `dst`.
    let run = |range: std::ops::Range<usize>| -> candle_core::Result<()> {
        with_scratch(&RHS, range.len() * kpp * 16, |b| {
            pack_rhs(rhs, kpp, range.clone(), b);
            let packed = Packed { a, b, m, kpp };
            let tiles = hw::Tiles::begin(backend)?;
            for jb in range.clone().step_by(2) {
                let (c0, c1) = (jb * 16, ((jb + 2) * 16).min(n));
                // SAFETY: the caller checked that every `(i, j)` with `i < m`, `j < n` lies inside
                // `dst`; the workers' column ranges are disjoint and `dst` stays borrowed until
                // they finish.
                unsafe { tiles.panel(&packed, jb - range.start, c0, c1 - c0, out, accumulate) };
            }
            Ok(())
        })
    };
    run_workers(n, threads, run)
}

/// A left operand used in many products (a layer's weights, applied image by image): on a
/// hardware backend it is rounded and packed once, not once per product.
pub(crate) struct SharedLhs<'a> {
    view: View<'a>,
    backend: Bf16Backend,
    /// The packed operand and its pairs per row, on a hardware backend.
    packed: Option<(std::borrow::Cow<'a, [u32]>, usize)>,
}

/// A left operand rounded and packed for one hardware backend, kept between forward passes (a
/// frozen network's weights): see [`SharedLhs::prepacked`].
#[derive(Debug)]
pub(crate) struct PackedLhs {
    words: Vec<u32>,
    kpp: usize,
    rows: usize,
    cols: usize,
    backend: Bf16Backend,
}

impl PackedLhs {
    /// `view` packed for `backend`; `None` where `backend` packs nothing (emulated, FP32) or this
    /// processor lacks it.
    pub(crate) fn new(view: &View<'_>, backend: Bf16Backend) -> Option<Self> {
        let hardware = matches!(backend, Bf16Backend::Amx | Bf16Backend::Avx512);
        (hardware && backend.is_supported()).then(|| {
            let kpp = padded_pairs(view.cols, backend);
            let mut words = vec![0u32; view.rows.div_ceil(16) * 16 * kpp];
            pack_lhs(view, kpp, Threads::Pool(rayon::current_num_threads()), &mut words);
            PackedLhs {
                words,
                kpp,
                rows: view.rows,
                cols: view.cols,
                backend,
            }
        })
    }
}

impl<'a> SharedLhs<'a> {
    /// Prepares `view` for products on `backend`.
    pub(crate) fn new(view: View<'a>, backend: Bf16Backend) -> Self {
        let packed = PackedLhs::new(&view, backend).map(|p| (p.words.into(), p.kpp));
        SharedLhs {
            view,
            backend,
            packed,
        }
    }

    /// Like [`SharedLhs::new`], reusing `packed` when it was packed from an operand of this shape
    /// for `backend` (the caller keeps `view`'s values unchanged since); packs afresh otherwise.
    pub(crate) fn prepacked(view: View<'a>, backend: Bf16Backend, packed: Option<&'a PackedLhs>) -> Self {
        match packed {
            Some(p) if p.backend == backend && (p.rows, p.cols) == (view.rows, view.cols) => SharedLhs {
                view,
                backend,
                packed: Some((std::borrow::Cow::Borrowed(&p.words), p.kpp)),
            },
            _ => SharedLhs::new(view, backend),
        }
    }

    /// The operand's values, as given.
    pub(crate) fn view(&self) -> View<'a> {
        self.view
    }

    /// The backend its products run on.
    pub(crate) fn backend(&self) -> Bf16Backend {
        self.backend
    }

    /// `dst (m × n, stride dst_stride) = lhs · rhs` (+ the old `dst` when `accumulate`), as
    /// [`gemm_with`] computes it.
    pub(crate) fn matmul(
        &self,
        dst: &mut [f32],
        dst_stride: usize,
        rhs: View<'_>,
        accumulate: bool,
        threads: Threads,
    ) -> candle_core::Result<()> {
        let Some((a, kpp)) = &self.packed else {
            return gemm_with(dst, dst_stride, self.view, rhs, accumulate, threads, self.backend);
        };
        check_shapes("bf16 gemm", dst.len(), dst_stride, &self.view, &rhs)?;
        if self.view.rows == 0 || rhs.cols == 0 {
            return Ok(());
        }
        product(
            dst,
            dst_stride,
            (a, self.view.rows, *kpp),
            &rhs,
            accumulate,
            threads,
            self.backend,
        )
    }
}

thread_local! {
    /// Each thread's packed left operand, reused from product to product.
    static LHS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's packed right-operand blocks, likewise.
    static RHS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` words of this thread's `cell`, left over from earlier products (a fresh,
/// zeroed buffer when it is in use: a thread waiting for its workers may run another product
/// meanwhile), so packing neither faults in new pages nor zeroes the buffer on every product: the
/// packers write every word.
fn with_scratch<R>(
    cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u32>>>,
    len: usize,
    f: impl FnOnce(&mut [u32]) -> R,
) -> R {
    let mut f = Some(f);
    let done = cell.with(|c| {
        let mut buf = c.try_borrow_mut().ok()?;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Some((f.take()?)(&mut buf[..len]))
    });
    match (done, f) {
        (Some(r), _) => r,
        (None, Some(f)) => f(&mut vec![0; len]),
        (None, None) => unreachable!("the scratch closure runs at most once"),
    }
}

/// Splits the product's `n` columns, in 16-column blocks, between the workers `threads` allows and
/// runs `run` on each worker's blocks.
fn run_workers(
    n: usize,
    threads: Threads,
    run: impl Fn(std::ops::Range<usize>) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<()> {
    let blocks = n.div_ceil(16);
    let workers = match threads {
        Threads::One => 1,
        Threads::Pool(t) => t.max(1).min(blocks.div_ceil(2)),
    };
    if workers <= 1 {
        return run(0..blocks);
    }
    // Each worker takes a run of 16-column blocks (an even count, so AMX keeps 2×2 tiles) and
    // writes those columns of every row straight into `dst`.
    let per = blocks.div_ceil(workers).next_multiple_of(2);
    use rayon::prelude::*;
    (0..blocks.div_ceil(per))
        .into_par_iter()
        .map(|w| run(w * per..((w + 1) * per).min(blocks)))
        .collect::<candle_core::Result<Vec<()>>>()?;
    Ok(())
}

/// The destination of a product, shared by the workers, each of which writes its own columns.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    stride: usize,
}

// SAFETY: workers write disjoint columns of the destination (see `gemm_with`).
unsafe impl Send for Dst {}
// SAFETY: as above.
unsafe impl Sync for Dst {}

impl Dst {
    /// Columns `c0..c0 + width` of row `i`.
    ///
    /// # Safety
    /// The row segment must lie inside the destination and no other live reference may touch it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, c0: usize, width: usize) -> &mut [f32] {
        // SAFETY: per the function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride + c0), width) }
    }
}

/// Both operands packed (see [`pack_lhs`], [`pack_rhs`]: `b` holds only the current worker's
/// blocks) and the product's shape.
struct Packed<'a> {
    a: &'a [u32],
    b: &'a [u32],
    m: usize,
    kpp: usize,
}

/// How long one AVX-512 BF16 dot product (`vdpbf16ps` on 512 bits: 32 pairs, 64 flops) and one
/// AVX-512 FP32 fused multiply-add (`vfmadd231ps`: 16 lanes, 32 flops) take on this core, in
/// nanoseconds per instruction, each over `count` rounds of 16 independent accumulators (enough
/// to hide either one's latency, so this is issue rate, not latency) on the calling thread.
/// Their ratio says whether BF16 products can beat FP32 here at all: BF16 delivers twice the
/// flops per instruction, so it wins only if its instruction costs less than twice the FMA's.
/// `None` where the processor lacks AVX-512 BF16.
pub fn dot_instruction_times(count: usize) -> Option<(f64, f64)> {
    hw::dot_instruction_times(count)
}

/// On AVX-512 BF16 without AMX, [`auto_precision`] picks BF16 only when one `vdpbf16ps` costs less
/// than this many FP32 FMAs ([`dot_instruction_times`]): BF16 products then reach at least
/// 2 / 1.6 = 1.25× FP32's flop rate, a margin over what packing the operands to BF16 costs.
pub const AUTO_BF16_MAX_INSTRUCTION_RATIO: f64 = 1.6;

/// The precision `auto` stands for in this process ([`auto_precision`]), and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoPrecision {
    /// FP32, or BF16 where its products were measured faster.
    pub precision: super::Precision,
    /// One sentence: the backend and, on AVX-512 BF16, the instruction times that decided.
    pub reason: String,
}

/// The operand precision whose matrix products run faster on this processor, decided once per
/// process: BF16 on AMX tiles; on AVX-512 BF16 only where `vdpbf16ps` costs less than
/// [`AUTO_BF16_MAX_INSTRUCTION_RATIO`] FMAs (the fastest of five timings of each, about a
/// millisecond in all); FP32 everywhere else (emulated BF16 is never faster). `FRACTURE_BF16`
/// steers it through [`bf16_status`]: `fp32` makes `auto` FP32 on any processor.
pub fn auto_precision() -> &'static AutoPrecision {
    static CHOICE: OnceLock<AutoPrecision> = OnceLock::new();
    CHOICE.get_or_init(|| {
        decide_auto(bf16_status(), || {
            (0..5)
                .filter_map(|_| dot_instruction_times(20_000))
                .reduce(|(d0, f0), (d1, f1)| (d0.min(d1), f0.min(f1)))
        })
    })
}

/// The rule behind [`auto_precision`], with the timer passed in (so tests can give it any answer).
fn decide_auto(status: &Bf16Status, times: impl FnOnce() -> Option<(f64, f64)>) -> AutoPrecision {
    use super::Precision::{Bf16, Fp32};
    let (precision, reason) = match status.backend {
        Bf16Backend::Amx => (Bf16, "bf16 on AMX tiles".to_string()),
        Bf16Backend::Avx512 => match times() {
            Some((dp, fma)) if dp > 0.0 && fma > 0.0 => {
                let ratio = dp / fma;
                let rate = 2.0 / ratio;
                let verdict = if ratio < AUTO_BF16_MAX_INSTRUCTION_RATIO {
                    Bf16
                } else {
                    Fp32
                };
                (
                    verdict,
                    format!(
                        "vdpbf16ps takes {dp:.3} ns and an FP32 FMA {fma:.3} ns here ({ratio:.2}×): \
                         BF16 products would run at {rate:.2}× FP32's flop rate"
                    ),
                )
            }
            _ => (
                Fp32,
                "the AVX-512 BF16 instructions could not be timed".to_string(),
            ),
        },
        Bf16Backend::Emulated => (Fp32, "emulated BF16 is no faster than fp32".to_string()),
        Bf16Backend::Fp32 => (Fp32, status.reason.clone()),
    };
    AutoPrecision { precision, reason }
}

/// The processor-specific parts: detection, the two hardware kernels and the instruction timer.
#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{Bf16Backend, Dst, Packed};

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

        /// Columns `c0..c0 + width` (`width` ≤ 32: the rhs blocks `lb` and, when `width` > 16,
        /// `lb + 1` of the worker's packed blocks) of every row of the product, written into (or,
        /// when `accumulate`, added to) `dst`.
        ///
        /// # Safety
        /// Every row `i < p.m` of `dst` must hold columns `c0..c0 + width`, and no other live
        /// reference may touch them.
        pub(super) unsafe fn panel(
            &self,
            p: &Packed<'_>,
            lb: usize,
            c0: usize,
            width: usize,
            dst: Dst,
            accumulate: bool,
        ) {
            let two_cols = width > 16;
            // Bounds the kernels rely on: the packed lhs has its rows padded to 16 and the packed
            // rhs whole 16-column blocks.
            assert!(
                p.m.div_ceil(16) * 16 * p.kpp <= p.a.len(),
                "bf16 gemm: lhs rows out of range"
            );
            assert!(
                (lb + 1 + usize::from(two_cols)) * p.kpp * 16 <= p.b.len(),
                "bf16 gemm: rhs blocks out of range"
            );
            match self.backend {
                Bf16Backend::Amx => {
                    let mut tile = [0.0f32; 32 * 32];
                    for i0 in (0..p.m).step_by(32) {
                        let two_rows = i0 + 16 < p.m;
                        // SAFETY: the asserts above keep every load inside the packed buffers;
                        // the tile configuration was loaded by `begin` on this thread.
                        unsafe { amx::block(p, i0, lb, two_rows, two_cols, &mut tile) };
                        for r in 0..(p.m - i0).min(32) {
                            // SAFETY: per the function's contract.
                            let out = unsafe { dst.row(i0 + r, c0, width) };
                            let src = &tile[r * 32..r * 32 + width];
                            if accumulate {
                                out.iter_mut().zip(src).for_each(|(o, s)| *o += s);
                            } else {
                                out.copy_from_slice(src);
                            }
                        }
                    }
                }
                // SAFETY: as above; AVX-512 BF16 is supported (checked in `begin`).
                _ => unsafe { avx512::panel(p, lb, c0, width, dst, accumulate) },
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

    /// [`super::dot_instruction_times`]: `None` without AVX-512 BF16.
    pub(super) fn dot_instruction_times(count: usize) -> Option<(f64, f64)> {
        if !avx512_bf16() {
            return None;
        }
        // SAFETY: AVX-512F and AVX-512 BF16 were checked just above.
        Some(unsafe { instruction_times(count.max(1)) })
    }

    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn instruction_times(count: usize) -> (f64, f64) {
        let ones = std::hint::black_box(_mm512_set1_epi32(0x3f80_3f80));
        // SAFETY: a bit pattern reinterpreted between two 512-bit vector types.
        let b: __m512bh = unsafe { std::mem::transmute::<__m512i, __m512bh>(ones) };
        let x = std::hint::black_box(_mm512_set1_ps(1e-9));
        let per = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e9 / (count * 16) as f64;
        let t = std::time::Instant::now();
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..count {
            for a in &mut acc {
                *a = _mm512_dpbf16_ps(*a, b, b);
            }
        }
        std::hint::black_box(acc);
        let dp = per(t);
        let t = std::time::Instant::now();
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..count {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, x, x);
            }
        }
        std::hint::black_box(acc);
        (dp, per(t))
    }

    mod avx512 {
        use super::*;

        /// Pairs along `k` per step: the two rhs blocks' share (2 × 256 × 64 bytes) stays in
        /// the L1/L2 caches while every row passes over it.
        const KC: usize = 256;

        /// [`super::Tiles::panel`] on AVX-512 BF16: eight rows at a time, `k` in steps of [`KC`]
        /// pairs, each step's sums added to `dst` (the first written over it unless
        /// `accumulate`); columns past `width` are masked off.
        ///
        /// # Safety
        /// AVX-512 BF16 must be available, the packed buffers must hold every row (padded to 16)
        /// and blocks `lb` (and `lb + 1` when `width` > 16), and `dst` as for `panel`.
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub(super) unsafe fn panel(
            p: &Packed<'_>,
            lb: usize,
            c0: usize,
            width: usize,
            dst: Dst,
            accumulate: bool,
        ) {
            let kpp = p.kpp;
            let b0 = p.b.as_ptr().wrapping_add(lb * kpp * 16);
            let b1 = if width > 16 {
                p.b.as_ptr().wrapping_add((lb + 1) * kpp * 16)
            } else {
                b0
            };
            let mask = |w: usize| -> __mmask16 { if w >= 16 { 0xffff } else { (1u16 << w) - 1 } };
            let (m0, m1) = (mask(width), mask(width.saturating_sub(16)));
            for q0 in (0..kpp).step_by(KC) {
                let q1 = (q0 + KC).min(kpp);
                let add = accumulate || q0 > 0;
                for i in (0..p.m).step_by(8) {
                    let out = dst.ptr.wrapping_add(i * dst.stride + c0);
                    let rows = (p.m - i).min(8);
                    // SAFETY: per the function's contract (rows `i..i + 8` lie in the padded lhs).
                    unsafe {
                        rows8(
                            p.a.as_ptr().add(i * kpp),
                            kpp,
                            q0..q1,
                            b0,
                            b1,
                            out,
                            dst.stride,
                            rows,
                            [m0, m1],
                            add,
                        )
                    };
                }
            }
        }

        /// Eight lhs rows from `a` (row stride `kpp` words) against two rhs blocks over pairs `qs`:
        /// 16 accumulators, one broadcast pair of the lhs and two loads of the rhs per pair; the
        /// first `rows` rows are stored at `out` (row stride `stride`), the columns of each block
        /// under its mask, added to what is there when `add`.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn rows8(
            a: *const u32,
            kpp: usize,
            qs: std::ops::Range<usize>,
            b0: *const u32,
            b1: *const u32,
            out: *mut f32,
            stride: usize,
            rows: usize,
            masks: [__mmask16; 2],
            add: bool,
        ) {
            let mut acc0 = [_mm512_setzero_ps(); 8];
            let mut acc1 = [_mm512_setzero_ps(); 8];
            for q in qs {
                // SAFETY: q < kpp, and both blocks hold kpp rows of 16 words.
                let (v0, v1): (__m512bh, __m512bh) = unsafe {
                    (
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b0.add(q * 16).cast())),
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b1.add(q * 16).cast())),
                    )
                };
                for r in 0..8 {
                    // SAFETY: rows a..a + 8 lie inside the row-padded lhs (checked by the caller).
                    let pair = unsafe { *a.add(r * kpp + q) };
                    let av: __m512bh =
                        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32)) };
                    acc0[r] = _mm512_dpbf16_ps(acc0[r], av, v0);
                    acc1[r] = _mm512_dpbf16_ps(acc1[r], av, v1);
                }
            }
            for r in 0..rows {
                let o0 = out.wrapping_add(r * stride);
                let o1 = o0.wrapping_add(16);
                // SAFETY: the masks keep every load and store inside row r's columns of the panel
                // (a zero mask touches no memory).
                unsafe {
                    let (mut x0, mut x1) = (acc0[r], acc1[r]);
                    if add {
                        x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(masks[0], o0));
                        x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(masks[1], o1));
                    }
                    _mm512_mask_storeu_ps(o0, masks[0], x0);
                    _mm512_mask_storeu_ps(o1, masks[1], x1);
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
    use super::{Bf16Backend, Dst, Packed};

    pub(super) fn avx512_bf16() -> bool {
        false
    }

    pub(super) fn amx_ready() -> bool {
        false
    }

    pub(super) fn dot_instruction_times(_: usize) -> Option<(f64, f64)> {
        None
    }

    pub(super) struct Tiles;

    impl Tiles {
        pub(super) fn begin(backend: Bf16Backend) -> candle_core::Result<Self> {
            candle_core::bail!("bf16 matrix product: this processor cannot run the {backend} backend")
        }

        /// Never reached: [`Tiles::begin`] always fails here.
        pub(super) unsafe fn panel(&self, _: &Packed<'_>, _: usize, _: usize, _: usize, _: Dst, _: bool) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instruction_timer_answers_exactly_where_the_instructions_exist() {
        match dot_instruction_times(10_000) {
            Some((dp, fma)) => {
                assert!(hw::avx512_bf16());
                assert!(
                    dp.is_finite() && dp > 0.0 && fma.is_finite() && fma > 0.0,
                    "{dp} {fma}"
                );
            }
            None => assert!(!hw::avx512_bf16()),
        }
    }

    #[test]
    fn auto_picks_bf16_only_where_its_products_are_measured_faster() {
        use crate::Precision::{Bf16, Fp32};
        let status = |backend| Bf16Status {
            backend,
            reason: "test".into(),
        };
        let never = || -> Option<(f64, f64)> { panic!("timed without AVX-512 BF16") };
        assert_eq!(decide_auto(&status(Bf16Backend::Amx), never).precision, Bf16);
        assert_eq!(decide_auto(&status(Bf16Backend::Emulated), never).precision, Fp32);
        assert_eq!(decide_auto(&status(Bf16Backend::Fp32), never).precision, Fp32);
        // The Xeon measured in the docs: 0.753 ns vs 0.186 ns (BF16 at 0.49x FP32's rate).
        let slow = decide_auto(&status(Bf16Backend::Avx512), || Some((0.753, 0.186)));
        assert_eq!(slow.precision, Fp32);
        assert!(slow.reason.contains("0.49×"), "{}", slow.reason);
        let fast = decide_auto(&status(Bf16Backend::Avx512), || Some((0.19, 0.186)));
        assert_eq!(fast.precision, Bf16);
        let edge = AUTO_BF16_MAX_INSTRUCTION_RATIO;
        assert_eq!(
            decide_auto(&status(Bf16Backend::Avx512), || Some((edge, 1.0))).precision,
            Fp32
        );
        assert_eq!(decide_auto(&status(Bf16Backend::Avx512), || None).precision, Fp32);
        assert_eq!(
            decide_auto(&status(Bf16Backend::Avx512), || Some((0.0, 0.0))).precision,
            Fp32
        );
    }

    #[test]
    fn auto_on_this_machine_follows_its_backend() {
        let auto = auto_precision();
        match bf16_backend() {
            Bf16Backend::Amx => assert_eq!(auto.precision, crate::Precision::Bf16),
            Bf16Backend::Avx512 => assert!(auto.reason.contains("vdpbf16ps takes"), "{}", auto.reason),
            Bf16Backend::Emulated | Bf16Backend::Fp32 => {
                assert_eq!(auto.precision, crate::Precision::Fp32)
            }
        }
        assert!(std::ptr::eq(auto, auto_precision()), "decided once");
    }

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

    /// The packing paths (row-major, transposed and strided views) and accumulation, for every
    /// hardware backend here, against the emulated product on the same views.
    #[test]
    fn every_view_layout_and_accumulation_matches_the_emulated_product() {
        let val = |i: usize| ((i * 7919 + 13) % 2003) as f32 / 1001.0 - 1.0;
        // An odd `k` whose last pair starts a new tile of the transposed packing, and an even one.
        for (m, k, n) in [(21, 530, 37), (5, 129, 19)] {
            check_views(m, k, n, val);
        }
    }

    fn check_views(m: usize, k: usize, n: usize, val: impl Fn(usize) -> f32 + Copy) {
        // Storage for each operand that leaves room for a stride of 3 along either axis.
        let a: Vec<f32> = (0..m * k * 3).map(val).collect();
        let b: Vec<f32> = (0..k * n * 3).map(|i| val(i + 5)).collect();
        let views = |data: &'static [f32], rows: usize, cols: usize| {
            [
                View::rows(data, rows, cols),
                View::transposed(data, cols, rows),
                View {
                    data,
                    rows,
                    cols,
                    row_stride: 3 * cols,
                    col_stride: 3,
                },
            ]
        };
        let (a, b): (&'static [f32], &'static [f32]) = (a.leak(), b.leak());
        let hardware = [Bf16Backend::Amx, Bf16Backend::Avx512];
        for backend in Bf16Backend::available()
            .into_iter()
            .filter(|b| hardware.contains(b))
        {
            for (va, vb) in views(a, m, k)
                .into_iter()
                .flat_map(|va| views(b, k, n).map(move |vb| (va, vb)))
            {
                for (accumulate, threads) in [(false, Threads::One), (true, Threads::Pool(2))] {
                    let start: Vec<f32> = (0..m * (n + 3)).map(|i| val(i + 99)).collect();
                    let run = |be| {
                        let mut out = start.clone();
                        gemm_with(&mut out, n + 3, va, vb, accumulate, threads, be).unwrap();
                        out
                    };
                    let (got, want) = (run(backend), run(Bf16Backend::Emulated));
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 2e-3,
                            "{backend} {:?}/{:?} accumulate {accumulate} at {idx}: {g} vs {w}",
                            (va.row_stride, va.col_stride),
                            (vb.row_stride, vb.col_stride)
                        );
                        if idx % (n + 3) >= n {
                            assert_eq!(g, &start[idx], "{backend}: a column past the product was written");
                        }
                    }
                }
            }
        }
    }
}
