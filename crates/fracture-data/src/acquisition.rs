//! How an image changes when another hospital takes it: the building blocks of the acquisition
//! augmentation (blur, noise, JPEG re-encoding, lower resolution, on `(H, W)` f32 images in
//! [0, 1]) and the fixed, seeded [`Shift`]s of the evaluation suite (the same kinds plus zoom,
//! padding, aspect ratio, gamma and contrast, on a decoded full-resolution luma image, before
//! preprocessing).

use std::io::Cursor;

use image::{GrayImage, ImageBuffer, Luma};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Blurs `image` in place with a Gaussian of standard deviation `sigma` pixels (separable,
/// radius ⌈3σ⌉, edges repeated). A `sigma` of 0 or less leaves it unchanged.
pub fn gaussian_blur(image: &mut Array2<f32>, sigma: f32) {
    if sigma <= 0.0 || !sigma.is_finite() {
        return;
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let (h, w) = image.dim();
    let mut tmp = Array2::<f32>::zeros((h, w));
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, weight) in kernel.iter().enumerate() {
                let sx = (x as isize + k as isize - radius).clamp(0, w as isize - 1) as usize;
                acc += weight * image[[y, sx]];
            }
            tmp[[y, x]] = acc;
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, weight) in kernel.iter().enumerate() {
                let sy = (y as isize + k as isize - radius).clamp(0, h as isize - 1) as usize;
                acc += weight * tmp[[sy, x]];
            }
            image[[y, x]] = acc;
        }
    }
}

/// Adds Gaussian noise of standard deviation `sigma` (in units of the full range) to every pixel,
/// drawn from a ChaCha8 stream seeded with `seed`, and clamps to [0, 1].
pub fn add_noise(image: &mut Array2<f32>, sigma: f32, seed: u64) {
    if sigma <= 0.0 || !sigma.is_finite() {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for v in image.iter_mut() {
        // Box-Muller: one standard normal from two uniforms in (0, 1].
        let u1: f32 = 1.0 - rng.random::<f32>();
        let u2: f32 = rng.random();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
        *v = (*v + sigma * z).clamp(0.0, 1.0);
    }
}

/// Encodes `image` as a baseline JPEG of `quality` (1-100) and decodes it again, in place, as a
/// scanner or PACS that stores lossy JPEG would.
pub fn jpeg_round_trip(image: &mut Array2<f32>, quality: u8) -> Result<()> {
    let gray = to_gray(image);
    let jpeg = encode_jpeg(&gray, quality)?;
    let back = decode_jpeg(&jpeg)?;
    for (v, p) in image.iter_mut().zip(back.as_raw()) {
        *v = f32::from(*p) / 255.0;
    }
    Ok(())
}

/// Scales `image` down to `factor` of its side (antialiased) and back up (bilinear), in place: the
/// detail a lower-resolution detector or a downsampled archive loses. `factor` in (0, 1].
pub fn resolution_round_trip(image: &mut Array2<f32>, factor: f32) {
    if !(factor > 0.0 && factor < 1.0) {
        return;
    }
    let (h, w) = image.dim();
    let buf: ImageBuffer<Luma<f32>, Vec<f32>> =
        match ImageBuffer::from_raw(w as u32, h as u32, image.iter().copied().collect()) {
            Some(b) => b,
            None => return,
        };
    let (sw, sh) = (
        ((w as f32 * factor).round() as u32).max(1),
        ((h as f32 * factor).round() as u32).max(1),
    );
    let small = image::imageops::resize(&buf, sw, sh, image::imageops::FilterType::Triangle);
    let back = image::imageops::resize(&small, w as u32, h as u32, image::imageops::FilterType::Triangle);
    for (v, p) in image.iter_mut().zip(back.as_raw()) {
        *v = p.clamp(0.0, 1.0);
    }
}

fn to_gray(image: &Array2<f32>) -> GrayImage {
    let (h, w) = image.dim();
    let raw = image
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    GrayImage::from_raw(w as u32, h as u32, raw).unwrap_or_else(|| GrayImage::new(w as u32, h as u32))
}

fn to_unit_array(gray: &GrayImage) -> Array2<f32> {
    let (w, h) = gray.dimensions();
    Array2::from_shape_fn((h as usize, w as usize), |(y, x)| {
        f32::from(gray.get_pixel(x as u32, y as u32)[0]) / 255.0
    })
}

fn encode_jpeg(gray: &GrayImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
    image::ImageEncoder::write_image(
        encoder,
        gray.as_raw(),
        gray.width(),
        gray.height(),
        image::ExtendedColorType::L8,
    )
    .map_err(|source| Error::Decode {
        path: "<jpeg re-encoding>".into(),
        source,
    })?;
    Ok(out)
}

fn decode_jpeg(bytes: &[u8]) -> Result<GrayImage> {
    image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::Jpeg)
        .decode()
        .map(|i| i.to_luma8())
        .map_err(|source| Error::Decode {
            path: "<jpeg re-encoding>".into(),
            source,
        })
}

