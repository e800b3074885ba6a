//! Decoding any supported file to an 8-bit luma image, with limits.
//!
//! JPEG (the common case) goes through zune-jpeg, asking it for the luma plane directly so that the
//! chroma planes are never colour-converted. Every other format, and JPEGs zune-jpeg cannot read,
//! goes through the `image` crate. Both paths apply the EXIF orientation and produce BT.601 luma
//! (`0.299 R + 0.587 G + 0.114 B`, what JPEG's Y channel and PIL's `convert("L")` use).

use std::io::Cursor;
use std::path::Path;

use fracture_fs::AtPath;
use image::error::{DecodingError, ImageFormatHint};
use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

use crate::luma::{dynamic_to_luma, refuse_constant, rgb8_to_luma};
use crate::{DecodeLimits, Error, Result};

/// Reads a whole file, refusing empty files and files over `limits.max_file_bytes`.
pub fn read_file_limited(path: &Path, limits: &DecodeLimits) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).at(path)?;
    if meta.len() == 0 {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > limits.max_file_bytes {
        return Err(Error::FileTooLarge {
            path: path.to_path_buf(),
            bytes: meta.len(),
            limit: limits.max_file_bytes,
        });
    }
    std::fs::read(path).at(path).map_err(Error::from)
}

/// Decodes image bytes to full-resolution 8-bit luma.
///
/// `origin` names the file (or upload) in errors. 16-bit images are windowed to the values they
/// hold (see [`window16`](crate::window16)), so that 10- or 12-bit radiographs stored in 16-bit words keep their
/// contrast; an alpha channel is dropped. Formats: JPEG (baseline, progressive,
/// grayscale, YCbCr, RGB, CMYK, YCCK), PNG, BMP, TIFF, WebP, and DICOM (recognised by its magic
/// whatever the file's name; see [`crate::dicom`]).
pub fn decode_gray(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<GrayImage> {
    if bytes.is_empty() {
        return Err(Error::EmptyFile {
            path: origin.to_path_buf(),
        });
    }
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(Error::FileTooLarge {
            path: origin.to_path_buf(),
            bytes: bytes.len() as u64,
            limit: limits.max_file_bytes,
        });
    }
    let decode_err = |source: ImageError| Error::Decode {
        path: origin.to_path_buf(),
        source,
    };
    if crate::dicom::is_dicom(bytes) {
        return Ok(crate::dicom::decode_dicom(bytes, origin, limits)?.0);
    }
    let format = image::guess_format(bytes).map_err(decode_err)?;
    let gray = if format == ImageFormat::Jpeg {
        if limits.allow_partial {
            decode_jpeg(bytes, limits, false).map_err(decode_err)?
        } else {
            decode_jpeg_checked(bytes, origin, limits)?
        }
    } else {
        decode_other(bytes, format, limits).map_err(decode_err)?
    };
    refuse_constant(gray, origin)
}

