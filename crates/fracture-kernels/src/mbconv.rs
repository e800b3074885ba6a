//! A whole mobile inverted bottleneck (EfficientNet-Lite's block) as one op, forward and backward:
//!
//! ```text
//! [y1 = We·x → z0 = BN0(y1) → a1 = ReLU6(z0)] → y2 = depthwise(a1) → a2 = ReLU6(BN1(y2))
//!   → y3 = Wp·a2 → out = BN2(y3) (+ x when the shape is unchanged)
//! ```
//!
//! One op instead of seven keeps candle's autograd from allocating, zero-filling and accumulating a
//! gradient tensor for each of the block's large intermediate activations, and lets the layers
//! share passes: BN0 and its ReLU6 are applied while the depthwise kernel copies each plane into
//! its scratch (so `a1` never exists in memory), the depthwise output's statistics are taken while
//! each plane is in cache, BN0's gradient mask and sums are taken while each input-gradient plane
//! is in cache. Intermediates live in reused buffers (`buffers.rs`) between the forward and the
//! backward pass. The parameters arrive as one flat tensor (see [`MbConvSpec::layout`]), so the op
//! has two inputs; the network concatenates its variables into it, and candle splits the gradient
//! back. Checked against the composition of the single ops (`tests/kernels.rs`).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::bf16::{Bf16Backend, PackedLhs};
use super::buffers::{give, take, take_output};
use super::depthwise::{DSCRATCH, DepthwiseSpec, GRAD, GROUP, Geometry, Padding, ROW, SCRATCH, with_scratch};
use super::gemm::View;
use super::norm::{self, Norm, NormGrad};
use super::packed::{self, PackedF32};
use super::pointwise::{self, Dims};
use super::{Activation, contiguous_f32, simd, tensor_f32};
use super::{Precision, SharedLhs, banded};

/// The shape of a block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MbConvSpec {
    /// Input channels.
    pub cin: usize,
    /// Channels of the depthwise stage (`cin` times the expansion).
    pub mid: usize,
    /// Output channels.
    pub cout: usize,
    /// Depthwise kernel side.
    pub kernel: usize,
    /// Depthwise stride (1 or 2).
    pub stride: usize,
    /// Whether there is a 1×1 expansion (with BN0 and ReLU6) before the depthwise stage; without it
    /// `mid` equals `cin` and the depthwise stage reads the input.
    pub expand: bool,
    /// Batch-norm ε.
    pub eps: f64,
}

/// Where each parameter sits in the flat parameter vector.
#[derive(Debug, Clone)]
pub struct MbConvLayout {
    /// `We (mid, cin)`, when expanding.
    pub expand: Option<Range<usize>>,
    /// BN0's scale and shift, when expanding.
    pub bn0: Option<(Range<usize>, Range<usize>)>,
    /// The depthwise filters `(mid, k, k)`.
    pub depthwise: Range<usize>,
    /// BN1's scale and shift.
    pub bn1: (Range<usize>, Range<usize>),
    /// `Wp (cout, mid)`.
    pub project: Range<usize>,
    /// BN2's scale and shift.
    pub bn2: (Range<usize>, Range<usize>),
    /// Length of the vector.
    pub len: usize,
}

impl MbConvSpec {
    /// Whether the input is added to the output (stride 1, same channels).
    pub fn skip(&self) -> bool {
        self.stride == 1 && self.cin == self.cout
    }

    /// The flat parameter vector's layout: `[We, γ0, β0,] Wd, γ1, β1, Wp, γ2, β2`, each flattened
    /// row-major.
    pub fn layout(&self) -> MbConvLayout {
        let mut at = 0;
        let mut next = |n: usize| {
            let r = at..at + n;
            at += n;
            r
        };
        let expand = self.expand.then(|| next(self.mid * self.cin));
        let bn0 = self.expand.then(|| (next(self.mid), next(self.mid)));
        let depthwise = next(self.mid * self.kernel * self.kernel);
        let bn1 = (next(self.mid), next(self.mid));
        let project = next(self.cout * self.mid);
        let bn2 = (next(self.cout), next(self.cout));
        MbConvLayout {
            expand,
            bn0,
            depthwise,
            bn1,
            project,
            bn2,
            len: at,
        }
    }

    /// The number of batch norms: 3 with expansion, else 2.
    pub fn norms(&self) -> usize {
        if self.expand { 3 } else { 2 }
    }
}

/// Per-norm `(mean, biased variance)` of a training-mode forward pass, in block order.
pub type BlockStats = Vec<(Vec<f32>, Vec<f32>)>;

/// What the forward pass keeps for the backward pass (in pooled buffers, returned on drop).
struct Saved {
    y1: Vec<f32>,
    y2: Vec<f32>,
    a2: Vec<f32>,
    y3: Vec<f32>,
    n0: Option<Norm>,
    n1: Norm,
    n2: Norm,
    geom: Geometry,
    hw: usize,
}

