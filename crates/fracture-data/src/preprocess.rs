//! Preprocessing: decode → grayscale → resize → [0, 1] → optional standardization.
//!
//! One function, [`PreprocessConfig::load_bytes`], turns file bytes into the resized 8-bit image
//! that training, evaluation and serving all use; [`PreprocessConfig::to_input`] turns that into the
//! network input. Augmentation, when on, runs between the two (on the [0, 1] image, before
//! standardization).

use std::cell::RefCell;
use std::path::Path;

use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::pixels::U8;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::GrayImage;
use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::decode::{decode_gray, read_file_limited};
use crate::{DecodeLimits, Error, Result};

/// How a non-square image is brought to `size × size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ResizeMode {
    /// Scale each axis independently to `size` (what the original project did).
    #[default]
    Stretch,
    /// Scale the longer side to `size`, keep the aspect ratio, centre, and pad with black (0).
    Letterbox,
}

/// Mean/std standardization applied after scaling to [0, 1]: `x ↦ (x − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Standardize {
    /// Subtracted from every pixel (in [0, 1] units).
    pub mean: f32,
    /// Divides every pixel after the subtraction; must be positive.
    pub std: f32,
}

/// The standardization means [`PreprocessConfig::validate`] accepts: pixels are in [0, 1], so a
/// mean outside this range is a damaged or crafted file, not a choice.
pub const STANDARDIZE_MEAN_RANGE: std::ops::RangeInclusive<f32> = -1.0..=2.0;
/// The standardization standard deviations [`PreprocessConfig::validate`] accepts.
pub const STANDARDIZE_STD_RANGE: std::ops::RangeInclusive<f32> = 0.001..=10.0;

/// Settings that turn an image file into a network input. Saved with every model, so that a model
/// is always served with the preprocessing it was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    /// Output side length in pixels (the image becomes `size × size`). Default 128.
    pub size: u32,
    /// Stretch or letterbox. Default [`ResizeMode::Stretch`].
    #[serde(default)]
    pub resize: ResizeMode,
    /// Optional standardization after scaling to [0, 1]. Default none.
    #[serde(default)]
    pub standardize: Option<Standardize>,
}

/// Preprocessing apart from the side: how an image is fitted into the network's square input and
/// scaled. The side belongs to the network (`ModelConfig::image_size`); [`ImageFit::at`] joins the
/// two into a [`PreprocessConfig`], so a training setup states the size once.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageFit {
    /// Stretch or letterbox.
    pub resize: ResizeMode,
    /// Optional standardization after scaling to [0, 1].
    pub standardize: Option<Standardize>,
}

impl ImageFit {
    /// The preprocessing that fits images this way into `size × size` pixels (a size beyond `u32`
    /// saturates, and [`PreprocessConfig::validate`] then refuses it).
    pub fn at(self, size: usize) -> PreprocessConfig {
        PreprocessConfig {
            size: u32::try_from(size).unwrap_or(u32::MAX),
            resize: self.resize,
            standardize: self.standardize,
        }
    }
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            size: 128,
            resize: ResizeMode::Stretch,
            standardize: None,
        }
    }
}

/// Where a source image lands inside the `size × size` output: the whole square for
/// [`ResizeMode::Stretch`], the centred content for [`ResizeMode::Letterbox`]. Pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentBox {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// Smallest and largest accepted [`PreprocessConfig::size`].
pub const SIZE_RANGE: std::ops::RangeInclusive<u32> = 8..=4096;

