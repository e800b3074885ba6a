//! Copies of a radiograph as augmentation and re-export make them, for the leakage audit's tests and
//! benchmarks: flips, quarter turns, rotations with the crop that removes their black corners,
//! resizing, JPEG re-encoding, brightness and gamma.

use image::{GrayImage, Luma};

/// One way of copying an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CopyKind {
    /// Mirrored left to right.
    FlipHorizontal,
    /// Turned by 90° clockwise.
    Rotate90,
    /// Rotated by the angle (degrees, counter-clockwise) about the centre, then cropped to the
    /// central square that has no black corner, resized back to the original size.
    RotateCrop(f32),
    /// Resized to this share of each side.
    Resize(f32),
    /// Re-encoded as JPEG at this quality.
    Jpeg(u8),
    /// Every value multiplied by this factor (1.15 = 15% brighter), clamped.
    Brightness(f32),
    /// `255 · (v / 255)^gamma`.
    Gamma(f32),
}

impl CopyKind {
    /// The copies the audit must find: flip, 90° turn, ±10° rotation with crop, 70% size, JPEG
    /// quality 60, 15% brighter, gamma 1.3.
    pub const PLANTED: [CopyKind; 8] = [
        CopyKind::FlipHorizontal,
        CopyKind::Rotate90,
        CopyKind::RotateCrop(10.0),
        CopyKind::RotateCrop(-10.0),
        CopyKind::Resize(0.7),
        CopyKind::Jpeg(60),
        CopyKind::Brightness(1.15),
        CopyKind::Gamma(1.3),
    ];

    /// A short name for reports and file names.
    pub fn name(self) -> String {
        match self {
            CopyKind::FlipHorizontal => "flip".into(),
            CopyKind::Rotate90 => "rot90".into(),
            CopyKind::RotateCrop(a) => format!("rot{a:+}crop"),
            CopyKind::Resize(s) => format!("resize{:.0}", s * 100.0),
            CopyKind::Jpeg(q) => format!("jpeg{q}"),
            CopyKind::Brightness(f) => format!("bright{:+.0}", (f - 1.0) * 100.0),
            CopyKind::Gamma(g) => format!("gamma{g}"),
        }
    }

    /// The copy of `image` as encoded bytes: JPEG for [`CopyKind::Jpeg`], PNG otherwise.
    pub fn apply(self, image: &GrayImage) -> Vec<u8> {
        let (w, h) = image.dimensions();
        let out = match self {
            CopyKind::FlipHorizontal => image::imageops::flip_horizontal(image),
            CopyKind::Rotate90 => image::imageops::rotate90(image),
            CopyKind::RotateCrop(angle) => rotate_crop(image, angle),
            CopyKind::Resize(s) => image::imageops::resize(
                image,
                ((w as f32 * s).round() as u32).max(1),
                ((h as f32 * s).round() as u32).max(1),
                image::imageops::FilterType::Triangle,
            ),
            CopyKind::Jpeg(q) => {
                let mut out = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, q)
                    .encode(image.as_raw(), w, h, image::ExtendedColorType::L8)
                    .expect("a gray image encodes as JPEG");
                return out;
            }
            CopyKind::Brightness(f) => map(image, |v| v * f),
            CopyKind::Gamma(g) => map(image, |v| 255.0 * (v / 255.0).powf(g)),
        };
        png(&out)
    }
}

fn map(image: &GrayImage, f: impl Fn(f32) -> f32) -> GrayImage {
    GrayImage::from_fn(image.width(), image.height(), |x, y| {
        Luma([f(f32::from(image.get_pixel(x, y).0[0])).round().clamp(0.0, 255.0) as u8])
    })
}

/// PNG bytes of a gray image.
pub fn png(image: &GrayImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("a gray image encodes as PNG");
    out.into_inner()
}

/// Rotates about the centre (bilinear), keeps the central part free of black corners
/// (`1 / (cos + sin)` of each side) and resizes it back to the original size.
fn rotate_crop(image: &GrayImage, degrees: f32) -> GrayImage {
    let (w, h) = image.dimensions();
    let (sin, cos) = degrees.to_radians().sin_cos();
    let share = 1.0 / (cos.abs() + sin.abs());
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let sample = |x: f32, y: f32| -> f32 {
        let x = x.clamp(0.0, (w - 1) as f32);
        let y = y.clamp(0.0, (h - 1) as f32);
        let (x0, y0) = (x.floor() as u32, y.floor() as u32);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let p = |xx: u32, yy: u32| f32::from(image.get_pixel(xx, yy).0[0]);
        (p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx) * (1.0 - fy)
            + (p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx) * fy
    };
    GrayImage::from_fn(w, h, |x, y| {
        // Output pixel → point of the cropped, rotated picture → source pixel.
        let u = (x as f32 + 0.5 - cx) * share;
        let v = (y as f32 + 0.5 - cy) * share;
        let (sx, sy) = (u * cos - v * sin + cx - 0.5, u * sin + v * cos + cy - 0.5);
        Luma([sample(sx, sy).round().clamp(0.0, 255.0) as u8])
    })
}