impl Drop for Saved {
    fn drop(&mut self) {
        for buf in [&mut self.y1, &mut self.y2, &mut self.a2, &mut self.y3] {
            give(std::mem::take(buf));
        }
    }
}

/// The op: inputs `x (B, cin, H, W)` and the flat parameters.
pub(crate) struct MbConvOp {
    spec: MbConvSpec,
    /// `Some` for fixed statistics: each norm's running `(mean, var)`, in block order.
    running: Option<BlockStats>,
    /// Written by a batch-statistics forward pass.
    stats: Arc<Mutex<BlockStats>>,
    saved: Mutex<Option<Saved>>,
    /// The 1×1 products' operand precision.
    precision: Precision,
    /// Whether a backward pass may follow (an input is tracked by autograd). Without one, the
    /// forward pass keeps nothing and, with fixed statistics, applies BN1 + ReLU6 as the depthwise
    /// stage stores its outputs, so the raw depthwise output never exists in memory.
    keep: bool,
    /// The 1×1 weights packed for BF16 products ahead of time (a frozen block's), if any.
    prepacked: Option<Arc<Prepacked>>,
    /// A fixed normalization + ReLU6 applied to the input as the depthwise stage reads it (a
    /// block without expansion or skip, at inference only): the previous layer's batch norm folded
    /// in, see [`MbConvOp::with_input`].
    input: Option<Norm>,
    /// Whether the banded FP32 pass may use the packed kernels (`packed.rs`) where they run; off
    /// only in tests, to check the `gemm` crate's path on machines that have both.
    pack_fp32: bool,
    /// `We` and `Wp` packed for those kernels ahead of time (a frozen block's), if any; otherwise
    /// the banded pass packs them on each call.
    fp32_weights: Option<Arc<(PackedF32, PackedF32)>>,
}

/// A block's two 1×1 weight matrices rounded and packed for a BF16 hardware backend once, so a
/// frozen network's forward passes skip that step.
#[derive(Debug)]
pub(crate) struct Prepacked {
    expand: Option<PackedLhs>,
    project: Option<PackedLhs>,
}

impl Prepacked {
    /// Packs the weights of `params` (laid out as [`MbConvSpec::layout`] says) for `backend`.
    pub(crate) fn new(params: &[f32], spec: MbConvSpec, backend: Bf16Backend) -> Self {
        let lay = spec.layout();
        Prepacked {
            expand: lay
                .expand
                .as_ref()
                .and_then(|we| PackedLhs::new(&View::rows(&params[we.clone()], spec.mid, spec.cin), backend)),
            project: PackedLhs::new(
                &View::rows(&params[lay.project.clone()], spec.cout, spec.mid),
                backend,
            ),
        }
    }
}

impl MbConvOp {
    pub(crate) fn new(
        spec: MbConvSpec,
        running: Option<BlockStats>,
        stats: Arc<Mutex<BlockStats>>,
        precision: Precision,
        keep: bool,
        prepacked: Option<Arc<Prepacked>>,
    ) -> Self {
        MbConvOp {
            spec,
            running,
            stats,
            saved: Mutex::new(None),
            precision,
            keep,
            prepacked,
            input: None,
            pack_fp32: true,
            fp32_weights: None,
        }
    }

    /// The op with `We` and `Wp` packed for the FP32 kernels ahead of time
    /// ([`PackedF32::block`] of its parameters).
    pub(crate) fn with_fp32_weights(mut self, packed: Option<Arc<(PackedF32, PackedF32)>>) -> Self {
        self.fp32_weights = packed;
        self
    }

    /// Whether the 1×1 products may run on the packed FP32 kernels: FP32 products (FP32 precision,
    /// or BF16 on the FP32 backend, which must give the FP32 answers exactly) and not turned off.
    pub(crate) fn packed_fp32(&self) -> bool {
        self.pack_fp32 && self.precision.fp32_products()
    }

    /// The op with the packed FP32 kernels off: the banded pass keeps the `gemm` crate's products.
    #[cfg(test)]
    pub(crate) fn without_packed_fp32(mut self) -> Self {
        self.pack_fp32 = false;
        self
    }

    fn geometry(&self, xs: &[usize], plen: usize) -> candle_core::Result<(usize, usize, usize, Geometry)> {
        let s = &self.spec;
        let &[b, c, h, w] = xs else {
            candle_core::bail!("inverted bottleneck: expected (B, C, H, W) input, got {xs:?}");
        };
        if c != s.cin || (!s.expand && s.mid != s.cin) || plen != s.layout().len {
            candle_core::bail!(
                "inverted bottleneck: input {xs:?} and {plen} parameters do not fit {s:?} ({} parameters)",
                s.layout().len
            );
        }
        let spec = DepthwiseSpec {
            kernel: s.kernel,
            stride: s.stride,
            padding: Padding::same(h, w, s.kernel, s.stride),
        };
        Ok((b, h, w, Geometry::of(&spec, b, s.mid, h, w)?))
    }

