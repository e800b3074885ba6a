//! Contact sheets: radiographs in a grid with their ground-truth and evidence boxes drawn, so a
//! person can judge localization by eye.

use image::{GrayImage, Rgb, RgbImage};

use crate::{Error, Result};

/// Ground-truth boxes (green).
const TRUTH: Rgb<u8> = Rgb([40, 200, 60]);
/// The evidence box and its peak (red).
const EVIDENCE: Rgb<u8> = Rgb([230, 40, 40]);

/// One image of a contact sheet; boxes are `[x, y, width, height]` and points `[x, y]` in the
/// image's own pixels.
#[derive(Debug, Clone, Copy)]
pub struct SheetTile<'a> {
    /// The radiograph (8-bit gray).
    pub image: &'a GrayImage,
    /// The annotated boxes, drawn green.
    pub truth: &'a [[f64; 4]],
    /// The evidence box, drawn red.
    pub evidence: Option<[f64; 4]>,
    /// The map's peak, drawn as a red cross.
    pub peak: Option<[f64; 2]>,
    /// A line of text under the image (shortened with "…" to fit the cell).
    pub caption: Option<&'a str>,
}

/// Height in pixels of a caption line under each cell (only on sheets where a tile has one).
pub const CAPTION_HEIGHT: u32 = 20;

/// Lays `tiles` out row by row, `columns` per row, each image scaled to fit a `side × side` cell
/// (aspect kept, on black), with its boxes drawn 2 px wide and, when any tile has a caption, a
/// [`CAPTION_HEIGHT`] line of text under every cell; returns the PNG bytes.
pub fn contact_sheet_png(tiles: &[SheetTile<'_>], columns: usize, side: u32) -> Result<Vec<u8>> {
    let columns = columns.max(1);
    let rows = tiles.len().div_ceil(columns).max(1);
    let gap = 4u32;
    let caption_h = if tiles.iter().any(|t| t.caption.is_some()) {
        CAPTION_HEIGHT
    } else {
        0
    };
    let width = columns as u32 * (side + gap) + gap;
    let height = rows as u32 * (side + caption_h + gap) + gap;
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([24, 24, 24]));
    for (k, tile) in tiles.iter().enumerate() {
        let (col, row) = ((k % columns) as u32, (k / columns) as u32);
        let (ox, oy) = (gap + col * (side + gap), gap + row * (side + caption_h + gap));
        if let Some(text) = tile.caption {
            let fitted = fit(text, side.saturating_sub(4), 13.0);
            crate::scaffold::draw_text(
                "contact sheet",
                &mut canvas,
                ((ox + 2) as i32, (oy + side + 3) as i32),
                &fitted,
                13.0,
                plotters::style::RGBColor(225, 225, 225),
            )?;
        }
        let (iw, ih) = tile.image.dimensions();
        if iw == 0 || ih == 0 {
            continue;
        }
        let scale = f64::from(side) / f64::from(iw.max(ih));
        let (tw, th) = (
            ((f64::from(iw) * scale).round() as u32).clamp(1, side),
            ((f64::from(ih) * scale).round() as u32).clamp(1, side),
        );
        let small = image::imageops::resize(tile.image, tw, th, image::imageops::FilterType::Triangle);
        let (px, py) = (ox + (side - tw) / 2, oy + (side - th) / 2);
        for (x, y, p) in small.enumerate_pixels() {
            let v = p.0[0];
            canvas.put_pixel(px + x, py + y, Rgb([v, v, v]));
        }
        let to_canvas = |b: [f64; 4]| -> [i64; 4] {
            [
                px as i64 + (b[0] * scale).round() as i64,
                py as i64 + (b[1] * scale).round() as i64,
                px as i64 + ((b[0] + b[2]) * scale).round() as i64,
                py as i64 + ((b[1] + b[3]) * scale).round() as i64,
            ]
        };
        let clip = [px as i64, py as i64, (px + tw) as i64 - 1, (py + th) as i64 - 1];
        for &b in tile.truth {
            rectangle(&mut canvas, to_canvas(b), clip, TRUTH);
        }
        if let Some(b) = tile.evidence {
            rectangle(&mut canvas, to_canvas(b), clip, EVIDENCE);
        }
        if let Some([x, y]) = tile.peak {
            let (cx, cy) = (
                px as i64 + (x * scale).round() as i64,
                py as i64 + (y * scale).round() as i64,
            );
            for d in -5..=5 {
                for t in 0..2 {
                    put(&mut canvas, cx + d, cy + t, clip, EVIDENCE);
                    put(&mut canvas, cx + t, cy + d, clip, EVIDENCE);
                }
            }
        }
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        canvas.as_raw(),
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Draw {
        chart: "contact sheet",
        reason: e.to_string(),
    })?;
    Ok(png)
}

