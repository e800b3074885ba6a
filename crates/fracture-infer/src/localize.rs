//! Measured localization: the evidence of fractured images against radiologists' boxes (the
//! pointing game and IoU), a box file reader, and the contact sheet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fracture_data::{DecodeLimits, Item, read_file_limited};
use fracture_eval::{LocalizationReport, Localized, PixelBox};
use fracture_model::{CamLayer, CamMethod};
use serde::{Deserialize, Serialize};

use crate::csvio::{csv_error, open_csv};
use crate::evidence::Evidence;
use crate::{Result, TrainedModel};

/// The pointing game's tolerance: a peak within this share of the image's longer side of a box
/// counts as inside it.
pub const POINTING_MARGIN: f64 = 0.05;

/// The largest coordinate or side a box may have, in pixels: the largest image the decoder accepts
/// ([`DecodeLimits::default`]).
pub const MAX_BOX_PIXELS: f64 = 16_384.0;

/// Replicates of the localization intervals.
const RESAMPLES: usize = 2000;

/// Annotated fracture boxes per image id (a file name without its extension), in the image's own
/// pixels.
pub type BoxIndex = HashMap<String, Vec<PixelBox>>;

/// Reads a box file: a CSV with a header holding `id`, `x`, `y`, `w`, `h` (the format of
/// FracAtlas's `fracatlas-boxes.csv`: top-left corner, width and height in pixels; other columns
/// such as `split` are ignored; an image may have several rows). A bad row is an error naming its
/// line.
pub fn read_boxes(path: &Path) -> Result<BoxIndex> {
    let bad = |line: u64, why: &str| csv_error(path, line, why);
    let (mut reader, header) = open_csv(path)?;
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (Some(id), Some(x), Some(y), Some(w), Some(h)) = (col("id"), col("x"), col("y"), col("w"), col("h"))
    else {
        return Err(bad(1, "the header needs the columns id, x, y, w and h"));
    };
    let mut out = BoxIndex::new();
    for record in reader.records() {
        let record = record.map_err(|e| bad(e.position().map_or(0, |p| p.line()), &e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let num = |k: usize| -> Result<f64> {
            record
                .get(k)
                .and_then(|c| c.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    bad(
                        line,
                        &format!("column {} is not a number", header.get(k).unwrap_or("?")),
                    )
                })
        };
        let b = [num(x)?, num(y)?, num(w)?, num(h)?];
        if b[0] < 0.0 || b[1] < 0.0 {
            return Err(bad(line, "a box whose corner lies left of or above the image"));
        }
        if b[2] <= 0.0 || b[3] <= 0.0 {
            return Err(bad(line, "a box of zero or negative width or height"));
        }
        if b.iter().any(|&v| v > MAX_BOX_PIXELS) {
            return Err(bad(
                line,
                &format!("a box reaching beyond {MAX_BOX_PIXELS} pixels, larger than any accepted image"),
            ));
        }
        let key = record.get(id).unwrap_or_default().trim().to_string();
        out.entry(key).or_default().push(b);
    }
    Ok(out)
}

/// The id a box file uses for an image: its file name without the extension.
pub fn image_id(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One localized image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalizedImage {
    /// The file.
    pub path: PathBuf,
    /// P(fractured).
    pub p_fractured: f64,
    /// The evidence (`None` when the map is empty: a miss with IoU 0).
    pub evidence: Option<Evidence>,
    /// The annotated boxes.
    pub boxes: Vec<PixelBox>,
    /// The image's width and height.
    pub size: [u32; 2],
    /// The score.
    pub score: Localized,
}

/// The localization of a set of images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Localization {
    /// Pointing game and mean IoU with intervals.
    pub report: LocalizationReport,
    /// The map the evidence came from: `Head` (the localization head), or `Last` / `Stride16`
    /// with the activation-map method (`Last HiResCam`).
    #[serde(default)]
    pub map: String,
    /// The map level the evidence boxes were drawn at.
    pub level: f32,
    /// Fractured images without a box (left out of the report).
    pub without_boxes: usize,
    /// Per image.
    pub images: Vec<LocalizedImage>,
}

/// Scores the evidence of every fractured image of `items` that has boxes in `boxes`: the map's
/// peak against the boxes enlarged by [`POINTING_MARGIN`] of the image's longer side, and the IoU of
/// the evidence box (region at `level` of the maximum) with the nearest box. An unreadable image
/// is an error naming it.
pub fn localize_items(
    model: &TrainedModel,
    items: &[Item],
    boxes: &BoxIndex,
    limits: &DecodeLimits,
    method: CamMethod,
    layer: CamLayer,
    level: f32,
) -> Result<Localization> {
    let predictor = model.predictor().with_limits(*limits);
    let mut images = Vec::new();
    let mut without_boxes = 0;
    for item in items.iter().filter(|i| i.label.is_fractured()) {
        let Some(truth) = boxes.get(&image_id(&item.path)).filter(|b| !b.is_empty()) else {
            without_boxes += 1;
            continue;
        };
        let bytes = read_file_limited(&item.path, limits)?;
        let explained = predictor.explain(&bytes, &item.path, method, layer)?;
        let (w, h) = explained.image.dimensions();
        // A box must lie in its image (a pixel and 1% of slack for rounding in the annotation).
        let (wf, hf) = (f64::from(w), f64::from(h));
        if let Some(b) = truth
            .iter()
            .find(|b| b[0] + b[2] > wf * 1.01 + 1.0 || b[1] + b[3] > hf * 1.01 + 1.0)
        {
            return Err(crate::Error::InvalidConfig(format!(
                "{}: its box [x {}, y {}, w {}, h {}] (id `{}` in the box file) lies outside the image of {w} × {h} pixels",
                fracture_data::path_text(&item.path),
                b[0],
                b[1],
                b[2],
                b[3],
                image_id(&item.path)
            )));
        }
        let evidence = explained.evidence_at(level);
        let margin = POINTING_MARGIN * f64::from(w.max(h));
        let score = match evidence {
            Some(e) => Localized::score(e.peak, e.region, truth, margin),
            None => Localized { hit: false, iou: 0.0 },
        };
        images.push(LocalizedImage {
            path: item.path.clone(),
            p_fractured: explained.p_fractured,
            evidence,
            boxes: truth.clone(),
            size: [w, h],
            score,
        });
    }
    let scores: Vec<Localized> = images.iter().map(|i| i.score).collect();
    Ok(Localization {
        report: LocalizationReport::new(&scores, RESAMPLES, 0),
        map: match layer {
            CamLayer::Head => "Head".to_string(),
            other => format!("{other:?} {method:?}"),
        },
        level,
        without_boxes,
        images,
    })
}

/// The contact sheet of the first `count` localized images (6 per row): radiologists' boxes green,
/// the evidence box and peak red. PNG bytes.
pub fn contact_sheet(localization: &Localization, limits: &DecodeLimits, count: usize) -> Result<Vec<u8>> {
    let mut decoded = Vec::new();
    for img in localization.images.iter().take(count) {
        let bytes = read_file_limited(&img.path, limits)?;
        decoded.push(fracture_data::decode_gray(&bytes, &img.path, limits)?);
    }
    let captions: Vec<String> = localization
        .images
        .iter()
        .map(|img| {
            img.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let tiles: Vec<fracture_plot::SheetTile<'_>> = localization
        .images
        .iter()
        .zip(&decoded)
        .zip(&captions)
        .map(|((img, gray), caption)| fracture_plot::SheetTile {
            image: gray,
            truth: &img.boxes,
            evidence: img.evidence.map(|e| e.region),
            peak: img.evidence.map(|e| e.peak),
            caption: Some(caption),
        })
        .collect();
    Ok(fracture_plot::contact_sheet_png(&tiles, 6, 256)?)
}