    /// The normalization of norm `i` over `y` (`runs` of `hw`): the batch's statistics (recorded
    /// for the caller) or the running ones.
    fn norm(
        &self,
        i: usize,
        moments: Option<Vec<(f64, f64)>>,
        gamma: &[f32],
        beta: &[f32],
        batch_stats: &mut BlockStats,
    ) -> Norm {
        match (&self.running, moments) {
            (Some(running), _) => {
                let (m, v) = &running[i];
                let stats: Vec<(f64, f64)> = m
                    .iter()
                    .zip(v)
                    .map(|(&m, &v)| (f64::from(m), f64::from(v)))
                    .collect();
                Norm::new(&stats, gamma, beta, self.spec.eps, false)
            }
            (None, Some(stats)) => {
                batch_stats.push((
                    stats.iter().map(|s| s.0 as f32).collect(),
                    stats.iter().map(|s| s.1 as f32).collect(),
                ));
                Norm::new(&stats, gamma, beta, self.spec.eps, true)
            }
            (None, None) => Norm::new(&vec![(0.0, 1.0); gamma.len()], gamma, beta, self.spec.eps, false),
        }
    }
}

impl MbConvOp {
    /// Applies `ReLU6(x · scale + shift)` per input channel as the depthwise stage reads the input,
    /// so the layer before need not write its normalized output. Only for a block without
    /// expansion or skip, in a pass that keeps nothing for a backward pass (the forward pass
    /// checks both).
    pub(crate) fn with_input(mut self, scale: Vec<f32>, shift: Vec<f32>) -> Self {
        let n = scale.len();
        self.input = Some(Norm {
            scale,
            shift,
            center: vec![0.0; n],
            invstd: vec![1.0; n],
            batch: false,
        });
        self
    }

    /// The expansion's product over `b` images of `hw` positions.
    fn expand_dims(&self, b: usize, hw: usize) -> Dims {
        let s = self.spec;
        Dims {
            b,
            cin: s.cin,
            cout: s.mid,
            n: hw,
            precision: self.precision,
        }
    }

    /// The projection's product over `b` images of `ohw` positions.
    fn project_dims(&self, b: usize, ohw: usize) -> Dims {
        let s = self.spec;
        Dims {
            b,
            cin: s.mid,
            cout: s.cout,
            n: ohw,
            precision: self.precision,
        }
    }

    /// The expansion weights `We (mid, cin)` of `params` as a product's left operand.
    fn expand_lhs<'a>(&'a self, params: &'a [f32], we: &Range<usize>) -> SharedLhs<'a> {
        let s = self.spec;
        let packed = self.prepacked.as_ref().and_then(|p| p.expand.as_ref());
        SharedLhs::prepacked(
            View::rows(&params[we.clone()], s.mid, s.cin),
            self.precision,
            packed,
        )
    }

    /// The projection weights `Wp (cout, mid)` of `params` as a product's left operand.
    fn project_lhs<'a>(&'a self, params: &'a [f32]) -> SharedLhs<'a> {
        let s = self.spec;
        let packed = self.prepacked.as_ref().and_then(|p| p.project.as_ref());
        let wp = &params[s.layout().project];
        SharedLhs::prepacked(View::rows(wp, s.cout, s.mid), self.precision, packed)
    }

    /// The block at inference, band by band of output rows (`banded.rs`): `(B, cout, H', W')`.
    /// Needs fixed statistics.
    pub(crate) fn banded(
        &self,
        x: &[f32],
        params: &[f32],
        b: usize,
        g: &Geometry,
        band_bytes: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let s = self.spec;
        let lay = s.layout();
        let mut unused = Vec::new();
        let mut norm = |i: usize, (gamma, beta): &(Range<usize>, Range<usize>)| {
            self.norm(
                i,
                None,
                &params[gamma.clone()],
                &params[beta.clone()],
                &mut unused,
            )
        };
        let n0 = lay.bn0.as_ref().map(|bn0| norm(0, bn0));
        let first = usize::from(n0.is_some());
        let (n1, n2) = (norm(first, &lay.bn1), norm(first + 1, &lay.bn2));
        let expand = match (&lay.expand, &n0) {
            (Some(we), Some(n0)) => Some((self.expand_lhs(params, we), n0)),
            _ => None,
        };
        let wd = &params[lay.depthwise.clone()];
        let filters = if banded::interleaved(g, s.expand) {
            std::borrow::Cow::Owned(g.interleave_filters(wd))
        } else {
            std::borrow::Cow::Borrowed(wd)
        };
        // The channels-last pass with FP32 products multiplies by weights packed for the kernels of
        // `packed.rs` (a frozen block's, or packed here for this call) where the processor runs them.
        let packed = (self.packed_fp32() && banded::channels_last(g, s.expand))
            .then(|| {
                self.fp32_weights
                    .clone()
                    .or_else(|| PackedF32::block(params, s).map(Arc::new))
            })
            .flatten();
        let pass = banded::Banded {
            spec: s,
            geom: *g,
            expand,
            project: self.project_lhs(params),
            filters: &filters,
            norms: [&n1, &n2],
            input: self.input.as_ref(),
            band_bytes,
            packed,
        };
        let mut out = take_output(b * s.cout * g.oh * g.ow);
        pass.forward(x, &mut out)?;
        Ok(out)
    }
}