thread_local! {
    // A resizer keeps scratch buffers; one per thread avoids reallocating them for every image.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

impl PreprocessConfig {
    /// A stretch-resize configuration of the given size, without standardization.
    pub fn with_size(size: u32) -> Self {
        PreprocessConfig {
            size,
            ..PreprocessConfig::default()
        }
    }

    /// How this preprocessing fits images, without its size.
    pub fn fit(&self) -> ImageFit {
        ImageFit {
            resize: self.resize,
            standardize: self.standardize,
        }
    }

    /// Checks the size range ([`SIZE_RANGE`], the one range of input sizes) and the
    /// standardization parameters.
    pub fn validate(&self) -> Result<()> {
        if !SIZE_RANGE.contains(&self.size) {
            return Err(Error::InvalidConfig {
                field: "preprocess.size",
                reason: format!(
                    "{} is outside {}..={}",
                    self.size,
                    SIZE_RANGE.start(),
                    SIZE_RANGE.end()
                ),
            });
        }
        if let Some(s) = self.standardize
            && !(STANDARDIZE_MEAN_RANGE.contains(&s.mean) && STANDARDIZE_STD_RANGE.contains(&s.std))
        {
            return Err(Error::InvalidConfig {
                field: "preprocess.standardize",
                reason: format!(
                    "mean {} must lie in {:?} and std {} in {:?} (pixels are in [0, 1])",
                    s.mean, STANDARDIZE_MEAN_RANGE, s.std, STANDARDIZE_STD_RANGE
                ),
            });
        }
        Ok(())
    }

    /// A string that changes whenever the cached 8-bit image would change (size, resize mode, luma
    /// and filter choices), used as part of the disk-cache key. Standardization is not part of it: it
    /// is applied after the cache.
    pub fn cache_key(&self) -> String {
        let mode = match self.resize {
            ResizeMode::Stretch => "stretch",
            ResizeMode::Letterbox => "letterbox",
        };
        format!(
            "size={};resize={mode};luma=bt601;window16=p0.5;filter=bilinear-aa;v=2",
            self.size
        )
    }

    /// Decodes file bytes and resizes them to `size × size` 8-bit luma, shape `(size, size)`.
    ///
    /// This is the shared preprocessing step of training, evaluation and serving. `origin` names the
    /// file or upload in errors.
    pub fn load_bytes(&self, bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<Array2<u8>> {
        let gray = decode_gray(bytes, origin, limits)?;
        self.resize(&gray)
    }

    /// Reads a file (within `limits.max_file_bytes`) and runs [`PreprocessConfig::load_bytes`].
    pub fn load_file(&self, path: &Path, limits: &DecodeLimits) -> Result<Array2<u8>> {
        Ok(self.load_file_sized(path, limits)?.0)
    }

    /// [`PreprocessConfig::load_file`], also returning the decoded image's `(width, height)` in
    /// pixels, so that results on the input can be mapped back into the image's own pixels.
    pub fn load_file_sized(&self, path: &Path, limits: &DecodeLimits) -> Result<(Array2<u8>, (u32, u32))> {
        let bytes = read_file_limited(path, limits)?;
        self.load_bytes_sized(&bytes, path, limits)
    }

    /// [`PreprocessConfig::load_bytes`], also returning the decoded image's `(width, height)` in
    /// pixels.
    pub fn load_bytes_sized(
        &self,
        bytes: &[u8],
        origin: &Path,
        limits: &DecodeLimits,
    ) -> Result<(Array2<u8>, (u32, u32))> {
        let gray = decode_gray(bytes, origin, limits)?;
        Ok((self.resize(&gray)?, gray.dimensions()))
    }

    /// Decodes bytes all the way to a network input, `(size, size)` f32 (in [0, 1] unless
    /// standardized). Used for single images (prediction, serving).
    pub fn preprocess_bytes(
        &self,
        bytes: &[u8],
        origin: &Path,
        limits: &DecodeLimits,
    ) -> Result<Array2<f32>> {
        Ok(self.to_input(self.load_bytes(bytes, origin, limits)?.view()))
    }

    /// Converts a resized 8-bit image to the network input: `v / 255`, then standardization.
    pub fn to_input(&self, image: ArrayView2<'_, u8>) -> Array2<f32> {
        let mut out = to_unit(image);
        self.standardize_in_place(&mut out);
        out
    }

    /// Applies the standardization, if any, in place.
    pub fn standardize_in_place(&self, image: &mut Array2<f32>) {
        if let Some(Standardize { mean, std }) = self.standardize {
            let inv = 1.0 / std;
            image.mapv_inplace(|v| (v - mean) * inv);
        }
    }

    /// Where an image of `width × height` pixels lands in the output (see [`ContentBox`]).
    pub fn content_box(&self, width: u32, height: u32) -> ContentBox {
        match self.resize {
            ResizeMode::Stretch => ContentBox {
                x: 0,
                y: 0,
                width: self.size,
                height: self.size,
            },
            ResizeMode::Letterbox => {
                let scale = f64::from(self.size) / f64::from(width.max(height).max(1));
                let w = ((f64::from(width) * scale).round() as u32).clamp(1, self.size);
                let h = ((f64::from(height) * scale).round() as u32).clamp(1, self.size);
                ContentBox {
                    x: (self.size - w) / 2,
                    y: (self.size - h) / 2,
                    width: w,
                    height: h,
                }
            }
        }
    }

    /// Resizes a full-resolution luma image to `size × size` with an antialiased bilinear filter
    /// (its support widens with the scale factor, so downscaling does not alias).
    pub fn resize(&self, gray: &GrayImage) -> Result<Array2<u8>> {
        let size = self.size as usize;
        let (w, h) = gray.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::Layout(
                "cannot resize an image with a zero dimension".into(),
            ));
        }
        let mut out = Array2::<u8>::zeros((size, size));
        match self.resize {
            ResizeMode::Stretch => resize_into(
                gray.as_raw(),
                w,
                h,
                out.as_slice_mut().unwrap_or_default(),
                self.size,
                self.size,
            )?,
            ResizeMode::Letterbox => {
                let b = self.content_box(w, h);
                let (nw, nh) = (b.width, b.height);
                let mut tmp = vec![0u8; nw as usize * nh as usize];
                resize_into(gray.as_raw(), w, h, &mut tmp, nw, nh)?;
                let (x0, y0) = (b.x as usize, b.y as usize);
                for (row, src) in tmp.chunks_exact(nw as usize).enumerate() {
                    let start = (y0 + row) * size + x0;
                    if let Some(dst) = out
                        .as_slice_mut()
                        .and_then(|s| s.get_mut(start..start + nw as usize))
                    {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn resize_into(src: &[u8], w: u32, h: u32, dst: &mut [u8], dw: u32, dh: u32) -> Result<()> {
    let resize_err = |e: &dyn std::fmt::Display| Error::Layout(format!("resize failed: {e}"));
    if w == dw && h == dh {
        dst.copy_from_slice(&src[..dst.len()]);
        return Ok(());
    }
    let src_view = TypedImageRef::<U8>::from_buffer(w, h, src).map_err(|e| resize_err(&e))?;
    let mut dst_view = TypedImage::<U8>::from_buffer(dw, dh, dst).map_err(|e| resize_err(&e))?;
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize_typed(&src_view, &mut dst_view, &options))
        .map_err(|e| resize_err(&e))
}

/// Scales an 8-bit image to f32 in [0, 1] (`v / 255`), same shape.
pub fn to_unit(image: ArrayView2<'_, u8>) -> Array2<f32> {
    image.mapv(|v| f32::from(v) * (1.0 / 255.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;
    use proptest::prelude::*;

    fn check_resize(w: u32, h: u32, size: u32, mode: ResizeMode, seed: u8) -> Result<(), TestCaseError> {
        let gray = GrayImage::from_fn(w, h, |x, y| Luma([(x as u8).wrapping_mul(seed) ^ (y as u8)]));
        let cfg = PreprocessConfig {
            size,
            resize: mode,
            standardize: None,
        };
        let out = cfg
            .resize(&gray)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(out.dim(), (size as usize, size as usize));
        let input = cfg.to_input(out.view());
        prop_assert!(input.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        Ok(())
    }

    proptest! {
        #[test]
        fn resize_gives_exactly_size_by_size_in_unit_range(
            w in 1u32..300, h in 1u32..300, size in 8u32..160, letterbox: bool, seed: u8,
        ) {
            let mode = if letterbox { ResizeMode::Letterbox } else { ResizeMode::Stretch };
            check_resize(w, h, size, mode, seed)?;
        }

        #[test]
        fn constant_images_stay_constant(v: u8, w in 1u32..200, h in 1u32..200, size in 8u32..64) {
            let gray = GrayImage::from_pixel(w, h, Luma([v]));
            let out = PreprocessConfig::with_size(size).resize(&gray).unwrap();
            prop_assert!(out.iter().all(|&p| p == v));
        }
    }

    #[test]
    fn letterbox_pads_with_black_and_keeps_the_aspect() {
        let gray = GrayImage::from_pixel(200, 100, Luma([200]));
        let cfg = PreprocessConfig {
            size: 64,
            resize: ResizeMode::Letterbox,
            standardize: None,
        };
        let out = cfg.resize(&gray).unwrap();
        // 200×100 → 64×32, centred vertically: rows 16..48 are the image, the rest is padding.
        assert_eq!(
            cfg.content_box(200, 100),
            ContentBox {
                x: 0,
                y: 16,
                width: 64,
                height: 32
            }
        );
        assert_eq!(
            PreprocessConfig::with_size(64).content_box(200, 100),
            ContentBox {
                x: 0,
                y: 0,
                width: 64,
                height: 64
            }
        );
        assert!(out.row(0).iter().all(|&v| v == 0));
        assert!(out.row(15).iter().all(|&v| v == 0));
        assert!(out.row(16).iter().all(|&v| v == 200));
        assert!(out.row(47).iter().all(|&v| v == 200));
        assert!(out.row(48).iter().all(|&v| v == 0));
    }

    #[test]
    fn downscaling_is_antialiased() {
        // A one-pixel checkerboard averages to mid-gray instead of aliasing to black or white.
        let gray = GrayImage::from_fn(256, 256, |x, y| Luma([if (x + y) % 2 == 0 { 255 } else { 0 }]));
        let out = PreprocessConfig::with_size(32).resize(&gray).unwrap();
        assert!(out.iter().all(|&v| (120..=135).contains(&v)), "{:?}", out.row(3));
    }

    #[test]
    fn standardization_applies_after_scaling() {
        let cfg = PreprocessConfig {
            size: 8,
            resize: ResizeMode::Stretch,
            standardize: Some(Standardize { mean: 0.5, std: 0.25 }),
        };
        let img = Array2::from_elem((8, 8), 255u8);
        let input = cfg.to_input(img.view());
        assert!(input.iter().all(|&v| (v - 2.0).abs() < 1e-6));
    }

    #[test]
    fn invalid_configs_name_their_field() {
        let err = PreprocessConfig::with_size(2).validate().unwrap_err();
        assert!(err.to_string().contains("preprocess.size"), "{err}");
        let bad_std = PreprocessConfig {
            standardize: Some(Standardize { mean: 0.0, std: 0.0 }),
            ..PreprocessConfig::default()
        };
        assert!(
            bad_std
                .validate()
                .unwrap_err()
                .to_string()
                .contains("preprocess.standardize")
        );
        assert!(PreprocessConfig::default().validate().is_ok());
    }

    #[test]
    fn cache_key_tracks_what_the_cache_holds() {
        let a = PreprocessConfig::with_size(128);
        let b = PreprocessConfig {
            resize: ResizeMode::Letterbox,
            ..a
        };
        let c = PreprocessConfig {
            standardize: Some(Standardize { mean: 0.1, std: 0.2 }),
            ..a
        };
        assert_ne!(a.cache_key(), b.cache_key());
        assert_ne!(a.cache_key(), PreprocessConfig::with_size(64).cache_key());
        assert_eq!(a.cache_key(), c.cache_key());
    }

    #[test]
    fn config_json_round_trips_and_rejects_unknown_fields() {
        let cfg = PreprocessConfig {
            size: 224,
            resize: ResizeMode::Letterbox,
            standardize: None,
        };
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<PreprocessConfig>(&json).unwrap(), cfg);
        assert!(serde_json::from_str::<PreprocessConfig>(r#"{"size":64,"sise":3}"#).is_err());
    }
}
