//! Heatmaps: colour-mapped activation maps, alone (with transparency) or laid over a radiograph.

use crate::{Error, Result};

/// Bilinear resampling of a row-major `sw × sh` map to `dw × dh` (pixel centres aligned).
pub fn resample(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    let mut out = vec![0.0; dw * dh];
    if sw == 0 || sh == 0 || src.len() < sw * sh {
        return out;
    }
    let axis = |d: usize, dn: usize, sn: usize| -> (usize, usize, f32) {
        let f = (((d as f32 + 0.5) * sn as f32 / dn as f32) - 0.5).clamp(0.0, (sn - 1) as f32);
        let i0 = f.floor() as usize;
        (i0, (i0 + 1).min(sn - 1), f - i0 as f32)
    };
    for y in 0..dh {
        let (y0, y1, fy) = axis(y, dh, sh);
        for x in 0..dw {
            let (x0, x1, fx) = axis(x, dw, sw);
            let top = src[y0 * sw + x0] * (1.0 - fx) + src[y0 * sw + x1] * fx;
            let bottom = src[y1 * sw + x0] * (1.0 - fx) + src[y1 * sw + x1] * fx;
            out[y * dw + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

/// The colour for `v` in [0, 1] (a map's value relative to its maximum): blue → green → yellow →
/// red, the order people read heatmaps in (red = strongest evidence).
pub fn colormap(v: f32) -> [u8; 3] {
    const STOPS: [(f32, [f32; 3]); 5] = [
        (0.0, [30.0, 60.0, 200.0]),
        (0.3, [30.0, 150.0, 255.0]),
        (0.55, [50.0, 215.0, 100.0]),
        (0.78, [255.0, 215.0, 30.0]),
        (1.0, [235.0, 35.0, 20.0]),
    ];
    let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
    let k = STOPS
        .iter()
        .position(|s| s.0 >= v)
        .unwrap_or(STOPS.len() - 1)
        .max(1);
    let (a, b) = (STOPS[k - 1], STOPS[k]);
    let t = (v - a.0) / (b.0 - a.0);
    [0, 1, 2].map(|c| (a.1[c] + (b.1[c] - a.1[c]) * t).round() as u8)
}

/// How opaque the map is drawn at `v` (times the chosen opacity): nothing below [`HEATMAP_FLOOR`], so
/// the weak background of every map leaves the radiograph clear, then rising to full at 0.7.
pub fn heatmap_alpha(v: f32) -> f32 {
    let v = if v.is_finite() { v } else { 0.0 };
    let t = ((v - HEATMAP_FLOOR) / (0.7 - HEATMAP_FLOOR)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The share of a map's maximum below which nothing is drawn.
pub const HEATMAP_FLOOR: f32 = 0.2;

/// Height in pixels of the legend band that [`overlay_png`] adds below the image.
pub const LEGEND_HEIGHT: u32 = 30;

fn encode(pixels: &[u8], w: u32, h: u32, color: image::ExtendedColorType) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    image::ImageEncoder::write_image(image::codecs::png::PngEncoder::new(&mut png), pixels, w, h, color)
        .map_err(|e| Error::Draw {
            chart: "heatmap",
            reason: e.to_string(),
        })?;
    Ok(png)
}

/// The map `w × h` (values in [0, 1]) as an RGBA PNG: colour from [`colormap`], opacity rising with
/// the value (fully transparent at 0), to lay over the image it explains.
pub fn heatmap_rgba_png(map: &[f32], w: u32, h: u32) -> Result<Vec<u8>> {
    let n = (w * h) as usize;
    let mut rgba = Vec::with_capacity(n * 4);
    for &v in map.iter().take(n) {
        let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
        let [r, g, b] = colormap(v);
        rgba.extend([r, g, b, (heatmap_alpha(v) * 255.0).round() as u8]);
    }
    rgba.resize(n * 4, 0);
    encode(&rgba, w, h, image::ExtendedColorType::Rgba8)
}

/// The gray image `w × h` with the map (same size, values in [0, 1]) blended over it at `opacity`
/// (0-1, scaled by [`heatmap_alpha`]), and `mark` (an evidence box `[x, y, width, height]` in the
/// same pixels, when given) outlined in red, 2 px, as an RGB PNG of `w × (h + LEGEND_HEIGHT)`:
/// below the image, a legend band shows the colour scale ("evidence for fractured", low to high;
/// words only where the image is wide enough for them).
pub fn overlay_png(
    gray: &[u8],
    map: &[f32],
    w: u32,
    h: u32,
    opacity: f32,
    mark: Option<[f64; 4]>,
) -> Result<Vec<u8>> {
    let n = (w * h) as usize;
    let mut rgb = Vec::with_capacity(n * 3);
    for i in 0..n {
        let g = f32::from(gray.get(i).copied().unwrap_or(0));
        let v = map
            .get(i)
            .copied()
            .filter(|v| v.is_finite())
            .unwrap_or(0.0)
            .clamp(0.0, 1.0);
        let a = opacity.clamp(0.0, 1.0) * heatmap_alpha(v);
        let c = colormap(v);
        rgb.extend(c.map(|c| (g * (1.0 - a) + f32::from(c) * a).round() as u8));
    }
    if let Some([bx, by, bw, bh]) = mark.filter(|m| m.iter().all(|v| v.is_finite())) {
        let clamp = |v: f64, hi: u32| v.round().clamp(0.0, f64::from(hi.saturating_sub(1))) as u32;
        let (x0, y0) = (clamp(bx, w), clamp(by, h));
        let (x1, y1) = (clamp(bx + bw, w), clamp(by + bh, h));
        for y in y0..=y1 {
            for x in x0..=x1 {
                let edge = x < x0 + 2 || x + 2 > x1 || y < y0 + 2 || y + 2 > y1;
                if edge {
                    let i = (y * w + x) as usize * 3;
                    if let Some(px) = rgb.get_mut(i..i + 3) {
                        px.copy_from_slice(&[230, 40, 40]);
                    }
                }
            }
        }
    }
    let mut canvas = image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| Error::Draw {
        chart: "heatmap",
        reason: "the image and its size disagree".into(),
    })?;
    canvas = with_legend(canvas, opacity)?;
    let (cw, ch) = canvas.dimensions();
    encode(canvas.as_raw(), cw, ch, image::ExtendedColorType::Rgb8)
}

/// `canvas` with the legend band below it: a colour bar from [`HEATMAP_FLOOR`] to 1 as drawn over
/// mid gray at `opacity`, with "evidence for fractured: low … high" when the width allows.
fn with_legend(canvas: image::RgbImage, opacity: f32) -> Result<image::RgbImage> {
    let (w, h) = canvas.dimensions();
    let mut out = image::RgbImage::from_pixel(w, h + LEGEND_HEIGHT, image::Rgb([250, 250, 250]));
    image::imageops::replace(&mut out, &canvas, 0, 0);
    let title = "evidence for fractured:";
    let size = 14.0;
    let text = crate::scaffold::GREY;
    let ink = plotters::style::RGBColor(60, 60, 60);
    let (title_w, low_w, high_w) = (
        crate::scaffold::text_width(title, size),
        crate::scaffold::text_width("low", size),
        crate::scaffold::text_width("high", size),
    );
    let words = w >= title_w + low_w + high_w + 80;
    let (bar_x0, bar_x1) = if words {
        (title_w + low_w + 16, w - high_w - 8)
    } else {
        (2.min(w), w.saturating_sub(2))
    };
    let (bar_y0, bar_y1) = (h + 8, h + LEGEND_HEIGHT - 8);
    let a = opacity.clamp(0.0, 1.0).max(0.6);
    for x in bar_x0..bar_x1 {
        let v = HEATMAP_FLOOR + (1.0 - HEATMAP_FLOOR) * (x - bar_x0) as f32 / (bar_x1 - bar_x0).max(1) as f32;
        let c = colormap(v);
        let alpha = a * heatmap_alpha(v).max(0.35);
        let px = image::Rgb(c.map(|c| (128.0 * (1.0 - alpha) + f32::from(c) * alpha).round() as u8));
        for y in bar_y0..bar_y1 {
            out.put_pixel(x, y, px);
        }
    }
    if words {
        let y = (h + LEGEND_HEIGHT / 2) as i32 - 8;
        for (x, label, color) in [
            (4, title, ink),
            (title_w + 10, "low", text),
            (bar_x1 + 4, "high", text),
        ] {
            crate::scaffold::draw_text("heatmap legend", &mut out, (x as i32, y), label, size, color)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_preserves_constants_and_direction() {
        assert!(
            resample(&[0.7; 6], 3, 2, 9, 5)
                .iter()
                .all(|v| (v - 0.7).abs() < 1e-6)
        );
        let ramp = resample(&[0.0, 1.0], 2, 1, 8, 1);
        assert!(ramp.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((ramp[0], ramp[7]), (0.0, 1.0));
    }

    #[test]
    fn colormap_runs_from_cool_to_hot() {
        let cold = colormap(0.0);
        let hot = colormap(1.0);
        assert!(cold[2] > cold[0] && hot[0] > hot[2]);
        assert_eq!(colormap(f32::NAN), colormap(0.0));
    }

    #[test]
    fn weak_evidence_leaves_the_radiograph_clear_and_strong_evidence_is_plain_at_the_default_opacity() {
        let gray = vec![128u8; 4];
        let map = [0.1f32, 0.5, 0.8, 1.0];
        let over = image::load_from_memory(&overlay_png(&gray, &map, 4, 1, 0.6, None).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(
            over.dimensions(),
            (4, 1 + LEGEND_HEIGHT),
            "the legend band lies below"
        );
        assert_eq!(
            over.get_pixel(0, 0).0,
            [128, 128, 128],
            "below the floor: untouched"
        );
        let shift = |x: u32| {
            over.get_pixel(x, 0)
                .0
                .iter()
                .map(|&c| (i32::from(c) - 128).abs())
                .max()
                .unwrap_or(0)
        };
        assert!(shift(1) > 15 && shift(2) > 50 && shift(3) > 60, "{over:?}");
        // The strongest evidence reads as red, not as a cyan tint.
        let hot = over.get_pixel(3, 0).0;
        assert!(hot[0] > hot[1] && hot[0] > hot[2], "{hot:?}");
    }

    #[test]
    fn a_wide_overlay_has_worded_legend() {
        let (w, h) = (400u32, 20u32);
        let gray = vec![128u8; (w * h) as usize];
        let map = vec![0.0f32; (w * h) as usize];
        let over = image::load_from_memory(&overlay_png(&gray, &map, w, h, 0.6, None).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(over.dimensions(), (w, h + LEGEND_HEIGHT));
        // Dark text pixels at the left of the band (the words), coloured ones at its right (the bar).
        let dark = (0..120)
            .flat_map(|x| (h..h + LEGEND_HEIGHT).map(move |y| (x, y)))
            .filter(|&(x, y)| over.get_pixel(x, y).0.iter().all(|&c| c < 120))
            .count();
        assert!(dark > 20, "the words are drawn");
        let bar = over.get_pixel(w - 60, h + LEGEND_HEIGHT / 2).0;
        assert!(bar[0] > bar[2], "the bar's high end is warm: {bar:?}");
    }

    #[test]
    fn pngs_decode_with_the_right_size_and_transparency() {
        let map: Vec<f32> = (0..64).map(|i| i as f32 / 63.0).collect();
        let rgba = image::load_from_memory(&heatmap_rgba_png(&map, 8, 8).unwrap())
            .unwrap()
            .to_rgba8();
        assert_eq!(rgba.dimensions(), (8, 8));
        assert_eq!(rgba.get_pixel(0, 0).0[3], 0, "no evidence: transparent");
        assert!(rgba.get_pixel(7, 7).0[3] > 200);
        let gray = vec![100u8; 64];
        let over = image::load_from_memory(&overlay_png(&gray, &map, 8, 8, 0.8, None).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(over.get_pixel(0, 0).0, [100, 100, 100]);
        assert_ne!(over.get_pixel(7, 7).0, [100, 100, 100]);
        // A mark is outlined in red; inside it the overlay is unchanged.
        let zero = vec![0.0f32; 64];
        let marked = image::load_from_memory(
            &overlay_png(&gray, &zero, 8, 8, 0.8, Some([1.0, 1.0, 5.0, 5.0])).unwrap(),
        )
        .unwrap()
        .to_rgb8();
        assert_eq!(marked.get_pixel(1, 1).0, [230, 40, 40]);
        assert_eq!(marked.get_pixel(6, 3).0, [230, 40, 40]);
        assert_eq!(marked.get_pixel(3, 3).0, [100, 100, 100]);
        assert_eq!(marked.get_pixel(0, 0).0, [100, 100, 100]);
    }
}

/// Height of one line of [`with_banner`] text, in pixels.
pub const BANNER_LINE: u32 = 22;

/// `canvas` with a black band above it holding `lines` of white text (17 px, each shortened with
/// "…" to fit the width): for results burned into an image (a DICOM secondary capture), where a
/// viewer shows pixels and nothing else.
pub fn with_banner(canvas: image::RgbImage, lines: &[&str]) -> Result<image::RgbImage> {
    let (w, h) = canvas.dimensions();
    let band = BANNER_LINE * lines.len() as u32 + if lines.is_empty() { 0 } else { 8 };
    let mut out = image::RgbImage::from_pixel(w, h + band, image::Rgb([0, 0, 0]));
    image::imageops::replace(&mut out, &canvas, 0, i64::from(band));
    let white = plotters::style::RGBColor(255, 255, 255);
    for (i, line) in lines.iter().enumerate() {
        let fitted = crate::sheet::fit(line, w.saturating_sub(12), 17.0);
        crate::scaffold::draw_text(
            "banner",
            &mut out,
            (6, (4 + BANNER_LINE * i as u32) as i32),
            &fitted,
            17.0,
            white,
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod banner_tests {
    use super::*;

    #[test]
    fn the_banner_sits_above_the_image_and_holds_text() {
        let canvas = image::RgbImage::from_pixel(300, 40, image::Rgb([100, 100, 100]));
        let out = with_banner(canvas, &["fractured  P = 0.93", "not for diagnostic use"]).unwrap();
        assert_eq!(out.dimensions(), (300, 40 + 2 * BANNER_LINE + 8));
        let band = 2 * BANNER_LINE + 8;
        // The image moved down unchanged; the band is black with white text in it.
        assert!((0..300).all(|x| out.get_pixel(x, band + 10).0 == [100, 100, 100]));
        let lit = (0..band)
            .flat_map(|y| (0..300).map(move |x| (x, y)))
            .filter(|&(x, y)| out.get_pixel(x, y).0[0] > 128)
            .count();
        assert!(lit > 100, "{lit} text pixels");
    }
}