/// The block's output from the projection `y3` (or `out` itself, in place, when `y3` is `None`):
/// `out = y3 · scale + shift` per channel of BN2, plus the block's input when `skip` is given.
fn project_out(out: &mut [f32], y3: Option<&[f32]>, skip: Option<&[f32]>, n2: &Norm, ohw: usize) {
    let ch = n2.scale.len();
    out.par_chunks_mut(ohw).enumerate().for_each(|(k, o)| {
        let (sc, sh) = (n2.scale[k % ch], n2.shift[k % ch]);
        let (y, xi) = (
            y3.map(|t| &t[k * ohw..(k + 1) * ohw]),
            skip.map(|t| &t[k * ohw..(k + 1) * ohw]),
        );
        simd(
            #[inline(always)]
            || bn_out(o, y, xi, sc, sh),
        )
    });
}

/// One output plane (or part of one) of BN2: `o = y · sc + sh` (from `o` itself, in place, when `y`
/// is `None`), plus the block's input `xi` when given.
#[inline(always)]
pub(crate) fn bn_out(o: &mut [f32], y: Option<&[f32]>, xi: Option<&[f32]>, sc: f32, sh: f32) {
    match (y, xi) {
        (Some(y), Some(xi)) => {
            for ((o, &y), &xv) in o.iter_mut().zip(y).zip(xi) {
                *o = y * sc + sh + xv;
            }
        }
        (Some(y), None) => o.iter_mut().zip(y).for_each(|(o, &y)| *o = y * sc + sh),
        (None, Some(xi)) => o.iter_mut().zip(xi).for_each(|(o, &xv)| *o = *o * sc + sh + xv),
        (None, None) => o.iter_mut().for_each(|o| *o = *o * sc + sh),
    }
}

/// BN0's scale and shift for channel `c` when expanding (else identity), for its backward pass.
#[inline(always)]
fn prologue(n0: Option<&Norm>, c: usize) -> (f32, f32) {
    match n0 {
        Some(n) => (n.scale[c], n.shift[c]),
        None => (1.0, 0.0),
    }
}

/// Fills the scratch of channel `c`'s plane, through BN0 + ReLU6 when expanding.
#[inline(always)]
pub(crate) fn fill_plane(g: &Geometry, n0: Option<&Norm>, c: usize, plane: &[f32], p: &mut [f32]) {
    match n0 {
        Some(n) => {
            let (sc, sh) = (n.scale[c], n.shift[c]);
            g.fill_scratch_with(
                plane,
                p,
                #[inline(always)]
                |v| (v * sc + sh).clamp(0.0, 6.0),
            );
        }
        None => g.fill_scratch_with(plane, p, |v| v),
    }
}

/// The depthwise output plane of channel `c` from its filled scratch, through BN1 + ReLU6 as it is
/// stored when `n1` is given.
#[inline(always)]
pub(crate) fn convolve_plane_bn(
    g: &Geometry,
    p: &[f32],
    filter: &[f32],
    out: &mut [f32],
    n1: Option<&Norm>,
    c: usize,
) {
    match n1 {
        Some(n) => {
            let (sc, sh) = (n.scale[c], n.shift[c]);
            g.convolve_plane_map(
                p,
                filter,
                out,
                #[inline(always)]
                |v| (v * sc + sh).clamp(0.0, 6.0),
            );
        }
        None => g.convolve_plane(p, filter, out),
    }
}

/// The scale and shift of `n` for the [`GROUP`] channels from `c0`, as arrays (held in registers).
#[inline(always)]
fn group_affine(n: &Norm, c0: usize) -> ([f32; GROUP], [f32; GROUP]) {
    let (mut sc, mut sh) = ([0.0f32; GROUP], [0.0f32; GROUP]);
    sc.copy_from_slice(&n.scale[c0..c0 + GROUP]);
    sh.copy_from_slice(&n.shift[c0..c0 + GROUP]);
    (sc, sh)
}

