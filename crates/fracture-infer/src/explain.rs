//! One image in, P(fractured) and where the evidence lies out: what `fracture serve` and
//! `fracture predict --heatmap` show.

use fracture_data::ContentBox;
use fracture_data::image::GrayImage;

use crate::Result;

/// A prediction with its activation map.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// P(fractured).
    pub p_fractured: f64,
    /// Whether `p_fractured >= threshold`.
    pub fractured: bool,
    /// The decoded image at full resolution (8-bit luma).
    pub image: GrayImage,
    /// The activation map over the network input, `size × size`, in [0, 1].
    pub map: Vec<f32>,
    /// The network input's side.
    pub size: u32,
    /// Where the image lies in the input (all of it for stretch, the centre for letterbox).
    pub content: ContentBox,
    /// The map's value drawn at full strength in heatmaps: 1 for an activation map (already scaled
    /// by its maximum), [`HEAD_FULL_STRENGTH`] for the localization head's probabilities.
    pub full_strength: f32,
}

/// The localization head's cell probability drawn at full strength (red) in heatmaps. The head's
/// peak on val's fractured radiographs is typically about 0.5, on intact ones mostly below 0.3:
/// drawn as they are, the probabilities are a faint tint; divided by this they read at a glance,
/// and an intact image still stays mostly clear. Drawing only: every figure uses the map as it is.
pub const HEAD_FULL_STRENGTH: f32 = 0.6;

impl Explanation {
    /// The map over the image's own area (the content box), `(values, width, height)` at input
    /// resolution: stretch it over the original image to see where the evidence lies.
    pub fn map_over_image(&self) -> (Vec<f32>, u32, u32) {
        let b = self.content;
        let s = self.size as usize;
        let mut out = Vec::with_capacity((b.width * b.height) as usize);
        for y in b.y..b.y + b.height {
            let row = y as usize * s;
            out.extend_from_slice(&self.map[row + b.x as usize..row + (b.x + b.width) as usize]);
        }
        (out, b.width, b.height)
    }

    /// Where the evidence lies, in the image's own pixels (see [`crate::evidence`]); `None` when the
    /// map is empty.
    pub fn evidence(&self) -> Option<crate::evidence::Evidence> {
        self.evidence_at(crate::evidence::EVIDENCE_LEVEL)
    }

    /// [`Explanation::evidence`] with the region drawn at `level` of the map's maximum.
    pub fn evidence_at(&self, level: f32) -> Option<crate::evidence::Evidence> {
        crate::evidence::locate(
            &self.map,
            self.size as usize,
            self.content,
            self.image.dimensions(),
            level,
        )
    }

    /// [`Explanation::map_over_image`] as drawn: divided by [`Explanation::full_strength`], capped
    /// at 1.
    pub fn display_map(&self) -> (Vec<f32>, u32, u32) {
        let (mut map, w, h) = self.map_over_image();
        let scale = 1.0 / self.full_strength.max(1e-6);
        for v in &mut map {
            *v = (*v * scale).min(1.0);
        }
        (map, w, h)
    }

    /// [`Explanation::display_map`] as a colour-mapped RGBA PNG (transparent where there is no
    /// evidence).
    pub fn heatmap_png(&self) -> Result<Vec<u8>> {
        let (map, w, h) = self.display_map();
        Ok(fracture_plot::heatmap_rgba_png(&map, w, h)?)
    }

    /// The image (scaled so its longer side is at most `max_side`) with the map blended over it,
    /// and, when `with_box` (a fractured call: below the threshold a box would read as a fracture),
    /// the evidence box outlined in red.
    pub fn overlay_png(&self, max_side: u32, opacity: f32, with_box: bool) -> Result<Vec<u8>> {
        let (w, h) = self.image.dimensions();
        let scale = (f64::from(max_side) / f64::from(w.max(h))).min(1.0);
        let (ow, oh) = (
            ((f64::from(w) * scale).round() as u32).max(1),
            ((f64::from(h) * scale).round() as u32).max(1),
        );
        let base = fracture_data::image::imageops::resize(
            &self.image,
            ow,
            oh,
            fracture_data::image::imageops::FilterType::Triangle,
        );
        let (map, mw, mh) = self.display_map();
        let map = fracture_plot::resample(&map, mw as usize, mh as usize, ow as usize, oh as usize);
        let mark = with_box
            .then(|| self.evidence())
            .flatten()
            .map(|e| e.region.map(|v| v * scale));
        Ok(fracture_plot::overlay_png(
            base.as_raw(),
            &map,
            ow,
            oh,
            opacity,
            mark,
        )?)
    }
}