/// A JPEG decoded strictly, or an [`Error::Partial`] when only the lenient decoder reads it.
fn decode_jpeg_checked(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<GrayImage> {
    let decode_err = |source: ImageError| Error::Decode {
        path: origin.to_path_buf(),
        source,
    };
    match decode_jpeg(bytes, limits, true) {
        Ok(gray) => Ok(gray),
        // The strict decoder stops at the first damage; the lenient one fills in gray. When only
        // the lenient one succeeds, the picture is partial, unless the strict complaint was
        // about harmless padding between headers.
        Err(strict) => match decode_jpeg(bytes, limits, false) {
            Ok(gray) if strict.to_string().contains("Extra bytes between headers") => Ok(gray),
            Ok(_) => Err(Error::Partial {
                path: origin.to_path_buf(),
                reason: strict.to_string(),
            }),
            Err(e) => Err(decode_err(e)),
        },
    }
}

fn check_dimensions(
    width: u64,
    height: u64,
    bytes_per_pixel: u64,
    limits: &DecodeLimits,
) -> Result<(), ImageError> {
    // The sizes in the message: "image too large" alone leaves the user guessing which limit.
    let over = |what: String| ImageError::Decoding(DecodingError::new(ImageFormatHint::Unknown, what));
    if width > u64::from(limits.max_width) || height > u64::from(limits.max_height) {
        return Err(over(format!(
            "{width} × {height} pixels, over the limit of {} × {}",
            limits.max_width, limits.max_height
        )));
    }
    let bytes = width.saturating_mul(height).saturating_mul(bytes_per_pixel);
    if bytes > limits.max_alloc_bytes {
        return Err(over(format!(
            "{width} × {height} pixels need {bytes} bytes to decode, over the limit of {} bytes",
            limits.max_alloc_bytes
        )));
    }
    Ok(())
}

fn decode_jpeg(bytes: &[u8], limits: &DecodeLimits, strict: bool) -> Result<GrayImage, ImageError> {
    let jpeg_err = |e: zune_jpeg::errors::DecodeErrors| {
        ImageError::Decoding(DecodingError::new(ImageFormatHint::Exact(ImageFormat::Jpeg), e))
    };
    let options = DecoderOptions::default()
        .set_max_width(limits.max_width as usize)
        .set_max_height(limits.max_height as usize)
        .set_strict_mode(strict);
    let mut probe = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    probe.decode_headers().map_err(jpeg_err)?;
    let (width, height, input) = match (probe.info(), probe.input_colorspace()) {
        (Some(info), Some(cs)) => (u32::from(info.width), u32::from(info.height), cs),
        _ => {
            return Err(jpeg_err(zune_jpeg::errors::DecodeErrors::FormatStatic(
                "missing JPEG header",
            )));
        }
    };
    // Decoding allocates one plane per component plus the output.
    check_dimensions(u64::from(width), u64::from(height), 8, limits)?;
    let orientation = probe.exif().and_then(|exif| Orientation::from_exif_chunk(exif));
    let direct_luma = matches!(input, ColorSpace::YCbCr | ColorSpace::Luma);
    let out = if direct_luma {
        ColorSpace::Luma
    } else {
        ColorSpace::RGB
    };
    let mut decoder =
        JpegDecoder::new_with_options(ZCursor::new(bytes), options.jpeg_set_out_colorspace(out));
    let pixels = match decoder.decode() {
        Ok(p) => p,
        Err(e) if strict => return Err(jpeg_err(e)),
        // zune-jpeg refuses a few rare layouts; the `image` crate may still read them.
        Err(_) if !direct_luma => return decode_other(bytes, ImageFormat::Jpeg, limits),

        Err(e) => return Err(jpeg_err(e)),
    };
    let (w, h) = match decoder.info() {
        Some(info) => (u32::from(info.width), u32::from(info.height)),
        None => (width, height),
    };
    let gray = if direct_luma {
        GrayImage::from_raw(w, h, pixels)
    } else {
        GrayImage::from_raw(w, h, rgb8_to_luma(&pixels))
    };
    let Some(gray) = gray else {
        return Err(jpeg_err(zune_jpeg::errors::DecodeErrors::FormatStatic(
            "decoded buffer has the wrong size",
        )));
    };
    Ok(apply_orientation(gray, orientation))
}

fn decode_other(bytes: &[u8], format: ImageFormat, limits: &DecodeLimits) -> Result<GrayImage, ImageError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_width);
    image_limits.max_image_height = Some(limits.max_height);
    image_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(image_limits);
    let mut decoder = match reader.into_decoder() {
        Ok(decoder) => decoder,
        // Say the image's size and the limit, which the decoder's own message leaves out.
        Err(ImageError::Limits(e)) => {
            let mut probe = ImageReader::with_format(Cursor::new(bytes), format);
            probe.no_limits();
            if let Ok((w, h)) = probe.into_dimensions() {
                check_dimensions(u64::from(w), u64::from(h), 1, limits)?;
            }
            return Err(ImageError::Decoding(DecodingError::new(
                ImageFormatHint::Exact(format),
                format!(
                    "{e}: the limits are {} × {} pixels and {} bytes to decode",
                    limits.max_width, limits.max_height, limits.max_alloc_bytes
                ),
            )));
        }
        Err(e) => return Err(e),
    };
    let (w, h) = decoder.dimensions();
    check_dimensions(
        u64::from(w),
        u64::from(h),
        decoder.color_type().bytes_per_pixel().into(),
        limits,
    )?;
    let orientation = decoder.orientation().ok();
    let image = DynamicImage::from_decoder(decoder)?;
    Ok(apply_orientation(dynamic_to_luma(image), orientation))
}