/// The depthwise output planes of the group starting at channel `c0` from its filled interleaved
/// scratch (`filters`: the group's interleaved filters), through BN1 + ReLU6 as they are stored
/// when `n1` is given.
#[inline(always)]
pub(crate) fn convolve_group_bn(
    g: &Geometry,
    q: &[f32],
    filters: &[f32],
    out: &mut [f32],
    n1: Option<&Norm>,
    c0: usize,
) {
    match n1 {
        Some(n) => {
            let (sc, sh) = group_affine(n, c0);
            g.convolve_group_map(
                q,
                filters,
                out,
                #[inline(always)]
                |acc| {
                    for i in 0..GROUP {
                        acc[i] = (acc[i] * sc[i] + sh[i]).clamp(0.0, 6.0);
                    }
                },
            );
        }
        None => g.convolve_group(q, filters, out),
    }
}

/// [`convolve_group_bn`] into channels-last output: position `p`'s values of the group's
/// [`GROUP`] channels go side by side to `out[p · stride..]` (one vector store each), through BN1 +
/// ReLU6.
#[inline(always)]
pub(crate) fn convolve_group_bn_channels_last(
    g: &Geometry,
    q: &[f32],
    filters: &[f32],
    out: &mut [f32],
    stride: usize,
    n1: &Norm,
    c0: usize,
) {
    let (sc, sh) = group_affine(n1, c0);
    g.convolve_group_with(
        q,
        filters,
        #[inline(always)]
        |pos, acc| {
            let o = &mut out[pos * stride..][..GROUP];
            for i in 0..GROUP {
                o[i] = (acc[i] * sc[i] + sh[i]).clamp(0.0, 6.0);
            }
        },
    );
}

/// Fills the interleaved scratch of the group starting at channel `c0` from channels-last values
/// (`src[p · stride..]` holds position `p`'s group), through BN0 + ReLU6.
#[inline(always)]
pub(crate) fn fill_group_channels_last(
    g: &Geometry,
    n0: &Norm,
    c0: usize,
    src: &[f32],
    stride: usize,
    q: &mut [f32],
) {
    let (sc, sh) = group_affine(n0, c0);
    g.fill_group_channels_last(src, stride, q, |lane, v| {
        (v * sc[lane] + sh[lane]).clamp(0.0, 6.0)
    });
}

/// Fills the interleaved scratch of the group of planes starting at channel `c0`, through BN0 +
/// ReLU6 when expanding.
#[inline(always)]
pub(crate) fn fill_group(g: &Geometry, n0: Option<&Norm>, c0: usize, planes: &[f32], q: &mut [f32]) {
    match n0 {
        Some(n) => {
            let (sc, sh) = (&n.scale[c0..c0 + GROUP], &n.shift[c0..c0 + GROUP]);
            g.fill_group(planes, q, |lane, v| (v * sc[lane] + sh[lane]).clamp(0.0, 6.0));
        }
        None => g.fill_group(planes, q, |_, v| v),
    }
}

/// From this many values of the expanded tensor (32 MB) on, the backward pass folds BN0's input
/// gradient into the expansion's products ([`pointwise::backward_through_norm`]) instead of
/// applying it in a pass of its own. Measured per block (`bench_blocks 224 32 --block S.R`, this
/// Xeon, alternated runs): the fold took 5-8% off the backward of blocks 2.1 and 2.2 (38 and 14
/// million values, where that pass runs at memory speed) but added 20% to block 6.2's (1.8
/// million values, in cache), whose extra `cin × cin` products cost more than the pass.
const FOLD_NORM_VALUES: usize = 8 << 20;

impl CustomOp2 for MbConvOp {
    fn name(&self) -> &'static str {
        "fracture-mbconv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.spec;
        let (x, params) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let (b, h, w, g) = self.geometry(l1.dims(), params.len())?;
        let lay = s.layout();
        let (hw, ohw, kk) = (h * w, g.oh * g.ow, s.kernel * s.kernel);
        let batch = self.running.is_none();
        let mut batch_stats = Vec::new();
        let mut norm_index = 0;
        if self.input.is_some() && (batch || self.keep || s.expand || s.skip()) {
            candle_core::bail!(
                "inverted bottleneck: an input normalization needs fixed statistics, no backward pass, no expansion and no skip"
            );
        }
        let packed = self.packed_fp32() && packed::available();
        if !batch && !self.keep && banded::applies(b, &g, s.expand, packed) {
            let out = self.banded(x, params, b, &g, banded::BAND_BYTES)?;
            return Ok((CpuStorage::F32(out), Shape::from((b, s.cout, g.oh, g.ow))));
        }

