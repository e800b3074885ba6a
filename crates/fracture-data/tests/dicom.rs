//! DICOM as a scanner stores it: real radiographs written into DICOM (12-bit MONOCHROME2 and
//! MONOCHROME1 with window tags, 16-bit signed with rescale, lossless JPEG, no windowing tags,
//! padding, several frames) decode to the source picture; bad files are named errors.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use fracture_data::{DecodeLimits, decode_dicom, decode_gray, window16};
use fracture_testkit::dicom::{DicomSpec, dicom_bytes, scanner_variants, syntax, to_twelve_bits};

/// The first `n` val radiographs of the shared FracAtlas copy, as 8-bit luma.
fn radiographs(n: usize) -> Option<Vec<(PathBuf, image::GrayImage)>> {
    let root = fracture_testkit::fracatlas_optional()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("val/fractured"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    Some(
        files
            .into_iter()
            .take(n)
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                let gray = decode_gray(&bytes, &p, &DecodeLimits::default()).unwrap();
                (p, gray)
            })
            .collect(),
    )
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / a.len() as f64
}

fn decode(bytes: &[u8]) -> (image::GrayImage, fracture_data::DicomInfo) {
    decode_dicom(bytes, Path::new("scan.dcm"), &DecodeLimits::default()).unwrap()
}

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn radiographs_written_as_dicom_decode_to_the_source_picture() {
    let sources = radiographs(3).expect("the FracAtlas radiographs at ../shared/data/fracatlas");
    for (path, gray) in &sources {
        let size = gray.dimensions();
        let s = gray.as_raw();
        let v12: Vec<i32> = s.iter().map(|&x| to_twelve_bits(x)).collect();
        for (name, spec, bytes) in scanner_variants(size.0, size.1, s) {
            let (decoded, info) = decode(&bytes);
            let mad = mean_abs_diff(decoded.as_raw(), s);
            assert!(
                mad < 2.0,
                "{}: {name}: mean absolute difference {mad:.2}",
                path.display()
            );
            assert_eq!(info.frames, spec.frames);
            assert!(
                info.transfer_syntax.starts_with(spec.syntax),
                "{name}: read as {}",
                info.transfer_syntax
            );
            assert_eq!(info.modality.as_deref(), Some("CR"));
            // The same bytes through the general decoder, as every command reads files.
            assert_eq!(
                decode_gray(&bytes, Path::new("x"), &DecodeLimits::default()).unwrap(),
                decoded
            );
        }
        // Without windowing attributes the window is the image's own percentiles: the rule 16-bit
        // PNGs follow, and the same picture as the source windowed that way.
        let reference = window16(&s.iter().map(|&x| u16::from(x) * 257).collect::<Vec<_>>());
        let (decoded, info) = decode(&dicom_bytes(&v12, &DicomSpec::twelve_bit(size)));
        assert!(
            mean_abs_diff(decoded.as_raw(), &reference) < 2.0,
            "{}",
            path.display()
        );
        assert!(matches!(
            info.window,
            Some(fracture_data::dicom::Window::Percentile { .. })
        ));
        // A 16-bit PNG holding 0..=4095 decodes the same way.
        let mut png = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png, size.0, size.1);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Sixteen);
            let mut w = enc.write_header().unwrap();
            let data: Vec<u8> = v12.iter().flat_map(|&v| (v as u16).to_be_bytes()).collect();
            w.write_image_data(&data).unwrap();
        }
        let from_png = decode_gray(&png, Path::new("x.png"), &DecodeLimits::default()).unwrap();
        assert!(
            mean_abs_diff(from_png.as_raw(), &reference) < 2.0,
            "{}",
            path.display()
        );
        // Padding beside the image (a value no pixel has, 13 bits stored) stays out of the window:
        // the picture is the one of the image alone.
        let (w, h) = size;
        let pad = w / 10;
        let padded: Vec<i32> = (0..(w * h) as usize)
            .map(|i| if (i as u32 % w) < pad { 8000 } else { v12[i] })
            .collect();
        let spec = DicomSpec {
            bits: (16, 13),
            padding: Some(8000),
            ..DicomSpec::twelve_bit((w, h))
        };
        let (with_padding, _) = decode(&dicom_bytes(&padded, &spec));
        let crop: Vec<i32> = (0..(w * h) as usize)
            .filter(|i| (*i as u32 % w) >= pad)
            .map(|i| v12[i])
            .collect();
        let (alone, _) = decode(&dicom_bytes(&crop, &DicomSpec::twelve_bit((w - pad, h))));
        let interior: Vec<u8> = with_padding
            .enumerate_pixels()
            .filter(|(x, _, _)| *x >= pad)
            .map(|(_, _, p)| p.0[0])
            .collect();
        assert!(
            mean_abs_diff(&interior, alone.as_raw()) < 0.01,
            "{}",
            path.display()
        );
    }
}

