//! Where the evidence lies, in the image's own pixels: the heatmap's peak and a box around the
//! region that holds it.

use fracture_data::ContentBox;
use serde::{Deserialize, Serialize};

/// The share of the map's maximum a pixel must reach to belong to the evidence region (the region
/// is the connected area around the peak at or above it).
pub const EVIDENCE_LEVEL: f32 = 0.5;

/// A prediction's evidence in the input image's own pixel coordinates (after EXIF orientation,
/// before any resize): what `predict --format json` and the API report as
/// `"evidence": {"peak": [x, y], "box": [x, y, w, h]}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The map's maximum, `[x, y]`, pixels.
    pub peak: [f64; 2],
    /// The box around the connected region at or above [`EVIDENCE_LEVEL`] of the maximum that
    /// holds the peak, `[x, y, width, height]`, pixels.
    #[serde(rename = "box")]
    pub region: [f64; 4],
}

/// The evidence of a `size × size` map over the network input (row-major, ≥ 0), of which `content`
/// is the image's area, for an image of `image` = `(width, height)` pixels; regions hold the pixels
/// at or above `level` × the maximum. `None` when the map is zero over the image (no region raises
/// the score).
pub fn locate(
    map: &[f32],
    size: usize,
    content: ContentBox,
    image: (u32, u32),
    level: f32,
) -> Option<Evidence> {
    let (cx, cy) = (content.x as usize, content.y as usize);
    let (cw, ch) = (content.width as usize, content.height as usize);
    if cw == 0 || ch == 0 || cx + cw > size || cy + ch > size || map.len() < size * size {
        return None;
    }
    let at = |x: usize, y: usize| map[(cy + y) * size + cx + x];
    let mut best = 0.0f32;
    for y in 0..ch {
        for x in 0..cw {
            best = best.max(at(x, y));
        }
    }
    if best <= 0.0 {
        return None;
    }
    // An upsampled map holds its border cells' values flat out to the image edge, so a maximum can
    // be a plateau; of its pixels the peak is the one nearest the image centre (for a border cell,
    // the cell's own centre, where the plateau begins).
    let centre = ((cw as f64 - 1.0) / 2.0, (ch as f64 - 1.0) / 2.0);
    let distance = |(x, y): (usize, usize)| (x as f64 - centre.0).powi(2) + (y as f64 - centre.1).powi(2);
    let mut peak = (0, 0);
    let mut nearest = f64::INFINITY;
    for y in 0..ch {
        for x in 0..cw {
            if at(x, y) == best && distance((x, y)) < nearest {
                nearest = distance((x, y));
                peak = (x, y);
            }
        }
    }
    // The connected region (4-neighbours) around the peak at or above the level.
    let floor = best * level;
    let mut seen = vec![false; cw * ch];
    let mut stack = vec![peak];
    seen[peak.1 * cw + peak.0] = true;
    let (mut x0, mut y0, mut x1, mut y1) = (peak.0, peak.1, peak.0, peak.1);
    while let Some((x, y)) = stack.pop() {
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        let neighbours = [
            (x.wrapping_sub(1), y),
            (x + 1, y),
            (x, y.wrapping_sub(1)),
            (x, y + 1),
        ];
        for (nx, ny) in neighbours {
            if nx < cw && ny < ch && !seen[ny * cw + nx] && at(nx, ny) >= floor {
                seen[ny * cw + nx] = true;
                stack.push((nx, ny));
            }
        }
    }
    let sx = f64::from(image.0) / cw as f64;
    let sy = f64::from(image.1) / ch as f64;
    Some(Evidence {
        peak: [(peak.0 as f64 + 0.5) * sx, (peak.1 as f64 + 0.5) * sy],
        region: [
            x0 as f64 * sx,
            y0 as f64 * sy,
            (x1 - x0 + 1) as f64 * sx,
            (y1 - y0 + 1) as f64 * sy,
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_and_box_come_back_in_the_image_pixels() {
        // A 20 × 20 input whose image sits letterboxed in rows 5..15 (a 400 × 200 image).
        let size = 20;
        let content = ContentBox {
            x: 0,
            y: 5,
            width: 20,
            height: 10,
        };
        let mut map = vec![0.0f32; size * size];
        // A blob at input columns 12..=14, rows 8..=9 (content rows 3..=4), peak at (13, 9).
        for y in 8..=9 {
            for x in 12..=14 {
                map[y * size + x] = 0.6;
            }
        }
        map[9 * size + 13] = 1.0;
        // A separate, weaker-but-above-level spot that is not connected: not in the box.
        map[6 * size + 2] = 0.9;
        // Something strong in the letterbox padding is ignored.
        map[size + 1] = 5.0;
        let e = locate(&map, size, content, (400, 200), 0.5).unwrap();
        // 20 px per input pixel both ways.
        assert_eq!(e.peak, [13.5 * 20.0, 4.5 * 20.0]);
        assert_eq!(e.region, [12.0 * 20.0, 3.0 * 20.0, 3.0 * 20.0, 2.0 * 20.0]);
        // A higher level keeps only the peak pixel.
        let tight = locate(&map, size, content, (400, 200), 0.7).unwrap();
        assert_eq!(tight.region, [260.0, 80.0, 20.0, 20.0]);
        assert!(locate(&vec![0.0; size * size], size, content, (400, 200), 0.5).is_none());
        // A maximum held flat out to the image's left edge (a border cell, upsampled): the peak is
        // where the plateau begins, nearest the centre, not at the edge.
        let mut flat = vec![0.1f32; size * size];
        for y in 10..=13 {
            for x in 0..=4 {
                flat[y * size + x] = 1.0;
            }
        }
        let edge = locate(&flat, size, content, (400, 200), 0.5).unwrap();
        assert_eq!(edge.peak, [4.5 * 20.0, 5.5 * 20.0]);
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"box\":[240.0,60.0,60.0,40.0]"), "{json}");
    }
}