        // Expansion and BN0 (applied later, inside the depthwise stage).
        let (y1, n0) = match (&lay.expand, &lay.bn0) {
            (Some(we), Some((g0, b0))) => {
                let mut y1 = take(b * s.mid * hw);
                let dims = self.expand_dims(b, hw);
                let lhs = self.expand_lhs(params, we);
                let moments = if batch {
                    let runs = pointwise::forward_with_moments(x, &lhs, dims, &mut y1)?;
                    Some(norm::combine_moments(&runs, s.mid, hw))
                } else {
                    pointwise::forward_with(x, &lhs, dims, &mut y1)?;
                    None
                };
                let n0 = self.norm(
                    0,
                    moments,
                    &params[g0.clone()],
                    &params[b0.clone()],
                    &mut batch_stats,
                );
                norm_index = 1;
                (y1, Some(n0))
            }
            _ => (Vec::new(), self.input.clone()),
        };
        let a1_src: &[f32] = if s.expand { &y1 } else { x };

        // Depthwise, with BN0 + ReLU6 on the way in and each plane's moments on the way out; or,
        // with fixed statistics and no backward pass to follow, BN1 + ReLU6 on the way out.
        let wd = &params[lay.depthwise.clone()];
        let (g1, b1) = &lay.bn1;
        let fused_n1 = (!batch && !self.keep).then(|| {
            self.norm(
                norm_index,
                None,
                &params[g1.clone()],
                &params[b1.clone()],
                &mut batch_stats,
            )
        });
        let n1f = fused_n1.as_ref();
        let mut y2 = take(b * s.mid * ohw);
        let n0r = n0.as_ref();
        let moments: Vec<(f64, f64)> = if g.grouped() {
            let wt = g.interleave_filters(wd);
            y2.par_chunks_mut(GROUP * ohw)
                .zip(a1_src.par_chunks(GROUP * hw))
                .enumerate()
                .map(|(i, (out, planes))| {
                    let c0 = (i * GROUP) % s.mid;
                    let filters = &wt[c0 * kk..(c0 + GROUP) * kk];
                    with_scratch(&SCRATCH, g.group_scratch_len(), |q| {
                        simd(
                            #[inline(always)]
                            || {
                                fill_group(&g, n0r, c0, planes, q);
                                convolve_group_bn(&g, q, filters, out, n1f, c0);
                                out.chunks_exact(ohw)
                                    .map(|o| if batch { norm::run_moments(o) } else { (0.0, 0.0) })
                                    .collect::<Vec<_>>()
                            },
                        )
                    })
                })
                .collect::<Vec<_>>()
                .concat()
        } else {
            y2.par_chunks_mut(ohw)
                .zip(a1_src.par_chunks(hw))
                .enumerate()
                .map(|(i, (out, plane))| {
                    let c = i % s.mid;
                    let filter = &wd[c * kk..(c + 1) * kk];
                    with_scratch(&SCRATCH, g.scratch_len(), |p| {
                        simd(
                            #[inline(always)]
                            || {
                                fill_plane(&g, n0r, c, plane, p);
                                convolve_plane_bn(&g, p, filter, out, n1f, c);
                                if batch { norm::run_moments(out) } else { (0.0, 0.0) }
                            },
                        )
                    })
                })
                .collect()
        };
        let (y2, a2, n1) = match fused_n1 {
            Some(n1) => (Vec::new(), y2, n1),
            None => {
                let n1 = self.norm(
                    norm_index,
                    batch.then(|| norm::combine_moments(&moments, s.mid, ohw)),
                    &params[g1.clone()],
                    &params[b1.clone()],
                    &mut batch_stats,
                );
                let mut a2 = take(b * s.mid * ohw);
                norm::apply(&mut a2, &y2, &n1.scale, &n1.shift, ohw, Activation::Relu6);
                (y2, a2, n1)
            }
        };

