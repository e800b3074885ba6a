//! Arbitrary and mutated bytes through image decoding and preprocessing: an error or an image within
//! the limits, never a panic. `cargo xtask fuzz --seconds N` runs the same properties for longer.

#![allow(clippy::unwrap_used)]

use fracture_data::image::{DynamicImage, ImageFormat};
use fracture_data::{DecodeLimits, PreprocessConfig, decode_gray};
use fracture_testkit::{fuzz_bytes, synthetic_xray};

fn encoded(format: ImageFormat, seed: u64) -> Vec<u8> {
    let img = DynamicImage::ImageLuma8(synthetic_xray(48, 40, seed.is_multiple_of(2), seed));
    let img = match format {
        ImageFormat::Jpeg | ImageFormat::Bmp => img,
        _ => DynamicImage::ImageRgba8(img.to_rgba8()),
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn decoding_mutated_images_never_panics() {
    let seeds: Vec<Vec<u8>> = [
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
        ImageFormat::WebP,
    ]
    .iter()
    .enumerate()
    .map(|(i, &f)| encoded(f, i as u64))
    .collect();
    let limits = DecodeLimits {
        max_width: 4096,
        max_height: 4096,
        max_alloc_bytes: 64 << 20,
        ..DecodeLimits::default()
    };
    let origin = std::path::Path::new("fuzz.img");
    let config = PreprocessConfig {
        size: 32,
        ..PreprocessConfig::default()
    };
    let cases = fuzz_bytes("decode", 20261201, &seeds, |bytes| {
        if let Ok(img) = decode_gray(bytes, origin, &limits) {
            assert!(img.width() <= 4096 && img.height() <= 4096);
        }
        if let Ok(x) = config.load_bytes(bytes, origin, &limits) {
            assert_eq!(x.dim(), (32, 32));
        }
    });
    assert!(cases > 0);
}