#[test]
fn bad_dicom_files_are_named_errors() {
    let limits = DecodeLimits::default();
    let spec = DicomSpec {
        window: Some((2048.0, 4096.0)),
        ..DicomSpec::twelve_bit((64, 48))
    };
    let samples: Vec<i32> = (0..64 * 48).map(|i| i % 4096).collect();
    let good = dicom_bytes(&samples, &spec);
    let err = |bytes: &[u8], limits: &DecodeLimits| -> String {
        decode_gray(bytes, Path::new("scan.dcm"), limits)
            .unwrap_err()
            .to_string()
    };
    // Truncated in the pixel data.
    let e = err(&good[..good.len() - 1000], &limits);
    assert!(e.starts_with("scan.dcm: DICOM:"), "{e}");
    // Cut inside the header.
    let e = err(&good[..200], &limits);
    assert!(e.starts_with("scan.dcm: DICOM:"), "{e}");
    // Rows and columns over the limits, before any pixel is read.
    let small = DecodeLimits {
        max_width: 32,
        ..limits
    };
    let e = err(&good, &small);
    assert!(e.contains("64 × 48 pixels, over the limit"), "{e}");
    // Rows × columns × bits disagree with the pixel data (a header claiming more rows).
    let mut tall = good.clone();
    let rows_at = find_element(&tall, 0x0028, 0x0010);
    tall[rows_at..rows_at + 2].copy_from_slice(&96u16.to_le_bytes());
    let e = err(&tall, &limits);
    assert!(
        e.contains("scan.dcm: DICOM:") && (e.contains("fewer than") || e.contains("decode")),
        "{e}"
    );
    // An unsupported transfer syntax (JPEG-LS, JPEG 2000) is named.
    for uid in [syntax::JPEG_LS_LOSSLESS, "1.2.840.10008.1.2.4.90"] {
        let unsupported = DicomSpec {
            syntax: uid,
            ..spec.clone()
        };
        let e = err(&dicom_bytes(&samples, &unsupported), &limits);
        assert!(e.contains(uid) && e.contains("not supported"), "{e}");
    }
    // No pixel data.
    let mut no_pixels = good.clone();
    let at = find_element(&no_pixels, 0x7FE0, 0x0010) - 12;
    no_pixels.truncate(at);
    let e = err(&no_pixels, &limits);
    assert!(e.contains("no pixel data"), "{e}");
    // A wrong preamble is not DICOM at all: the general decoder says it is no image it knows.
    let mut wrong = good.clone();
    wrong[128..132].copy_from_slice(b"DICX");
    assert!(decode_gray(&wrong, Path::new("scan.dcm"), &limits).is_err());
    assert!(
        decode_dicom(&wrong, Path::new("scan.dcm"), &limits)
            .unwrap_err()
            .to_string()
            .contains("DICM")
    );
}

/// The offset of the value of the first explicit-VR element `(group, element)` with a 2-byte length
/// (or, for pixel data, just after its 12-byte header).
fn find_element(bytes: &[u8], group: u16, element: u16) -> usize {
    let mut needle = group.to_le_bytes().to_vec();
    needle.extend(element.to_le_bytes());
    let at = bytes.windows(4).rposition(|w| w == needle.as_slice()).unwrap();
    if group == 0x7FE0 { at + 12 } else { at + 8 }
}