        // Projection and BN2 (+ the input).
        let mut y3 = if self.keep {
            take(b * s.cout * ohw)
        } else {
            // Without a backward pass the projection's output is the block's.
            take_output(b * s.cout * ohw)
        };
        let dims = self.project_dims(b, ohw);
        let moments = if batch {
            let runs = pointwise::forward_with_moments(&a2, &self.project_lhs(params), dims, &mut y3)?;
            Some(norm::combine_moments(&runs, s.cout, ohw))
        } else {
            pointwise::forward_with(&a2, &self.project_lhs(params), dims, &mut y3)?;
            None
        };
        let (g2, b2) = &lay.bn2;
        let n2 = self.norm(
            norm_index + 1,
            moments,
            &params[g2.clone()],
            &params[b2.clone()],
            &mut batch_stats,
        );
        if batch && let Ok(mut slot) = self.stats.lock() {
            *slot = batch_stats;
        }
        let skip = s.skip().then_some(x);
        let shape = Shape::from((b, s.cout, g.oh, g.ow));
        if !self.keep {
            // Nothing is kept: BN2 (+ the input) in place, and the buffers go back to the pool.
            let mut out = y3;
            project_out(&mut out, None, skip, &n2, ohw);
            for buf in [y1, y2, a2] {
                give(buf);
            }
            return Ok((CpuStorage::F32(out), shape));
        }
        let mut out = take_output(b * s.cout * ohw);
        project_out(&mut out, Some(&y3), skip, &n2, ohw);
        if let Ok(mut slot) = self.saved.lock() {
            *slot = Some(Saved {
                y1,
                y2,
                a2,
                y3,
                n0,
                n1,
                n2,
                geom: g,
                hw,
            });
        }
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let s = self.spec;
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("inverted bottleneck: poisoned".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("inverted bottleneck: backward without a forward pass".into())
            })?;
        let grad = grad_res.contiguous()?;
        let x_tracked = x.track_op();
        let (xs, ps, gs) = (tensor_f32(x)?, tensor_f32(params)?, tensor_f32(&grad)?);
        let (x, params, dout) = (xs.slice()?, ps.slice()?, gs.slice()?);
        let lay = s.layout();
        let g = saved.geom;
        let (b, hw, ohw, kk) = (g.b, saved.hw, g.oh * g.ow, s.kernel * s.kernel);
        let mut dparams = vec![0.0f32; lay.len];

        // BN2.
        let (g2, b2) = &lay.bn2;
        let mut dy3 = take(dout.len());
        let grad2 = norm::backward_into(
            dout,
            &saved.y3,
            &saved.n2,
            &params[g2.clone()],
            ohw,
            Activation::None,
            &mut dy3,
        );
        dparams[g2.clone()].copy_from_slice(&grad2.dgamma);
        dparams[b2.clone()].copy_from_slice(&grad2.dbeta);

        // Projection.
        let mut da2 = take(b * s.mid * ohw);
        let dwp = pointwise::backward_into(
            &saved.a2,
            &params[lay.project.clone()],
            &dy3,
            self.project_dims(b, ohw),
            &mut da2,
        )?;
        give(dy3);
        dparams[lay.project.clone()].copy_from_slice(&dwp);

        // BN1 + ReLU6: only its sums here (a pass that reads da2 and y2); its input gradient dy2
        // is computed plane by plane in the depthwise stage below, into a per-thread buffer, so
        // da2 is neither masked in place nor written back.
        let (g1, b1) = &lay.bn1;
        let n1 = &saved.n1;
        let sums1 = norm::masked_sums(&da2, &saved.y2, n1, ohw, Activation::Relu6);
        let grad1 = NormGrad::new(n1, &params[g1.clone()], &sums1, ohw);
        dparams[g1.clone()].copy_from_slice(&grad1.dgamma);
        dparams[b1.clone()].copy_from_slice(&grad1.dbeta);
        let dy2_of = |dst: &mut [f32], at: usize, c: usize| {
            let (dy, y2) = (&da2[at..][..dst.len()], &saved.y2[at..][..dst.len()]);
            grad1.masked_input_grad_run(n1, dst, dy, y2, c, Activation::Relu6);
        };

        // Depthwise: filter gradients per plane, and the input gradient; when expanding, BN0's
        // ReLU6 mask and its per-plane sums while each plane is in cache.
        let wd = &params[lay.depthwise.clone()];
        let a1_src: &[f32] = if s.expand { &saved.y1 } else { x };
        // Without an expansion, the depthwise input gradient is the block's.
        let mut da1 = if s.expand {
            take(b * s.mid * hw)
        } else {
            take_output(b * s.mid * hw)
        };
        let mut dwd_planes = take(b * s.mid * kk);
        let n0 = saved.n0.as_ref();
        let turned = g.transposed();
        let sums: Vec<(f64, f64)> = if g.grouped() {
            let wt = g.interleave_filters(wd);
            da1.par_chunks_mut(GROUP * hw)
                .zip(dwd_planes.par_chunks_mut(GROUP * kk))
                .enumerate()
                .map(|(i, (dx, dw))| {
                    let c0 = (i * GROUP) % s.mid;
                    let filters = &wt[c0 * kk..(c0 + GROUP) * kk];
                    let planes = &a1_src[i * GROUP * hw..(i + 1) * GROUP * hw];
                    dw.fill(0.0);
                    with_scratch(&SCRATCH, g.group_scratch_len(), |q| {
                        with_scratch(&DSCRATCH, g.group_input_grad_scratch_len(), |dq| {
                            with_scratch(&ROW, g.group_dy_len(), |dyq| {
                                with_scratch(&GRAD, GROUP * ohw, |dy| {
                                    simd(
                                        #[inline(always)]
                                        || {
                                            for (lane, d) in dy.chunks_exact_mut(ohw).enumerate() {
                                                dy2_of(d, (i * GROUP + lane) * ohw, c0 + lane);
                                            }
                                            fill_group(&g, n0, c0, planes, q);
                                            g.backward_group(
                                                turned.as_ref(),
                                                q,
                                                filters,
                                                dy,
                                                dw,
                                                dx,
                                                dyq,
                                                dq,
                                            );
                                            dx.chunks_exact_mut(hw)
                                                .zip(planes.chunks_exact(hw))
                                                .enumerate()
                                                .map(|(lane, (d, p))| match n0 {
                                                    Some(n) => {
                                                        let c = c0 + lane;
                                                        norm::backward_sums_run(
                                                            d,
                                                            p,
                                                            n.scale[c],
                                                            n.shift[c],
                                                            n.center[c],
                                                            Activation::Relu6,
                                                        )
                                                    }
                                                    None => (0.0, 0.0),
                                                })
                                                .collect::<Vec<_>>()
                                        },
                                    )
                                })
                            })
                        })
                    })
                })
                .collect::<Vec<_>>()
                .concat()
        } else {
            da1.par_chunks_mut(hw)
                .zip(dwd_planes.par_chunks_mut(kk))
                .enumerate()
                .map(|(i, (dx_plane, dw_plane))| {
                    let c = i % s.mid;
                    let (sc, sh) = prologue(n0, c);
                    let filter = &wd[c * kk..(c + 1) * kk];
                    let plane = &a1_src[i * hw..(i + 1) * hw];
                    dw_plane.fill(0.0);
                    with_scratch(&SCRATCH, g.scratch_len(), |p| {
                        with_scratch(&DSCRATCH, g.input_grad_scratch_len(), |dp| {
                            with_scratch(&ROW, g.padded_row_len().max(g.padded_dy_len()), |row| {
                                with_scratch(&GRAD, ohw, |dy| {
                                    simd(
                                        #[inline(always)]
                                        || {
                                            dy2_of(dy, i * ohw, c);
                                            fill_plane(&g, n0, c, plane, p);
                                            g.filter_grad_plane(p, dy, dw_plane, row);
                                            g.input_grad_plane(
                                                turned.as_ref(),
                                                filter,
                                                dy,
                                                dx_plane,
                                                dp,
                                                row,
                                            );
                                            match n0 {
                                                Some(n) => norm::backward_sums_run(
                                                    dx_plane,
                                                    plane,
                                                    sc,
                                                    sh,
                                                    n.center[c],
                                                    Activation::Relu6,
                                                ),
                                                None => (0.0, 0.0),
                                            }
                                        },
                                    )
                                })
                            })
                        })
                    })
                })
                .collect()
        };
        give(da2);
        let dwd = &mut dparams[lay.depthwise.clone()];
        for image in dwd_planes.chunks_exact(s.mid * kk) {
            dwd.iter_mut().zip(image).for_each(|(a, v)| *a += v);
        }
        give(dwd_planes);

        // BN0 and the expansion; or the depthwise input gradient is the block's.
        let mut dx = match (&lay.expand, &lay.bn0, n0) {
            (Some(we), Some((g0, b0)), Some(n0)) => {
                // da1 holds BN0's masked gradient dz.
                let grad0 = NormGrad::new(n0, &params[g0.clone()], &sums, hw);
                dparams[g0.clone()].copy_from_slice(&grad0.dgamma);
                dparams[b0.clone()].copy_from_slice(&grad0.dbeta);
                // The input gradient only when autograd asks for it: the folded stem's input is
                // the image's patches, which need none (an empty `dx` skips its products).
                let mut dx = if x_tracked {
                    take_output(b * s.cin * hw)
                } else {
                    Vec::new()
                };
                let dims = self.expand_dims(b, hw);
                let w = &params[we.clone()];
                let dwe = if da1.len() >= FOLD_NORM_VALUES {
                    // BN0's input gradient applied inside the expansion's products: no pass over da1.
                    pointwise::backward_through_norm(x, w, &da1, &grad0, dims, &mut dx)?
                } else {
                    grad0.input_grad(&mut da1, &saved.y1, hw);
                    pointwise::backward_into(x, w, &da1, dims, &mut dx)?
                };
                give(da1);
                dparams[we.clone()].copy_from_slice(&dwe);
                dx
            }
            _ => da1,
        };
        if s.skip() && x_tracked {
            dx.par_chunks_mut(1 << 14)
                .zip(dout.par_chunks(1 << 14))
                .for_each(|(d, o)| d.iter_mut().zip(o).for_each(|(a, b)| *a += b));
        }
        drop(saved);
        let dev = x_device(&grad);
        let dx = if x_tracked {
            Some(Tensor::from_vec(dx, (b, s.cin, g.h, g.w), &dev)?)
        } else {
            give(dx);
            None
        };
        Ok((dx, Some(Tensor::from_vec(dparams, lay.len, &dev)?)))
    }
}

fn x_device(t: &Tensor) -> candle_core::Device {
    t.device().clone()
}
