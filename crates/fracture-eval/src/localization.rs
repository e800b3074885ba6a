//! Does a heatmap point at the fracture? The pointing game and box overlap against annotated boxes.

use serde::{Deserialize, Serialize};

use crate::Interval;

/// A box `[x, y, width, height]` in pixels, `(x, y)` its top-left corner.
pub type PixelBox = [f64; 4];

/// Intersection over union of two boxes (0 when either is empty).
///
/// ```
/// use fracture_eval::iou;
/// assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]), 1.0);
/// assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0]), 50.0 / 150.0);
/// assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 5.0, 5.0]), 0.0);
/// ```
pub fn iou(a: PixelBox, b: PixelBox) -> f64 {
    let ix = (a[0] + a[2]).min(b[0] + b[2]) - a[0].max(b[0]);
    let iy = (a[1] + a[3]).min(b[1] + b[3]) - a[1].max(b[1]);
    let inter = ix.max(0.0) * iy.max(0.0);
    let union = a[2].max(0.0) * a[3].max(0.0) + b[2].max(0.0) * b[3].max(0.0) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Whether `point` falls inside one of `boxes`, each enlarged by `margin` pixels on every side (the
/// pointing game's tolerance: 5% of the image side in our reports).
pub fn points_inside(point: [f64; 2], boxes: &[PixelBox], margin: f64) -> bool {
    boxes.iter().any(|b| {
        point[0] >= b[0] - margin
            && point[0] <= b[0] + b[2] + margin
            && point[1] >= b[1] - margin
            && point[1] <= b[1] + b[3] + margin
    })
}

/// One image's localization: whether the peak hit a box and the best overlap of the evidence box
/// with a ground-truth box.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Localized {
    /// The peak fell inside a (margin-enlarged) ground-truth box.
    pub hit: bool,
    /// IoU of the evidence box with the ground-truth box it overlaps most.
    pub iou: f64,
}

impl Localized {
    /// Scores one image: `peak` and `evidence` against its ground-truth `boxes` (at least one), with
    /// the pointing game's `margin` in pixels.
    pub fn score(peak: [f64; 2], evidence: PixelBox, boxes: &[PixelBox], margin: f64) -> Self {
        Localized {
            hit: points_inside(peak, boxes, margin),
            iou: boxes.iter().map(|&b| iou(evidence, b)).fold(0.0, f64::max),
        }
    }
}

/// The localization of a set of images: pointing-game hit rate and mean IoU with their 95%
/// percentile-bootstrap intervals over images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocalizationReport {
    /// Images scored (fractured images with at least one box).
    pub n: usize,
    /// Share of images whose peak hit a box.
    pub pointing_game: Option<f64>,
    /// Its interval.
    pub pointing_game_ci: Option<Interval>,
    /// Mean IoU of the evidence box with the nearest ground-truth box.
    pub mean_iou: Option<f64>,
    /// Its interval.
    pub mean_iou_ci: Option<Interval>,
}

impl LocalizationReport {
    /// The report over `images`, intervals from `resamples` seeded bootstrap replicates.
    pub fn new(images: &[Localized], resamples: usize, seed: u64) -> Self {
        let hits: Vec<f64> = images.iter().map(|l| f64::from(u8::from(l.hit))).collect();
        let ious: Vec<f64> = images.iter().map(|l| l.iou).collect();
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        LocalizationReport {
            n: images.len(),
            pointing_game: mean(&hits),
            pointing_game_ci: crate::mean_ci(&hits, resamples, seed),
            mean_iou: mean(&ious),
            mean_iou_ci: crate::mean_ci(&ious, resamples, seed ^ 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_widens_every_side() {
        let b = [[10.0, 10.0, 10.0, 10.0]];
        assert!(points_inside([15.0, 15.0], &b, 0.0));
        assert!(!points_inside([8.0, 15.0], &b, 0.0));
        assert!(points_inside([8.0, 15.0], &b, 2.0));
        assert!(points_inside([22.0, 22.0], &b, 2.0));
        assert!(!points_inside([22.1, 15.0], &b, 2.0));
        assert!(!points_inside([15.0, 15.0], &[], 100.0));
    }

    #[test]
    fn scores_take_the_nearest_box_and_reports_average_them() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 10.0, 10.0]];
        let l = Localized::score([55.0, 55.0], [50.0, 50.0, 10.0, 10.0], &boxes, 0.0);
        assert_eq!(l, Localized { hit: true, iou: 1.0 });
        let miss = Localized::score([30.0, 30.0], [25.0, 25.0, 10.0, 10.0], &boxes, 0.0);
        assert_eq!(miss, Localized { hit: false, iou: 0.0 });
        let r = LocalizationReport::new(&[l, miss, l, l], 500, 3);
        assert_eq!((r.n, r.pointing_game, r.mean_iou), (4, Some(0.75), Some(0.75)));
        let ci = r.pointing_game_ci.unwrap();
        assert!(ci.lower <= 0.75 && 0.75 <= ci.upper && ci.lower >= 0.0 && ci.upper <= 1.0);
        let empty = LocalizationReport::new(&[], 100, 1);
        assert_eq!((empty.pointing_game, empty.mean_iou_ci), (None, None));
    }
}
