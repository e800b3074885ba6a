//! The perceptual signature of one image: a 63-bit DCT sign hash of a fixed central view, and the
//! probes (the same hash of the image flipped, turned by 90°, rotated by up to ±10° and cropped by
//! up to a fifth) that find its copies.

use std::path::Path;

use image::GrayImage;
use ndarray::Array2;

use crate::{DecodeLimits, PreprocessConfig, Result};

/// Side of the square thumbnail every view is sampled from, in pixels.
pub const THUMBNAIL_SIDE: u32 = 96;
/// Side of one view, the input of the DCT, in pixels.
const VIEW: usize = 32;
/// The hash keeps the signs of the lowest `LOW × LOW` DCT coefficients, less the DC term: 63 bits.
const LOW: usize = 8;
/// The share of the thumbnail's side the stored view covers (its centre): crops and rotations up to
/// ±10° keep this part of the picture.
const BASE_VIEW: f64 = 0.8;
/// Rotations the probes undo, in degrees (each with the crop a rotation of that angle needs to
/// lose its black corners), and plain crops (a share of [`BASE_VIEW`]).
const PROBE_ANGLES: [f64; 8] = [2.5, -2.5, 5.0, -5.0, 7.5, -7.5, 10.0, -10.0];
const PROBE_CROPS: [f64; 3] = [1.0, 0.9, 0.8];

/// Number of hash bits.
pub const HASH_BITS: u32 = (LOW * LOW - 1) as u32;

/// An image's signature: its fingerprint (the stored hash) and the probes that look for copies of
/// it among other fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// SHA-256 of the file's bytes: equal only for byte-identical files.
    pub sha256: [u8; 32],
    /// The 63-bit hash of the central view ([`HASH_BITS`] low bits used).
    pub fingerprint: u64,
    /// The hashes of the views a flipped, turned, slightly rotated or cropped copy would show,
    /// deduplicated; the fingerprint's own view is among them.
    pub probes: Vec<u64>,
}

