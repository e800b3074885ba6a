//! The perceptual signature of one image: a 63-bit DCT sign hash of a fixed central view, and the
//! probes (the same hash of the image flipped, turned by 90°, rotated by up to ±10° and cropped by
//! up to a fifth) that find its copies.

use std::path::Path;

use image::GrayImage;
use ndarray::Array2;

use crate::{DecodeLimits, PreprocessConfig, Result};

/// Side of the square thumbnail every view is sampled from, in pixels.
pub const THUMBNAIL_SIDE: u32 = 48;
/// Side of one view, the input of the DCT, in pixels.
const VIEW: usize = 32;
/// The hash keeps the signs of the lowest `LOW × LOW` DCT coefficients, less the DC term: 63 bits.
const LOW: usize = 8;
/// The detail hash, which confirms a match, keeps the lowest `DETAIL × DETAIL`: 255 bits.
const DETAIL: usize = 16;
/// The share of the thumbnail's side the stored view covers (its centre): crops and rotations up to
/// ±10° keep this part of the picture.
const BASE_VIEW: f64 = 0.8;
/// Rotations the probes undo, in degrees (each with the crop a rotation of that angle needs to
/// lose its black corners), and plain crops (a share of [`BASE_VIEW`]).
const PROBE_ANGLES: [f64; 8] = [2.5, -2.5, 5.0, -5.0, 7.5, -7.5, 10.0, -10.0];
const PROBE_CROPS: [f64; 3] = [1.0, 0.9, 0.8];

/// Number of hash bits.
pub const HASH_BITS: u32 = (LOW * LOW - 1) as u32;
/// Number of detail-hash bits.
pub const DETAIL_BITS: u32 = (DETAIL * DETAIL - 1) as u32;
/// Views per signature: the plain crops and the rotations the probes undo.
const GEOMETRIES: usize = PROBE_CROPS.len() + PROBE_ANGLES.len();

/// The 255-bit detail hash of a view: the signs of its lowest 16 × 16 DCT coefficients but the DC
/// term, row-major (bit `v·16 + u − 1` of the 256).
pub type Detail = [u64; 4];

/// An image's signature: its fingerprint (the stored hash), its detail hash, and the probes that
/// look for copies of it among other fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// SHA-256 of the file's bytes: equal only for byte-identical files.
    pub sha256: [u8; 32],
    /// The 63-bit hash of the central view ([`HASH_BITS`] low bits used).
    pub fingerprint: u64,
    /// The 255-bit detail hash of the same view: a match found by the fingerprint is confirmed
    /// when the matching probe's detail is close to this.
    pub detail: Detail,
    /// The hashes of the views a flipped, turned, slightly rotated or cropped copy would show:
    /// probe `g·8 + n` is flip/turn `n` of view `g`; the fingerprint's own view is probe 0.
    pub probes: Vec<u64>,
    /// The detail hash of each view (before flips and turns).
    pub view_details: Vec<Detail>,
}

impl Signature {
    /// The detail hash of probe `k` (see [`Signature::probes`]).
    pub fn probe_detail(&self, k: usize) -> Detail {
        dihedral_bits(&self.view_details[k / 8], k % 8)
    }
}

/// Hamming distance between two hashes.
pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// Hamming distance between two detail hashes.
pub fn detail_distance(a: &Detail, b: &Detail) -> u32 {
    a.iter().zip(b).map(|(x, y)| hamming(*x, *y)).sum()
}