/// One acquisition shift of the evaluation suite, applied to the decoded image before the model's
/// own preprocessing. Every shift is fixed (the same strength for every image); noise is seeded
/// per image, so a suite run is reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shift {
    /// A central crop keeping `keep` of each side (a tighter view: the anatomy appears larger).
    ZoomIn {
        /// Share of the width and height kept, in (0, 1].
        keep: f32,
    },
    /// The image centred on a black canvas `pad` times its size (a wider view: smaller anatomy).
    ZoomOut {
        /// Canvas side relative to the image, ≥ 1.
        pad: f32,
    },
    /// Down to `factor` of the side (antialiased) and back up (bilinear).
    LowResolution {
        /// Scale factor in (0, 1].
        factor: f32,
    },
    /// `v ↦ v^gamma` on values in [0, 1]: another exposure curve.
    Gamma {
        /// The exponent, > 0.
        gamma: f32,
    },
    /// Distances from the image mean scaled by `factor` (0.7 = 30% less contrast).
    Contrast {
        /// The factor, > 0.
        factor: f32,
    },
    /// A Gaussian blur whose standard deviation is `sigma` times the longer side.
    Blur {
        /// Standard deviation as a share of the longer side.
        sigma: f32,
    },
    /// Gaussian noise of standard deviation `sigma` (share of the full range), seeded per image.
    Noise {
        /// Standard deviation in [0, 1].
        sigma: f32,
    },
    /// Re-encoded as JPEG of this quality.
    Jpeg {
        /// JPEG quality, 1-100.
        quality: u8,
    },
    /// The width scaled by `ratio` with the height kept: the natural aspect ratio of a detector
    /// instead of FracAtlas's square-stretched images (below 1: a portrait image).
    Aspect {
        /// Width factor, > 0.
        ratio: f32,
    },
}

impl Shift {
    /// The suite `fracture eval --shifts` runs, in this order: zoom in to 80% and 60% of the side,
    /// zoom out to 1.5×, resolution down to 1/3 and back, gamma 0.7 and 1.4, contrast −30% and
    /// +30%, blur (σ = 0.4% of the side, ≈ 2.6 px on a 640-px image), noise (σ = 3% of the range),
    /// JPEG quality 30, and a portrait aspect ratio (width × 0.75) instead of the stretched square.
    pub fn suite() -> Vec<Shift> {
        vec![
            Shift::ZoomIn { keep: 0.8 },
            Shift::ZoomIn { keep: 0.6 },
            Shift::ZoomOut { pad: 1.5 },
            Shift::LowResolution { factor: 1.0 / 3.0 },
            Shift::Gamma { gamma: 0.7 },
            Shift::Gamma { gamma: 1.4 },
            Shift::Contrast { factor: 0.7 },
            Shift::Contrast { factor: 1.3 },
            Shift::Blur { sigma: 0.004 },
            Shift::Noise { sigma: 0.03 },
            Shift::Jpeg { quality: 30 },
            Shift::Aspect { ratio: 0.75 },
        ]
    }