fn apply_orientation(gray: GrayImage, orientation: Option<Orientation>) -> GrayImage {
    match orientation {
        None | Some(Orientation::NoTransforms) => gray,
        Some(o) => {
            let mut dynamic = DynamicImage::ImageLuma8(gray);
            dynamic.apply_orientation(o);
            dynamic.into_luma8()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luma::*;
    use image::{ImageBuffer, Luma, Rgb, Rgba};

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn origin() -> &'static Path {
        Path::new("test.img")
    }

    #[test]
    fn twelve_bit_data_in_sixteen_bit_words_keeps_its_contrast() {
        // A radiograph-like ramp holding 12-bit values 0..=4095 in a 16-bit PNG.
        let g16: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(64, 64, |x, y| Luma([(x * 64 + y) as u16]));
        let bytes = encode(&DynamicImage::ImageLuma16(g16), ImageFormat::Png);
        let decoded = decode_gray(&bytes, origin(), &DecodeLimits::default()).unwrap();
        let (min, max) = decoded
            .pixels()
            .fold((255u8, 0u8), |(lo, hi), p| (lo.min(p.0[0]), hi.max(p.0[0])));
        // Scaled by the container (v * 255 / 65535) these would all lie in 0..=16.
        assert_eq!((min, max), (0, 255));
        let levels: std::collections::BTreeSet<u8> = decoded.pixels().map(|p| p.0[0]).collect();
        assert!(levels.len() > 250, "{} gray levels", levels.len());
    }

    #[test]
    fn the_sixteen_bit_window_drops_the_outer_half_percent_and_keeps_flat_images() {
        // 1,000 samples 1000..=1999 plus ten outliers at each end of the container.
        let mut samples: Vec<u16> = (1000..2000).collect();
        samples.extend([0u16; 4]);
        samples.extend([65_535u16; 4]);
        let out = window16(&samples);
        assert_eq!(out[0], 0);
        assert!(out[999] >= 254, "{}", out[999]);
        assert!(out[500] > 120 && out[500] < 135, "{}", out[500]);
        assert_eq!(window16(&[30_000; 10]), vec![to8(30_000); 10]);
        assert!(window16(&[]).is_empty());
    }

    #[test]
    fn luma_weights_are_bt601() {
        assert_eq!(luma8(255, 255, 255), 255);
        assert_eq!(luma8(0, 0, 0), 0);
        assert_eq!(luma8(255, 0, 0), 76);
        assert_eq!(luma8(0, 255, 0), 150);
        assert_eq!(luma8(0, 0, 255), 29);
        assert_eq!(to8(65_535), 255);
        assert_eq!(to8(0), 0);
        assert_eq!(to8(257 * 100), 100);
    }

    #[test]
    fn png_variants_decode_to_the_same_gray() {
        // Values span 0..=255 (both ends present), so the 16-bit window is the full range.
        let gray = GrayImage::from_fn(9, 7, |x, y| Luma([((x * 20 + y * 3) * 255 / 178) as u8]));
        let expect = gray.clone();
        let rgb = ImageBuffer::from_fn(9, 7, |x, y| {
            let v = expect.get_pixel(x, y).0[0];
            Rgb([v, v, v])
        });
        let rgba = ImageBuffer::from_fn(9, 7, |x, y| {
            let v = expect.get_pixel(x, y).0[0];
            Rgba([v, v, v, 128])
        });
        let g16: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(9, 7, |x, y| Luma([u16::from(expect.get_pixel(x, y).0[0]) * 257]));
        for (name, img) in [
            ("gray8", DynamicImage::ImageLuma8(gray)),
            ("rgb8", DynamicImage::ImageRgb8(rgb)),
            ("rgba8", DynamicImage::ImageRgba8(rgba)),
            ("gray16", DynamicImage::ImageLuma16(g16)),
        ] {
            for format in [ImageFormat::Png, ImageFormat::Tiff] {
                let bytes = encode(&img, format);
                let decoded = decode_gray(&bytes, origin(), &DecodeLimits::default()).unwrap();
                assert_eq!(decoded, expect, "{name} {format:?}");
            }
        }
        let bmp = encode(
            &DynamicImage::ImageLuma8(expect.clone()).into_rgb8().into(),
            ImageFormat::Bmp,
        );
        assert_eq!(
            decode_gray(&bmp, origin(), &DecodeLimits::default()).unwrap(),
            expect
        );
    }

    #[test]
    fn jpeg_gray_and_color_decode_close_to_the_source() {
        let gray = GrayImage::from_fn(64, 48, |x, y| Luma([(x * 2 + y * 2) as u8]));
        for img in [
            DynamicImage::ImageLuma8(gray.clone()),
            DynamicImage::ImageLuma8(gray.clone()).into_rgb8().into(),
        ] {
            let bytes = encode(&img, ImageFormat::Jpeg);
            let decoded = decode_gray(&bytes, origin(), &DecodeLimits::default()).unwrap();
            assert_eq!(decoded.dimensions(), (64, 48));
            let max_err = decoded
                .as_raw()
                .iter()
                .zip(gray.as_raw())
                .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
                .max()
                .unwrap();
            assert!(max_err <= 6, "jpeg error {max_err}");
        }
    }

    #[test]
    fn garbage_empty_and_truncated_bytes_are_errors_naming_the_origin() {
        let limits = DecodeLimits::default();
        let err = decode_gray(b"this is not an image", origin(), &limits).unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
        assert!(err.to_string().contains("test.img"));
        assert!(matches!(
            decode_gray(b"", origin(), &limits),
            Err(Error::EmptyFile { .. })
        ));
        let gray = GrayImage::from_fn(64, 64, |x, y| Luma([(x ^ y) as u8]));
        for format in [ImageFormat::Jpeg, ImageFormat::Png] {
            let bytes = encode(&DynamicImage::ImageLuma8(gray.clone()), format);
            let cut = &bytes[..bytes.len() / 3];
            assert!(decode_gray(cut, origin(), &limits).is_err(), "{format:?}");
        }
    }

    #[test]
    fn a_truncated_jpeg_is_partial_unless_allowed() {
        let gray = GrayImage::from_fn(512, 384, |x, y| Luma([((x * 7) ^ (y * 13)) as u8]));
        let bytes = encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Jpeg);
        let cut = &bytes[..bytes.len() / 3];
        let err = decode_gray(cut, origin(), &DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, Error::Partial { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("test.img") && text.contains("partial decoding is allowed") && !text.contains("--"),
            "{text}"
        );
        let lenient = DecodeLimits {
            allow_partial: true,
            ..DecodeLimits::default()
        };
        let partial = decode_gray(cut, origin(), &lenient).unwrap();
        assert_eq!(partial.dimensions(), (512, 384));
        // The whole file is not partial.
        assert!(decode_gray(&bytes, origin(), &DecodeLimits::default()).is_ok());
    }

    #[test]
    fn dimension_limits_stop_oversized_images() {
        let gray = GrayImage::from_fn(300, 200, |x, _| Luma([x as u8]));
        let limits = DecodeLimits {
            max_width: 256,
            ..DecodeLimits::default()
        };
        for format in [ImageFormat::Jpeg, ImageFormat::Png] {
            let bytes = encode(&DynamicImage::ImageLuma8(gray.clone()), format);
            let err = decode_gray(&bytes, origin(), &limits).unwrap_err();
            assert!(matches!(err, Error::Decode { .. }), "{format:?}: {err}");
        }
        let tight = DecodeLimits {
            max_alloc_bytes: 1000,
            ..DecodeLimits::default()
        };
        let bytes = encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Png);
        assert!(decode_gray(&bytes, origin(), &tight).is_err());
        let small = DecodeLimits {
            max_file_bytes: 10,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode_gray(&bytes, origin(), &small),
            Err(Error::FileTooLarge { .. })
        ));
    }
}