/// What each crafted file's error must say (beside the file's name).
fn expected_reason(kind: &str) -> &'static str {
    match kind {
        k if k.contains("3-component JPEG") => "its JPEG holds 3 components",
        k if k.contains("RLE declaring") => "declares 2 segments",
        k if k.contains("Rows and Columns 4000") => "4000 × 4000 pixels, its JPEG holds",
        k if k.contains("Rescale") => "do not map stored values",
        k if k.contains("VOI LUT") => "declares 65536 entries, the LUT Data holds 10",
        k if k.contains("all-zero") => "decodes to a constant image",
        k if k.contains("PALETTE COLOR") => "PALETTE COLOR without its palette",
        k if k.contains("deflated data set") => "inflates to more than the limit",
        k if k.contains("declaring 4 GB") => "declares 4294967280 bytes, only",
        k => panic!("no expectation for {k}"),
    }
}

#[test]
fn crafted_dicom_files_are_refused_with_their_reason_never_decoded_or_panicking() {
    let mut sources = vec![(
        "synthetic".to_string(),
        fracture_testkit::synthetic_xray(96, 80, true, 5),
    )];
    if let Some(real) = radiographs(1) {
        // A real radiograph, shrunk so the crafted files stay small.
        let (path, gray) = &real[0];
        let small = image::imageops::resize(gray, 160, 128, image::imageops::FilterType::Triangle);
        sources.push((path.display().to_string(), small));
    }
    for (source, gray) in sources {
        let cases = fracture_testkit::dicom::crafted_dicoms(gray.width(), gray.height(), gray.as_raw());
        assert!(cases.len() >= 10);
        for (kind, bytes) in cases {
            let started = std::time::Instant::now();
            let e = decode_gray(&bytes, Path::new("crafted.dcm"), &DecodeLimits::default())
                .expect_err(kind)
                .to_string();
            assert!(e.starts_with("crafted.dcm:"), "{source}, {kind}: {e}");
            assert!(e.contains(expected_reason(kind)), "{source}, {kind}: {e}");
            // The bomb is refused by counting, not by inflating 300 MB into memory.
            assert!(started.elapsed().as_secs() < 20, "{kind}");
        }
    }
}

#[test]
fn a_deflated_bomb_is_refused_under_tight_limits_and_an_honest_deflated_file_still_decodes() {
    let bomb = fracture_testkit::dicom::deflated_bomb(40 << 20);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let tight = DecodeLimits {
        max_file_bytes: 16 << 20,
        ..DecodeLimits::default()
    };
    let e = decode_gray(&bomb, Path::new("bomb.dcm"), &tight)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("inflates to more than the limit of 16777216 bytes"),
        "{e}"
    );
    let gray = fracture_testkit::synthetic_xray(64, 48, false, 3);
    let samples: Vec<i32> = gray.as_raw().iter().map(|&v| to_twelve_bits(v)).collect();
    let deflated = DicomSpec {
        syntax: syntax::DEFLATED_LE,
        ..DicomSpec::twelve_bit((64, 48))
    };
    assert!(decode_gray(&dicom_bytes(&samples, &deflated), Path::new("ok.dcm"), &tight).is_ok());
}

#[test]
fn a_constant_picture_in_any_format_is_refused_naming_why() {
    let flat = image::GrayImage::from_pixel(40, 30, image::Luma([90]));
    let mut png = Vec::new();
    image::DynamicImage::ImageLuma8(flat)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let e = decode_gray(&png, Path::new("flat.png"), &DecodeLimits::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "flat.png: the image decodes to a constant image (every pixel is 90 of 255), nothing to classify"
    );
}

#[test]
fn an_oversized_image_names_its_size_and_the_limit() {
    let bomb = fracture_testkit::png_bomb_header(30_000, 30_000);
    let e = decode_gray(&bomb, Path::new("huge.png"), &DecodeLimits::default())
        .unwrap_err()
        .to_string();
    // A header alone: the size cannot always be read back, the limits are always said.
    assert!(
        e.contains("huge.png")
            && (e.contains("30000 × 30000 pixels, over the limit of 16384 × 16384")
                || e.contains("the limits are 16384 × 16384 pixels")),
        "{e}"
    );
}