    /// A short name for tables and charts, e.g. `zoom in 60%`.
    pub fn name(&self) -> String {
        match *self {
            Shift::ZoomIn { keep } => format!("zoom in {:.0}%", keep * 100.0),
            Shift::ZoomOut { pad } => format!("zoom out {pad:.1}x"),
            Shift::LowResolution { factor } => format!("resolution 1/{:.0}", 1.0 / factor),
            Shift::Gamma { gamma } => format!("gamma {gamma:.1}"),
            Shift::Contrast { factor } => format!("contrast {:+.0}%", (factor - 1.0) * 100.0),
            Shift::Blur { sigma } => format!("blur {:.1}% of side", sigma * 100.0),
            Shift::Noise { sigma } => format!("noise {:.0}%", sigma * 100.0),
            Shift::Jpeg { quality } => format!("JPEG q{quality}"),
            Shift::Aspect { ratio } => format!("aspect {ratio:.2}"),
        }
    }

    /// Checks the strength, naming the shift when it is out of range.
    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            Shift::ZoomIn { keep } => keep > 0.0 && keep <= 1.0,
            Shift::ZoomOut { pad } => (1.0..=8.0).contains(&pad),
            Shift::LowResolution { factor } => factor > 0.0 && factor <= 1.0,
            Shift::Gamma { gamma } => gamma > 0.0 && gamma <= 10.0,
            Shift::Contrast { factor } => factor > 0.0 && factor <= 10.0,
            Shift::Blur { sigma } => (0.0..=0.1).contains(&sigma),
            Shift::Noise { sigma } => (0.0..=1.0).contains(&sigma),
            Shift::Jpeg { quality } => (1..=100).contains(&quality),
            Shift::Aspect { ratio } => ratio > 0.05 && ratio <= 20.0,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                field: "shift",
                reason: format!("{self:?} is out of range"),
            })
        }
    }

    /// Applies the shift to a decoded luma image; `seed` seeds the noise (use one per image).
    pub fn apply(&self, gray: &GrayImage, seed: u64) -> Result<GrayImage> {
        self.validate()?;
        let (w, h) = gray.dimensions();
        let resize = |nw: u32, nh: u32| {
            image::imageops::resize(gray, nw.max(1), nh.max(1), image::imageops::FilterType::Triangle)
        };
        Ok(match *self {
            Shift::ZoomIn { keep } => {
                let (cw, ch) = (
                    ((w as f32 * keep).round() as u32).clamp(1, w),
                    ((h as f32 * keep).round() as u32).clamp(1, h),
                );
                image::imageops::crop_imm(gray, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image()
            }
            Shift::ZoomOut { pad } => {
                let (nw, nh) = ((w as f32 * pad).round() as u32, (h as f32 * pad).round() as u32);
                let mut canvas = GrayImage::new(nw.max(w), nh.max(h));
                image::imageops::replace(
                    &mut canvas,
                    gray,
                    i64::from((nw.max(w) - w) / 2),
                    i64::from((nh.max(h) - h) / 2),
                );
                canvas
            }
            Shift::Aspect { ratio } => resize((w as f32 * ratio).round() as u32, h),
            Shift::LowResolution { factor } => {
                let mut a = to_unit_array(gray);
                resolution_round_trip(&mut a, factor);
                to_gray(&a)
            }
            Shift::Gamma { gamma } => {
                let mut out = gray.clone();
                out.pixels_mut().for_each(|p| {
                    p[0] = ((f32::from(p[0]) / 255.0).powf(gamma) * 255.0).round() as u8;
                });
                out
            }
            Shift::Contrast { factor } => {
                let n = (w as f64 * h as f64).max(1.0);
                let mean = gray.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let mean = mean as f32;
                let mut out = gray.clone();
                out.pixels_mut().for_each(|p| {
                    p[0] = ((f32::from(p[0]) - mean) * factor + mean)
                        .round()
                        .clamp(0.0, 255.0) as u8;
                });
                out
            }
            Shift::Blur { sigma } => {
                let mut a = to_unit_array(gray);
                gaussian_blur(&mut a, sigma * w.max(h) as f32);
                to_gray(&a)
            }
            Shift::Noise { sigma } => {
                let mut a = to_unit_array(gray);
                add_noise(&mut a, sigma, seed);
                to_gray(&a)
            }
            Shift::Jpeg { quality } => decode_jpeg(&encode_jpeg(gray, quality)?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| Luma([((x * 5 + y * 3) % 256) as u8]))
    }

    #[test]
    fn geometric_shifts_change_the_size_as_documented() {
        let g = ramp(100, 80);
        assert_eq!(
            Shift::ZoomIn { keep: 0.6 }.apply(&g, 0).unwrap().dimensions(),
            (60, 48)
        );
        let out = Shift::ZoomOut { pad: 1.5 }.apply(&g, 0).unwrap();
        assert_eq!(out.dimensions(), (150, 120));
        // The original sits in the middle of a black canvas.
        assert_eq!(out.get_pixel(0, 0)[0], 0);
        assert_eq!(out.get_pixel(25 + 10, 20 + 7)[0], g.get_pixel(10, 7)[0]);
        assert_eq!(
            Shift::Aspect { ratio: 0.75 }.apply(&g, 0).unwrap().dimensions(),
            (75, 80)
        );
        for s in Shift::suite() {
            let out = s.apply(&g, 3).unwrap();
            assert!(out.width() > 0 && out.height() > 0, "{}", s.name());
        }
    }

    #[test]
    fn photometric_shifts_keep_the_size_and_move_values_the_right_way() {
        let g = GrayImage::from_fn(64, 64, |x, _| Luma([(x * 4) as u8]));
        let mean = |i: &GrayImage| i.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / 4096.0;
        let dark = Shift::Gamma { gamma: 1.4 }.apply(&g, 0).unwrap();
        assert!(mean(&dark) < mean(&g));
        let flat = Shift::Contrast { factor: 0.7 }.apply(&g, 0).unwrap();
        let spread = |i: &GrayImage| i.get_pixel(63, 0)[0] as i32 - i.get_pixel(0, 0)[0] as i32;
        assert!(spread(&flat) < spread(&g));
        let noisy = Shift::Noise { sigma: 0.03 }.apply(&g, 1).unwrap();
        assert_ne!(noisy, g);
        assert_eq!(noisy, Shift::Noise { sigma: 0.03 }.apply(&g, 1).unwrap());
        assert_ne!(noisy, Shift::Noise { sigma: 0.03 }.apply(&g, 2).unwrap());
        for s in [
            Shift::Blur { sigma: 0.01 },
            Shift::Jpeg { quality: 30 },
            Shift::LowResolution { factor: 1.0 / 3.0 },
        ] {
            let out = s.apply(&g, 0).unwrap();
            assert_eq!(out.dimensions(), g.dimensions());
            let diff: f64 = out
                .as_raw()
                .iter()
                .zip(g.as_raw())
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
                .sum::<f64>()
                / 4096.0;
            // Close to the source on a smooth ramp, but not identical.
            assert!(diff < 6.0, "{}: {diff}", s.name());
        }
        assert!(Shift::ZoomIn { keep: 1.5 }.apply(&g, 0).is_err());
        assert!(Shift::Jpeg { quality: 0 }.validate().is_err());
    }

    #[test]
    fn blur_keeps_a_constant_image_and_smooths_an_edge() {
        let mut flat = Array2::from_elem((20, 20), 0.4f32);
        gaussian_blur(&mut flat, 2.0);
        assert!(flat.iter().all(|v| (v - 0.4).abs() < 1e-5));
        let mut edge = Array2::from_shape_fn((10, 20), |(_, x)| if x < 10 { 0.0f32 } else { 1.0 });
        gaussian_blur(&mut edge, 1.5);
        assert!(edge[[5, 9]] > 0.2 && edge[[5, 10]] < 0.8);
        assert!((edge[[5, 0]]).abs() < 1e-3 && (edge[[5, 19]] - 1.0).abs() < 1e-3);
    }
}
