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

#[test]
fn every_corpus_entry_preprocesses_or_fails_naming_the_file() {
    let dir = fracture_testkit::fresh_dir(
        &std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        "corpus-data",
    );
    let entries = fracture_testkit::write_bad_inputs(&dir, &synthetic_xray(64, 48, true, 1)).unwrap();
    assert!(entries.len() >= 30, "{}", entries.len());
    let config = PreprocessConfig {
        size: 32,
        ..PreprocessConfig::default()
    };
    let limits = DecodeLimits::default();
    for e in entries.iter().filter(|e| e.path.is_file()) {
        let result = fracture_data::read_file_limited(&e.path, &limits)
            .and_then(|bytes| config.load_bytes(&bytes, &e.path, &limits));
        match (e.expect, result) {
            (fracture_testkit::Expect::Readable, Ok(x)) => assert_eq!(x.dim(), (32, 32), "{}", e.kind),
            (fracture_testkit::Expect::Unreadable, Err(err)) => {
                let name = e.path.file_name().unwrap().to_string_lossy().into_owned();
                assert!(err.to_string().contains(&name), "{}: {err}", e.kind);
            }
            (fracture_testkit::Expect::Ignored, _) => {}
            (expect, result) => panic!(
                "{}: expected {expect:?}, got {:?}",
                e.kind,
                result.map(|x| x.dim())
            ),
        }
    }
}

#[test]
fn decoding_mutated_dicom_files_never_panics() {
    use fracture_testkit::dicom::{crafted_dicoms, scanner_variants};
    // Seeds: a radiograph (a real one when the shared copy is here) written the ways scanners do
    // (uncompressed 8/12/16-bit, MONOCHROME1, rescale, lossless and baseline JPEG, RLE, deflated,
    // several frames), and the crafted kinds that once crashed or decoded wrongly (the deflated
    // bomb left out: mutating it only re-tests the inflation cap, slowly).
    let gray = match fracture_testkit::fracatlas_optional() {
        Some(root) => {
            let dir = root.join("val/fractured");
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            let bytes = std::fs::read(&files[0]).unwrap();
            let full = decode_gray(&bytes, &files[0], &DecodeLimits::default()).unwrap();
            fracture_data::image::imageops::resize(
                &full,
                64,
                48,
                fracture_data::image::imageops::FilterType::Triangle,
            )
        }
        None => synthetic_xray(64, 48, true, 9),
    };
    let mut seeds: Vec<Vec<u8>> = scanner_variants(64, 48, gray.as_raw())
        .into_iter()
        .map(|(_, _, bytes)| bytes)
        .collect();
    seeds.extend(
        crafted_dicoms(64, 48, gray.as_raw())
            .into_iter()
            .filter(|(kind, _)| !kind.contains("deflated data set"))
            .map(|(_, bytes)| bytes),
    );
    let limits = DecodeLimits {
        max_width: 4096,
        max_height: 4096,
        max_alloc_bytes: 64 << 20,
        max_file_bytes: 8 << 20,
        ..DecodeLimits::default()
    };
    let origin = std::path::Path::new("fuzz.dcm");
    let cases = fuzz_bytes("dicom", 20261203, &seeds, |bytes| {
        match decode_gray(bytes, origin, &limits) {
            Ok(img) => {
                assert!(img.width() <= 4096 && img.height() <= 4096);
                // Never a constant picture: that is refused.
                let first = img.as_raw()[0];
                assert!(img.as_raw().iter().any(|&v| v != first));
            }
            Err(e) => assert!(e.to_string().starts_with("fuzz.dcm"), "{e}"),
        }
    });
    assert!(cases > 0);
}
