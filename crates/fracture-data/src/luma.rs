//! Gray values from decoded pixels, the rule shared by every format: BT.601 luma, the 16-bit
//! display window, the refusal of a constant image, and the limits every decoder works within.

use std::path::Path;

use image::{DynamicImage, GrayImage};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Bounds that turn a decompression bomb into an error instead of an out-of-memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeLimits {
    /// Largest accepted width, in pixels.
    pub max_width: u32,
    /// Largest accepted height, in pixels.
    pub max_height: u32,
    /// Largest total allocation a decoder may make, in bytes.
    pub max_alloc_bytes: u64,
    /// Largest file read, in bytes.
    pub max_file_bytes: u64,
    /// Accept a JPEG that decodes only in part (truncated or damaged; the missing area is filled
    /// with gray). Off by default: such a file is an [`Error::Partial`].
    #[serde(default)]
    pub allow_partial: bool,
}

impl Default for DecodeLimits {
    /// 16384 × 16384 pixels, 1 GiB of decoder memory, 256 MiB files.
    fn default() -> Self {
        DecodeLimits {
            max_width: 16_384,
            max_height: 16_384,
            max_alloc_bytes: 1 << 30,
            max_file_bytes: 256 << 20,
            allow_partial: false,
        }
    }
}

/// `gray` unless every pixel has one value: such an image carries nothing to classify (a blank
/// scan, all-zero pixel data, a header that scales every value onto one), and a score for it
/// would be a silent wrong result.
pub(crate) fn refuse_constant(gray: GrayImage, origin: &Path) -> Result<GrayImage> {
    let raw = gray.as_raw();
    match raw.first() {
        Some(&first) if raw.iter().all(|&v| v == first) => Err(Error::Constant {
            path: origin.to_path_buf(),
            value: first,
        }),
        _ => Ok(gray),
    }
}

/// BT.601 luma of one 8-bit RGB pixel, rounded.
#[inline]
pub(crate) fn luma8(r: u8, g: u8, b: u8) -> u8 {
    ((299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b) + 500) / 1000) as u8
}

/// BT.601 luma of one 16-bit RGB pixel, rounded, still 16-bit.
#[inline]
pub(crate) fn luma16(r: u16, g: u16, b: u16) -> u16 {
    ((299 * u64::from(r) + 587 * u64::from(g) + 114 * u64::from(b) + 500) / 1000) as u16
}

/// A 16-bit sample scaled to 8 bits over the container's full range, rounded.
#[inline]
pub(crate) fn to8(v: u16) -> u8 {
    ((u32::from(v) * 255 + 32_767) / 65_535) as u8
}

/// Lower and upper fraction of a 16-bit image's samples left outside its display window.
pub const WINDOW_TAIL: f64 = 0.005;

/// 16-bit luma samples to 8 bits, windowed to the values actually present.
///
/// The rule, the one place it is written: the window runs from the 0.5th to the 99.5th percentile
/// of the samples ([`WINDOW_TAIL`]), mapped linearly onto 0..=255 (rounded, clamped outside). A
/// 12-bit radiograph in 16-bit words (values 0..=4095) therefore spans the whole 8-bit range instead
/// of the darkest sixteenth of it. An image whose window is empty (one value) falls back to the
/// container's range, `v * 255 / 65535`, so a flat image keeps its level.
pub fn window16(samples: &[u16]) -> Vec<u8> {
    if samples.is_empty() {
        return Vec::new();
    }
    let mut histogram = vec![0u32; 65_536];
    for &v in samples {
        histogram[usize::from(v)] += 1;
    }
    let (lo, hi) = histogram_window(&histogram, samples.len());
    let (lo, hi) = (lo as u16, hi as u16);
    if hi <= lo {
        return samples.iter().map(|&v| to8(v)).collect();
    }
    let (lo, span) = (f64::from(lo), f64::from(hi - lo));
    samples
        .iter()
        .map(|&v| ((f64::from(v) - lo) / span * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// The percentile window of `n` samples counted in `histogram` (bin `i` counts the value `i` above
/// the histogram's origin): the bins of the samples at ranks `⌊WINDOW_TAIL · n⌋` and
/// `⌊(1 − WINDOW_TAIL) · n⌋` (each the smallest value with more samples at or below it than its
/// rank). The one rule behind [`window16`] and DICOM files without windowing attributes.
pub(crate) fn histogram_window(histogram: &[u32], n: usize) -> (usize, usize) {
    let last = histogram.len().saturating_sub(1);
    let quantile = |fraction: f64| -> usize {
        let rank = ((fraction * n as f64).floor() as usize).min(n.saturating_sub(1));
        let mut seen = 0usize;
        for (value, &count) in histogram.iter().enumerate() {
            seen += count as usize;
            if seen > rank {
                return value;
            }
        }
        last
    };
    (quantile(WINDOW_TAIL), quantile(1.0 - WINDOW_TAIL))
}

pub(crate) fn rgb8_to_luma(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3).map(|p| luma8(p[0], p[1], p[2])).collect()
}

pub(crate) fn dynamic_to_luma(image: DynamicImage) -> GrayImage {
    let (w, h) = (image.width(), image.height());
    let raw: Vec<u8> = match image {
        DynamicImage::ImageLuma8(g) => return g,
        DynamicImage::ImageLumaA8(g) => g.pixels().map(|p| p.0[0]).collect(),
        DynamicImage::ImageRgb8(i) => rgb8_to_luma(i.as_raw()),
        DynamicImage::ImageRgba8(i) => i.pixels().map(|p| luma8(p.0[0], p.0[1], p.0[2])).collect(),
        DynamicImage::ImageLuma16(i) => window16(i.as_raw()),
        DynamicImage::ImageLumaA16(i) => window16(&i.pixels().map(|p| p.0[0]).collect::<Vec<_>>()),
        DynamicImage::ImageRgb16(i) => window16(
            &i.pixels()
                .map(|p| luma16(p.0[0], p.0[1], p.0[2]))
                .collect::<Vec<_>>(),
        ),
        DynamicImage::ImageRgba16(i) => window16(
            &i.pixels()
                .map(|p| luma16(p.0[0], p.0[1], p.0[2]))
                .collect::<Vec<_>>(),
        ),
        other => {
            // Float images: clamp to [0, 1] per channel, then the same BT.601 weights.
            let rgb = other.into_rgb32f();
            rgb.pixels()
                .map(|p| {
                    let [r, g, b] = p.0.map(|c| c.clamp(0.0, 1.0));
                    ((0.299 * r + 0.587 * g + 0.114 * b) * 255.0).round() as u8
                })
                .collect()
        }
    };
    // The buffer has exactly w * h samples by construction.
    GrayImage::from_raw(w, h, raw).unwrap_or_else(|| GrayImage::new(w, h))
}
