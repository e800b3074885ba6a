//! A checked, safe front for the `gemm` crate's f32 matrix multiply (the same crate candle uses,
//! here with its AVX-512 kernels enabled); one of the three modules with `unsafe` (with `bf16.rs`
//! and `packed.rs`).
#![allow(unsafe_code)]

/// A matrix view into a slice: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows × cols` matrix.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `rows × cols` matrix (so this view is `cols × rows`).
    pub(crate) fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows: cols,
            cols: rows,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// The transpose of this view (no copy: the strides swap).
    pub(crate) fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// The largest index a `rows × cols` view with these strides touches, plus one (0 when empty).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Checks that `lhs (m × k) · rhs (k × n)` fits a destination of `dst_len` values with row stride
/// `dst_stride`, and that each operand's slice holds its view; the error names `what` (the
/// product) and the operands.
pub(crate) fn check_shapes(
    what: &str,
    dst_len: usize,
    dst_stride: usize,
    lhs: &View<'_>,
    rhs: &View<'_>,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        candle_core::bail!("{what}: lhs is {m}×{k} but rhs is {}×{n}", rhs.rows);
    }
    if dst_stride < n {
        candle_core::bail!("{what}: destination stride {dst_stride} is below its width {n}");
    }
    if extent(m, k, lhs.row_stride, lhs.col_stride) > lhs.data.len()
        || extent(k, n, rhs.row_stride, rhs.col_stride) > rhs.data.len()
        || extent(m, n, dst_stride, 1) > dst_len
    {
        candle_core::bail!("{what}: an operand slice is shorter than its {m}×{k}·{k}×{n} shape needs");
    }
    Ok(())
}

/// How many threads a multiply may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// The calling thread only (the caller parallelises across images).
    One,
    /// Up to this many threads of rayon's pool.
    Pool(usize),
}

/// Threads for the multiplies inside a per-image loop over `batch` images: one each when there are
/// enough images to keep every thread busy, otherwise the whole pool (a batch of one still uses every
/// core).
pub(crate) fn inner_threads(batch: usize) -> Threads {
    let pool = rayon::current_num_threads();
    if batch >= pool {
        Threads::One
    } else {
        Threads::Pool(pool)
    }
}

/// `dst (m × n, row-major, stride dst_stride) = lhs (m × k) · rhs (k × n)`, plus the old `dst` when
/// `accumulate`. Panics never: shapes and slice lengths are checked first, and a mismatch returns
/// an error naming the operands.
pub(crate) fn sgemm(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    threads: Threads,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    check_shapes("sgemm", dst.len(), dst_stride, &lhs, &rhs)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_stride..i * dst_stride + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let as_isize = |v: usize| -> candle_core::Result<isize> {
        isize::try_from(v).map_err(|_| candle_core::Error::Msg("sgemm: stride too large".into()))
    };
    let workers = match threads {
        Threads::One => 1,
        Threads::Pool(t) => t.max(1),
    };
    let strides = [
        dst_stride,
        lhs.col_stride,
        lhs.row_stride,
        rhs.col_stride,
        rhs.row_stride,
    ];
    let [dst_rs, lhs_cs, lhs_rs, rhs_cs, rhs_rs] = strides.map(as_isize);
    let (dst_rs, lhs_cs, lhs_rs, rhs_cs, rhs_rs) = (dst_rs?, lhs_cs?, lhs_rs?, rhs_cs?, rhs_rs?);
    // With several threads and a wide result, each thread takes a block of columns: for the short,
    // wide products of a convolution this scales where the crate's own threading does not.
    if workers > 1 && n >= 256 * workers {
        let block = n.div_ceil(workers);
        let dst_base = SendPtr(dst.as_mut_ptr());
        let (lhs_ptr, rhs_ptr) = (SendConst(lhs.data.as_ptr()), SendConst(rhs.data.as_ptr()));
        rayon::scope(|scope| {
            for w in 0..workers {
                let (c0, c1) = (w * block, ((w + 1) * block).min(n));
                if c0 >= c1 {
                    continue;
                }
                scope.spawn(move |_| {
                    // SAFETY: as below, for the sub-product of columns c0..c1: the destination block
                    // and the right-hand columns are within the checked extents, and the column blocks
                    // of different threads are disjoint, so no element is written twice.
                    unsafe {
                        gemm::gemm(
                            m,
                            c1 - c0,
                            k,
                            dst_base.get().add(c0),
                            1,
                            dst_rs,
                            accumulate,
                            lhs_ptr.get(),
                            lhs_cs,
                            lhs_rs,
                            rhs_ptr.get().offset(c0 as isize * rhs_cs),
                            rhs_cs,
                            rhs_rs,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                });
            }
        });
        return Ok(());
    }
    let parallelism = if workers > 1 {
        gemm::Parallelism::Rayon(workers)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the kernel reads or writes, `(i, j) ↦ i·rs + j·cs` for i < rows and
    // j < cols, is below the checked extents, which are at most the slices' lengths; `dst` is a
    // unique borrow and cannot alias `lhs` or `rhs`; strides are non-negative and fit in isize.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// A raw pointer handed to worker threads that write disjoint parts of one checked buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used inside `sgemm`, where each thread writes a disjoint block of the destination.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: shared only to be copied into the worker closures.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A read-only raw pointer handed to worker threads.
#[derive(Clone, Copy)]
struct SendConst(*const f32);
// SAFETY: the pointee is only read while the borrow it came from is alive (the scope joins first).
unsafe impl Send for SendConst {}
// SAFETY: read-only.
unsafe impl Sync for SendConst {}
impl SendConst {
    fn get(self) -> *const f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &View<'_>, b: &View<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    out[i * b.cols + j] += a.data[i * a.row_stride + p * a.col_stride]
                        * b.data[p * b.row_stride + j * b.col_stride];
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_naive_product_with_transposed_views_and_accumulation() {
        let a: Vec<f32> = (0..35).map(|v| (v as f32 * 0.37).sin()).collect(); // 5×7
        let b: Vec<f32> = (0..28).map(|v| (v as f32 * 0.11).cos()).collect(); // 7×4 (or 4×7 transposed)
        for (lhs, rhs) in [
            (View::rows(&a, 5, 7), View::rows(&b, 7, 4)),
            (View::rows(&a, 5, 7), View::transposed(&b, 4, 7)),
            (View::transposed(&a, 7, 5), View::rows(&b, 7, 4)),
        ] {
            let want = naive(&lhs, &rhs);
            let mut got = vec![0.0; lhs.rows * rhs.cols];
            sgemm(&mut got, rhs.cols, lhs, rhs, false, Threads::One).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            sgemm(&mut got, rhs.cols, lhs, rhs, true, Threads::Pool(2)).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let a = vec![0.0; 6];
        let mut d = vec![0.0; 4];
        assert!(
            sgemm(
                &mut d,
                2,
                View::rows(&a, 2, 3),
                View::rows(&a, 2, 3),
                false,
                Threads::One
            )
            .is_err()
        );
        assert!(
            sgemm(
                &mut d,
                2,
                View::rows(&a, 2, 3),
                View::rows(&a[..5], 3, 2),
                false,
                Threads::One
            )
            .is_err()
        );
        assert!(
            sgemm(
                &mut d[..3],
                2,
                View::rows(&a, 2, 3),
                View::rows(&a, 3, 2),
                false,
                Threads::One
            )
            .is_err()
        );
    }
}