/// `text`, shortened from the left with "…" until it fits `width` pixels at `size` (the end of a
/// caption, the file name, is what tells images apart).
pub(crate) fn fit(text: &str, width: u32, size: f64) -> String {
    if crate::scaffold::text_width(text, size) <= width {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for skip in 1..chars.len() {
        let candidate: String = std::iter::once('…')
            .chain(chars[skip..].iter().copied())
            .collect();
        if crate::scaffold::text_width(&candidate, size) <= width {
            return candidate;
        }
    }
    String::new()
}

fn put(canvas: &mut RgbImage, x: i64, y: i64, clip: [i64; 4], color: Rgb<u8>) {
    if x >= clip[0] && x <= clip[2] && y >= clip[1] && y <= clip[3] {
        canvas.put_pixel(x as u32, y as u32, color);
    }
}

/// A 2-px outline of `[x0, y0, x1, y1]`, clipped to `clip`.
fn rectangle(canvas: &mut RgbImage, [x0, y0, x1, y1]: [i64; 4], clip: [i64; 4], color: Rgb<u8>) {
    for t in 0..2 {
        for x in x0..=x1 {
            put(canvas, x, y0 + t, clip, color);
            put(canvas, x, y1 - t, clip, color);
        }
        for y in y0..=y1 {
            put(canvas, x0 + t, y, clip, color);
            put(canvas, x1 - t, y, clip, color);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_land_where_the_image_pixels_say() {
        // A 100 × 50 image in a 100-px cell: scale 1, centred vertically (offset 25 + 4 gap).
        let img = GrayImage::from_pixel(100, 50, image::Luma([128]));
        let tile = SheetTile {
            image: &img,
            truth: &[[10.0, 10.0, 20.0, 20.0]],
            evidence: Some([60.0, 5.0, 30.0, 30.0]),
            peak: Some([75.0, 20.0]),
            caption: None,
        };
        let png = contact_sheet_png(&[tile, tile, tile], 2, 100).unwrap();
        let sheet = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(sheet.dimensions(), (2 * 104 + 4, 2 * 104 + 4));
        let (ox, oy) = (4, 4 + 25);
        assert_eq!(*sheet.get_pixel(ox + 10, oy + 10), TRUTH);
        assert_eq!(*sheet.get_pixel(ox + 20, oy + 30), TRUTH);
        assert_eq!(*sheet.get_pixel(ox + 60, oy + 20), EVIDENCE);
        assert_eq!(*sheet.get_pixel(ox + 75, oy + 20), EVIDENCE, "the peak's cross");
        assert_eq!(*sheet.get_pixel(ox + 40, oy + 40), Rgb([128, 128, 128]));
        // The fourth cell is empty background.
        assert_eq!(*sheet.get_pixel(104 + 50, 104 + 50), Rgb([24, 24, 24]));
    }

    #[test]
    fn captions_get_a_line_under_each_cell_and_long_ones_keep_their_end() {
        let img = GrayImage::from_pixel(100, 100, image::Luma([0]));
        let tile = SheetTile {
            image: &img,
            truth: &[],
            evidence: None,
            peak: None,
            caption: Some("val · fractured · IMG0000019.jpg"),
        };
        let sheet = image::load_from_memory(&contact_sheet_png(&[tile], 1, 100).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(sheet.dimensions(), (108, 100 + CAPTION_HEIGHT + 8));
        let bright = (104..104 + CAPTION_HEIGHT)
            .flat_map(|y| (4..104).map(move |x| (x, y)))
            .filter(|&(x, y)| sheet.get_pixel(x, y).0[0] > 150)
            .count();
        assert!(bright > 20, "the caption is drawn under the image");
        let short = fit(
            "train · not fractured · a/very/long/path/IMG0000019.jpg",
            150,
            13.0,
        );
        assert!(
            short.starts_with('…') && short.ends_with("IMG0000019.jpg"),
            "{short}"
        );
    }
}
