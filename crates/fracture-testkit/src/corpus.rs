//! A standing corpus of bad (and awkward but valid) image inputs, written on demand, so that every
//! entry point can be run against all of them: a clear error or a documented result, never a
//! panic, a hang or a partial output.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgba};

/// What an entry point should make of a corpus file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A valid image: predicted.
    Readable,
    /// Not an image, damaged, or over a limit: reported as unreadable, with its name.
    Unreadable,
    /// Not listed as an image at all (no image extension, or not a file).
    Ignored,
}

/// One corpus entry.
#[derive(Debug, Clone)]
pub struct BadInput {
    /// A short name for the kind of input.
    pub kind: &'static str,
    /// The file written.
    pub path: PathBuf,
    /// What should happen to it.
    pub expect: Expect,
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    // Encoding our own generated images cannot fail for these formats.
    let _ = img.write_to(&mut out, format);
    out.into_inner()
}

/// CRC-32 (IEEE), for hand-made PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG that declares `w × h` pixels and holds no image data (a decompression-bomb header).
pub fn png_bomb_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    out
}

/// A little-endian TIFF that declares `w × h` 8-bit gray pixels in one strip it does not hold.
fn tiff_bomb_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"II*\0".to_vec();
    out.extend_from_slice(&8u32.to_le_bytes());
    let entries: [(u16, u16, u32); 8] = [
        (256, 4, w),
        (257, 4, h),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 200),
        (278, 4, h),
        (279, 4, w.saturating_mul(h)),
    ];
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// A lossless WebP header declaring 16384 × 16384 pixels and no data.
fn webp_bomb_header() -> Vec<u8> {
    let mut vp8l = vec![0x2f];
    let bits: u32 = 16383 | (16383 << 14);
    vp8l.extend_from_slice(&bits.to_le_bytes());
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&((4 + 8 + vp8l.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBPVP8L");
    out.extend_from_slice(&(vp8l.len() as u32).to_le_bytes());
    out.extend_from_slice(&vp8l);
    out
}

/// Images made for the corpus: a 16-bit PNG of `valid` (readable), one pixel and a 4×3000 strip
/// of one gray level (nothing to classify), and a 4×3000 strip with content (readable), as
/// `(kind, file name, bytes, expectation)`.
fn generated_images(valid: &image::GrayImage) -> Vec<(&'static str, &'static str, Vec<u8>, Expect)> {
    use Expect::{Readable, Unreadable};
    let mut images = Vec::new();
    let wide: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(valid.width(), valid.height(), |x, y| {
            Luma([u16::from(valid.get_pixel(x, y)[0]) * 257])
        });
    images.push((
        "16-bit PNG",
        "sixteen.png",
        encode(&DynamicImage::ImageLuma16(wide), ImageFormat::Png),
        Readable,
    ));
    let one: ImageBuffer<Rgba<u8>, Vec<u8>> = ImageBuffer::from_pixel(1, 1, Rgba([200, 200, 200, 255]));
    // One pixel, or one gray level everywhere: nothing to classify.
    images.push((
        "1×1 PNG (constant)",
        "one-pixel.png",
        encode(&DynamicImage::ImageRgba8(one), ImageFormat::Png),
        Unreadable,
    ));
    let flat = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 3000, Luma([90])));
    images.push((
        "4×3000 PNG of one gray level",
        "flat-tall.png",
        encode(&flat, ImageFormat::Png),
        Unreadable,
    ));
    let tall = DynamicImage::ImageLuma8(image::GrayImage::from_fn(4, 3000, |x, y| {
        Luma([((x + y) % 200) as u8])
    }));
    images.push((
        "4×3000 PNG",
        "tall.png",
        encode(&tall, ImageFormat::Png),
        Readable,
    ));
    images
}

/// Entries only Unix file names and links can make: a name that is not UTF-8 (readable), a
/// symbolic link loop and a dangling link (both ignored).
#[cfg(unix)]
fn unix_entries(dir: &Path, jpeg: &[u8]) -> std::io::Result<Vec<BadInput>> {
    use Expect::{Ignored, Readable};
    let mut entries = Vec::new();
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::OsStr::from_bytes(b"latin1-\xe9.jpg");
    let path = dir.join(name);
    std::fs::write(&path, jpeg)?;
    entries.push(BadInput {
        kind: "non-UTF-8 name",
        path,
        expect: Readable,
    });
    let loop_link = dir.join("loop");
    std::os::unix::fs::symlink(".", &loop_link)?;
    entries.push(BadInput {
        kind: "symlink loop",
        path: loop_link,
        expect: Ignored,
    });
    let dangling = dir.join("dangling.jpg");
    std::os::unix::fs::symlink("does-not-exist.jpg", &dangling)?;
    entries.push(BadInput {
        kind: "dangling symlink",
        path: dangling,
        expect: Ignored,
    });
    Ok(entries)
}