/// Hamming distance between two hashes.
pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// The signature of an image file's bytes: decoded as every other path decodes it (JPEG, PNG, TIFF,
/// DICOM, …, to 8-bit luma), resized to the [`THUMBNAIL_SIDE`] thumbnail, then hashed.
pub fn signature(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<Signature> {
    let thumbnail = PreprocessConfig::with_size(THUMBNAIL_SIDE).load_bytes(bytes, origin, limits)?;
    let (fingerprint, probes) = hashes(&thumbnail);
    Ok(Signature {
        sha256: sha256(bytes),
        fingerprint,
        probes,
    })
}

/// The signature of a decoded image (no byte hash: all zeros).
pub fn signature_of_image(gray: &GrayImage) -> Result<Signature> {
    let thumbnail = PreprocessConfig::with_size(THUMBNAIL_SIDE).resize(gray)?;
    let (fingerprint, probes) = hashes(&thumbnail);
    Ok(Signature {
        sha256: [0; 32],
        fingerprint,
        probes,
    })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The fingerprint and the probes of a `(side, side)` thumbnail.
fn hashes(thumbnail: &Array2<u8>) -> (u64, Vec<u64>) {
    let dct = DctBasis::new();
    let fingerprint = sign_hash(&dct.low(&view(thumbnail, 0.0, BASE_VIEW)));
    let mut geometries: Vec<(f64, f64)> = PROBE_CROPS.iter().map(|&c| (0.0, BASE_VIEW * c)).collect();
    for angle in PROBE_ANGLES {
        let rad = angle.abs().to_radians();
        // A square rotated by `angle` keeps no black corner inside its central 1 / (cos + sin).
        geometries.push((angle, BASE_VIEW / (rad.cos() + rad.sin())));
    }
    let mut probes = Vec::with_capacity(geometries.len() * 8);
    for (angle, share) in geometries {
        let coefficients = dct.low(&view(thumbnail, angle, share));
        probes.extend(dihedral(&coefficients).iter().map(sign_hash));
    }
    probes.sort_unstable();
    probes.dedup();
    (fingerprint, probes)
}

/// The central `share` of the thumbnail rotated by `degrees` about its centre, sampled onto
/// `VIEW × VIEW` pixels (2 × 2 bilinear samples per pixel, edges clamped).
fn view(thumbnail: &Array2<u8>, degrees: f64, share: f64) -> [f32; VIEW * VIEW] {
    let (h, w) = thumbnail.dim();
    let (sin, cos) = degrees.to_radians().sin_cos();
    let at = |x: f64, y: f64| -> f64 {
        let x = x.clamp(0.0, (w - 1) as f64);
        let y = y.clamp(0.0, (h - 1) as f64);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (x - x0 as f64, y - y0 as f64);
        let p = |yy: usize, xx: usize| f64::from(thumbnail[[yy, xx]]);
        (p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx) * (1.0 - fy)
            + (p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx) * fy
    };
    let mut out = [0f32; VIEW * VIEW];
    for i in 0..VIEW {
        for j in 0..VIEW {
            let mut sum = 0.0;
            for (si, sj) in [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)] {
                // Position in the view, in units of the thumbnail's side, about its centre.
                let u = ((j as f64 + sj) / VIEW as f64 - 0.5) * share;
                let v = ((i as f64 + si) / VIEW as f64 - 0.5) * share;
                let (x, y) = (u * cos - v * sin, u * sin + v * cos);
                sum += at((x + 0.5) * w as f64 - 0.5, (y + 0.5) * h as f64 - 0.5);
            }
            out[i * VIEW + j] = (sum / 4.0) as f32;
        }
    }
    out
}

/// The DCT-II basis rows `0..LOW` over `VIEW` samples (unnormalised: only signs are kept).
struct DctBasis([[f32; VIEW]; LOW]);

impl DctBasis {
    fn new() -> Self {
        let mut rows = [[0f32; VIEW]; LOW];
        for (k, row) in rows.iter_mut().enumerate() {
            for (n, value) in row.iter_mut().enumerate() {
                *value =
                    (std::f64::consts::PI * (2 * n + 1) as f64 * k as f64 / (2 * VIEW) as f64).cos() as f32;
            }
        }
        DctBasis(rows)
    }

    /// The `LOW × LOW` lowest coefficients `c[v][u]` (vertical frequency `v`, horizontal `u`).
    fn low(&self, x: &[f32; VIEW * VIEW]) -> [[f32; LOW]; LOW] {
        // Rows first: r[y][u] = Σx x[y][x] d[u][x]; then columns: c[v][u] = Σy d[v][y] r[y][u].
        let mut rows = [[0f32; LOW]; VIEW];
        for (y, r) in rows.iter_mut().enumerate() {
            let line = &x[y * VIEW..(y + 1) * VIEW];
            for (u, value) in r.iter_mut().enumerate() {
                *value = line.iter().zip(&self.0[u]).map(|(a, b)| a * b).sum();
            }
        }
        let mut c = [[0f32; LOW]; LOW];
        for (v, out) in c.iter_mut().enumerate() {
            for (u, value) in out.iter_mut().enumerate() {
                *value = (0..VIEW).map(|y| self.0[v][y] * rows[y][u]).sum();
            }
        }
        c
    }
}

/// The coefficients of the eight flips and quarter turns of a view, from its own: mirroring the
/// columns multiplies `c[v][u]` by `(−1)^u`, the rows by `(−1)^v`, and transposing swaps `u` and `v`
/// (exact for the DCT-II).
fn dihedral(c: &[[f32; LOW]; LOW]) -> [[[f32; LOW]; LOW]; 8] {
    let sign = |k: usize, flip: bool| if flip && k % 2 == 1 { -1.0 } else { 1.0 };
    let mut out = [[[0f32; LOW]; LOW]; 8];
    for (n, variant) in out.iter_mut().enumerate() {
        let (transpose, flip_x, flip_y) = (n & 4 != 0, n & 2 != 0, n & 1 != 0);
        for (v, row) in variant.iter_mut().enumerate() {
            for (u, value) in row.iter_mut().enumerate() {
                let source = if transpose { c[u][v] } else { c[v][u] };
                *value = source * sign(u, flip_x) * sign(v, flip_y);
            }
        }
    }
    out
}

/// One bit per coefficient but the DC term, row-major: set where the coefficient is positive.
fn sign_hash(c: &[[f32; LOW]; LOW]) -> u64 {
    let mut hash = 0u64;
    for (i, value) in c.iter().flatten().skip(1).enumerate() {
        if *value > 0.0 {
            hash |= 1 << i;
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

    #[test]
    fn the_dihedral_coefficients_are_those_of_the_flipped_views() {
        let t = thumbnail(|y, x| ((x * 7 + y * y * 3 + (x * y) % 11) % 251) as u8);
        let dct = DctBasis::new();
        let base = view(&t, 0.0, 1.0);
        let c = dct.low(&base);
        let variants = dihedral(&c);
        let side = VIEW;
        let transform = |n: usize| -> [f32; VIEW * VIEW] {
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
        };
        for (n, variant) in variants.iter().enumerate() {
            let direct = dct.low(&transform(n));
            for (a, b) in direct.iter().flatten().zip(variant.iter().flatten()) {
                assert!((a - b).abs() < 1e-2 * (1.0 + a.abs()), "variant {n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn brightness_and_contrast_do_not_change_the_hash() {
        let t = thumbnail(|y, x| {
            (40 + (x * 3 + y * 2) % 120 + if (x / 12 + y / 9) % 2 == 0 { 30 } else { 0 }) as u8
        });
        let brighter = t.mapv(|v| (f64::from(v) * 1.3 + 10.0) as u8);
        assert_eq!(hashes(&t).0, hashes(&brighter).0);
    }

    #[test]
    fn probes_hold_the_fingerprint_of_a_mirrored_copy() {
        let t = thumbnail(|y, x| ((x * x + 5 * y) % 200) as u8);
        let mut mirrored = t.clone();
        mirrored.invert_axis(ndarray::Axis(1));
        let (_, probes) = hashes(&t);
        let (fingerprint, _) = hashes(&mirrored);
        assert!(probes.contains(&fingerprint));
    }
}