/// The signature of an image file's bytes: decoded as every other path decodes it (JPEG, PNG, TIFF,
/// DICOM, …, to 8-bit luma), resized to the [`THUMBNAIL_SIDE`] thumbnail, then hashed.
pub fn signature(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<Signature> {
    let thumbnail = PreprocessConfig::with_size(THUMBNAIL_SIDE).load_bytes(bytes, origin, limits)?;
    Ok(Signature {
        sha256: sha256(bytes),
        ..hashes(&thumbnail)
    })
}

/// The signature of a decoded image (no byte hash: all zeros).
pub fn signature_of_image(gray: &GrayImage) -> Result<Signature> {
    let thumbnail = PreprocessConfig::with_size(THUMBNAIL_SIDE).resize(gray)?;
    Ok(hashes(&thumbnail))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The signature of a `(side, side)` thumbnail (no byte hash).
fn hashes(thumbnail: &Array2<u8>) -> Signature {
    let dct = DctBasis::new();
    let mut geometries: Vec<(f64, f64)> = PROBE_CROPS.iter().map(|&c| (0.0, BASE_VIEW * c)).collect();
    for angle in PROBE_ANGLES {
        let rad = angle.abs().to_radians();
        // A square rotated by `angle` keeps no black corner inside its central 1 / (cos + sin).
        geometries.push((angle, BASE_VIEW / (rad.cos() + rad.sin())));
    }
    debug_assert_eq!(geometries.len(), GEOMETRIES);
    let view_details: Vec<Detail> = geometries
        .into_iter()
        .map(|(angle, share)| sign_bits(&dct.low(&view(thumbnail, angle, share))))
        .collect();
    let probes = view_details
        .iter()
        .flat_map(|d| {
            let transposed = transpose_bits(d);
            (0..8).map(move |n| coarse(&flipped(if n & 4 != 0 { &transposed } else { d }, n)))
        })
        .collect();
    Signature {
        sha256: [0; 32],
        fingerprint: coarse(&view_details[0]),
        detail: view_details[0],
        probes,
        view_details,
    }
}

/// The central `share` of the thumbnail rotated by `degrees` about its centre, sampled onto
/// `VIEW × VIEW` pixels (bilinear, edges clamped). The thumbnail is antialiased and the view covers
/// at least 0.64 of its side, so one sample per pixel does not alias.
fn view(thumbnail: &Array2<u8>, degrees: f64, share: f64) -> [f32; VIEW * VIEW] {
    let (h, w) = thumbnail.dim();
    let pixels = thumbnail
        .as_slice()
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| thumbnail.iter().copied().collect());
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (sin, cos, share) = (sin as f32, cos as f32, share as f32);
    let (wf, hf) = (w as f32, h as f32);
    let at = |x: f32, y: f32| -> f32 {
        let x = x.clamp(0.0, wf - 1.0);
        let y = y.clamp(0.0, hf - 1.0);
        let (x0, y0) = (x as usize, y as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let p = |yy: usize, xx: usize| f32::from(pixels[yy * w + xx]);
        (p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx) * (1.0 - fy)
            + (p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx) * fy
    };
    let mut out = [0f32; VIEW * VIEW];
    for i in 0..VIEW {
        // Position in the view, in units of the thumbnail's side, about its centre.
        let v = ((i as f32 + 0.5) / VIEW as f32 - 0.5) * share;
        for j in 0..VIEW {
            let u = ((j as f32 + 0.5) / VIEW as f32 - 0.5) * share;
            let (x, y) = (u * cos - v * sin, u * sin + v * cos);
            out[i * VIEW + j] = at((x + 0.5) * wf - 0.5, (y + 0.5) * hf - 0.5);
        }
    }
    out
}

/// The DCT-II basis rows `0..DETAIL` over `VIEW` samples (unnormalised: only signs are kept).
struct DctBasis([[f32; VIEW]; DETAIL]);

impl DctBasis {
    fn new() -> Self {
        let mut rows = [[0f32; VIEW]; DETAIL];
        for (k, row) in rows.iter_mut().enumerate() {
            for (n, value) in row.iter_mut().enumerate() {
                *value =
                    (std::f64::consts::PI * (2 * n + 1) as f64 * k as f64 / (2 * VIEW) as f64).cos() as f32;
            }
        }
        DctBasis(rows)
    }

    /// The `DETAIL × DETAIL` lowest coefficients `c[v][u]` (vertical frequency `v`, horizontal `u`).
    fn low(&self, x: &[f32; VIEW * VIEW]) -> [[f32; DETAIL]; DETAIL] {
        // Rows first, r[y][u] = Σx x[y][x] d[u][x], then columns, c[v][u] = Σy d[v][y] r[y][u]; the
        // inner loops run over `u`, contiguous and independent, so they vectorise.
        let mut transposed = [[0f32; DETAIL]; VIEW];
        for (u, row) in self.0.iter().enumerate() {
            for (n, &value) in row.iter().enumerate() {
                transposed[n][u] = value;
            }
        }
        let mut rows = [[0f32; DETAIL]; VIEW];
        for (y, r) in rows.iter_mut().enumerate() {
            for (xi, basis) in transposed.iter().enumerate() {
                let value = x[y * VIEW + xi];
                for (acc, b) in r.iter_mut().zip(basis) {
                    *acc += value * b;
                }
            }
        }
        let mut c = [[0f32; DETAIL]; DETAIL];
        for (v, out) in c.iter_mut().enumerate() {
            for (y, r) in rows.iter().enumerate() {
                let weight = self.0[v][y];
                for (acc, value) in out.iter_mut().zip(r) {
                    *acc += weight * value;
                }
            }
        }
        c
    }
}

/// One bit per coefficient but the DC term, row-major: set where the coefficient is positive.
fn sign_bits(c: &[[f32; DETAIL]; DETAIL]) -> Detail {
    let mut bits = [0u64; 4];
    for (i, value) in c.iter().flatten().skip(1).enumerate() {
        if *value > 0.0 {
            bits[i / 64] |= 1 << (i % 64);
        }
    }
    bits
}

fn bit(d: &Detail, v: usize, u: usize) -> bool {
    let i = v * DETAIL + u - 1;
    d[i / 64] >> (i % 64) & 1 == 1
}

/// The detail bits of the coefficients whose horizontal (`U`) or vertical (`V`) frequency is odd.
const ODD_U: Detail = odd_mask(true);
const ODD_V: Detail = odd_mask(false);

const fn odd_mask(horizontal: bool) -> Detail {
    let mut out = [0u64; 4];
    let mut i = 0;
    while i < DETAIL * DETAIL - 1 {
        let (v, u) = ((i + 1) / DETAIL, (i + 1) % DETAIL);
        let odd = if horizontal { u % 2 == 1 } else { v % 2 == 1 };
        if odd {
            out[i / 64] |= 1 << (i % 64);
        }
        i += 1;
    }
    out
}

/// The detail bits with `u` and `v` swapped (the transposed view).
fn transpose_bits(d: &Detail) -> Detail {
    let mut out = [0u64; 4];
    for v in 0..DETAIL {
        for u in 0..DETAIL {
            if (u, v) != (0, 0) && bit(d, u, v) {
                let i = v * DETAIL + u - 1;
                out[i / 64] |= 1 << (i % 64);
            }
        }
    }
    out
}

/// The detail hash of flip/turn `n` of a view from the view's own (`n`: bit 2 transpose, bit 1
/// mirror the columns, bit 0 mirror the rows). Mirroring the columns multiplies `c[v][u]` by
/// `(−1)^u`, the rows by `(−1)^v`, and transposing swaps `u` and `v`: exact for the DCT-II, so a
/// sign bit is moved and, for an odd frequency, inverted.
fn dihedral_bits(d: &Detail, n: usize) -> Detail {
    let base = if n & 4 != 0 { transpose_bits(d) } else { *d };
    flipped(&base, n)
}

/// `base` (already transposed where `n` says so) with the mirrorings of `n` applied.
fn flipped(base: &Detail, n: usize) -> Detail {
    let mut out = *base;
    for k in 0..4 {
        if n & 2 != 0 {
            out[k] ^= ODD_U[k];
        }
        if n & 1 != 0 {
            out[k] ^= ODD_V[k];
        }
    }
    out
}

/// The 63-bit hash: the detail bits of the lowest `LOW × LOW` coefficients.
fn coarse(d: &Detail) -> u64 {
    let mut hash = 0u64;
    let mut k = 0;
    for v in 0..LOW {
        for u in 0..LOW {
            if u == 0 && v == 0 {
                continue;
            }
            if bit(d, v, u) {
                hash |= 1 << k;
            }
            k += 1;
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thumbnail(f: impl Fn(usize, usize) -> u8) -> Array2<u8> {
        Array2::from_shape_fn((THUMBNAIL_SIDE as usize, THUMBNAIL_SIDE as usize), |(y, x)| {
            f(y, x)
        })
    }

    /// The pixels of flip/turn `n` of a view (as [`dihedral_bits`] numbers them).
    fn transform(base: &[f32; VIEW * VIEW], n: usize) -> [f32; VIEW * VIEW] {
        let side = VIEW;
        let mut out = [0f32; VIEW * VIEW];
        for y in 0..side {
            for x in 0..side {
                let (mut sx, mut sy) = (x, y);
                if n & 1 != 0 {
                    sy = side - 1 - sy;
                }
                if n & 2 != 0 {
                    sx = side - 1 - sx;
                }
                let (ty, tx) = if n & 4 != 0 { (sx, sy) } else { (sy, sx) };
                out[y * side + x] = base[ty * side + tx];
            }
        }
        out
    }

    #[test]
    fn the_flipped_detail_bits_are_those_of_the_flipped_views() {
        let t = thumbnail(|y, x| ((x * 7 + y * y * 3 + (x * y) % 11) % 251) as u8);
        let dct = DctBasis::new();
        let base = view(&t, 0.0, 1.0);
        let bits = sign_bits(&dct.low(&base));
        for n in 0..8 {
            let direct = sign_bits(&dct.low(&transform(&base, n)));
            let derived = dihedral_bits(&bits, n);
            // Coefficients within rounding of zero may differ in sign: allow a few bits.
            assert!(detail_distance(&direct, &derived) <= 3, "variant {n}");
        }
    }

    #[test]
    fn brightness_and_contrast_do_not_change_the_hash() {
        let t = thumbnail(|y, x| {
            (40 + (x * 3 + y * 2) % 120 + if (x / 12 + y / 9) % 2 == 0 { 30 } else { 0 }) as u8
        });
        let brighter = t.mapv(|v| (f64::from(v) * 1.3 + 10.0) as u8);
        assert_eq!(hashes(&t).fingerprint, hashes(&brighter).fingerprint);
    }

    #[test]
    fn probes_hold_the_fingerprint_and_detail_of_a_mirrored_copy() {
        let t = thumbnail(|y, x| ((x * x + 5 * y) % 200) as u8);
        let mut mirrored = t.clone();
        mirrored.invert_axis(ndarray::Axis(1));
        let original = hashes(&t);
        let copy = hashes(&mirrored);
        let k = original
            .probes
            .iter()
            .position(|&p| p == copy.fingerprint)
            .unwrap();
        assert!(detail_distance(&original.probe_detail(k), &copy.detail) <= 3);
        assert_eq!(original.probes[0], original.fingerprint);
    }
}