/// A readable 12-bit DICOM file of `valid` (at 48 × 40) and the crafted ones a reader must refuse
/// ([`crate::dicom::crafted_dicoms`]), as `(kind, file name, bytes, expectation)`.
fn dicom_entries(valid: &image::GrayImage) -> Vec<(&'static str, String, Vec<u8>, Expect)> {
    let small = image::imageops::resize(valid, 48, 40, image::imageops::FilterType::Triangle);
    let twelve: Vec<i32> = small
        .as_raw()
        .iter()
        .map(|&v| crate::dicom::to_twelve_bits(v))
        .collect();
    let plain = crate::dicom::dicom_bytes(&twelve, &crate::dicom::DicomSpec::twelve_bit((48, 40)));
    let mut entries = vec![("DICOM, 12-bit", "plain.dcm".to_string(), plain, Expect::Readable)];
    for (i, (kind, bytes)) in crate::dicom::crafted_dicoms(48, 40, small.as_raw())
        .into_iter()
        .enumerate()
    {
        entries.push((kind, format!("crafted-{i}.dcm"), bytes, Expect::Unreadable));
    }
    entries
}

/// Writes the corpus into `dir` (created) and returns its entries. `valid` is a readable radiograph
/// (any supported format) that several entries start from.
pub fn write_bad_inputs(dir: &Path, valid: &image::GrayImage) -> std::io::Result<Vec<BadInput>> {
    std::fs::create_dir_all(dir)?;
    let gray = DynamicImage::ImageLuma8(valid.clone());
    let jpeg = encode(&gray, ImageFormat::Jpeg);
    let png = encode(&gray, ImageFormat::Png);
    let mut entries = Vec::new();
    let mut put = |kind: &'static str, name: &str, bytes: &[u8], expect: Expect| -> std::io::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes)?;
        entries.push(BadInput { kind, path, expect });
        Ok(())
    };
    use Expect::{Ignored, Readable, Unreadable};
    put("zero bytes", "empty.jpg", b"", Unreadable)?;
    put(
        "random bytes",
        "random.png",
        &(0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<_>>(),
        Unreadable,
    )?;
    put(
        "text named .png",
        "notes.png",
        b"this is a text file, not an image\n",
        Unreadable,
    )?;
    put(
        "JPEG header only",
        "header-only.jpg",
        &jpeg[..jpeg.len().min(300)],
        Unreadable,
    )?;
    put(
        "JPEG truncated to a third",
        "third.jpg",
        &jpeg[..jpeg.len() / 3],
        Unreadable,
    )?;
    put("PNG truncated", "cut.png", &png[..png.len() / 2], Unreadable)?;
    put(
        "PNG bomb header",
        "bomb.png",
        &png_bomb_header(100_000, 100_000),
        Unreadable,
    )?;
    put(
        "TIFF bomb header",
        "bomb.tiff",
        &tiff_bomb_header(100_000, 100_000),
        Unreadable,
    )?;
    put("WebP bomb header", "bomb.webp", &webp_bomb_header(), Unreadable)?;
    put(
        "BMP bad header",
        "bad.bmp",
        b"BM\x10\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0\xff\xff\xff\x7f",
        Unreadable,
    )?;
    put(
        "GIF (not a supported format)",
        "anim.gif",
        b"GIF89a\x01\0\x01\0\0\0\0;",
        Ignored,
    )?;
    put("no extension", "README", b"not an image", Ignored)?;
    put("valid JPEG", "plain.jpg", &jpeg, Readable)?;
    put("PNG named .jpg", "really-png.jpg", &png, Readable)?;
    put(
        "RGBA PNG",
        "rgba.png",
        &encode(&DynamicImage::ImageRgba8(gray.to_rgba8()), ImageFormat::Png),
        Readable,
    )?;
    for (kind, name, bytes, expect) in generated_images(valid) {
        put(kind, name, &bytes, expect)?;
    }
    for (kind, name, bytes, expect) in dicom_entries(valid) {
        put(kind, &name, &bytes, expect)?;
    }
    put("TIFF", "plain.tif", &encode(&gray, ImageFormat::Tiff), Readable)?;
    put("WebP", "plain.webp", &encode(&gray, ImageFormat::WebP), Readable)?;
    put("BMP", "plain.bmp", &encode(&gray, ImageFormat::Bmp), Readable)?;
    // Names that break naive CSV, shells, spreadsheets and path limits: each holds the valid JPEG.
    let long = format!("{}.jpg", "x".repeat(240));
    for (kind, name) in [
        ("comma and quotes in the name", "a,\"b\".jpg"),
        ("newline in the name", "two\nlines.jpg"),
        ("leading dash", "-rf.jpg"),
        ("formula name", "=cmd().jpg"),
        ("very long name", long.as_str()),
    ] {
        put(kind, name, &jpeg, Readable)?;
    }
    #[cfg(unix)]
    entries.extend(unix_entries(dir, &jpeg)?);
    let folder = dir.join("folder.jpg");
    std::fs::create_dir_all(&folder)?;
    entries.push(BadInput {
        kind: "folder named .jpg",
        path: folder,
        expect: Ignored,
    });
    Ok(entries)
}
