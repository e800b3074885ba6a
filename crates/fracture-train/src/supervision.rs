//! Annotated boxes as a training signal: each training image's fracture boxes in the network
//! input's pixels, moved with the image's augmentation, as the share of every cell of the
//! localization head's grid that they cover (see [`crate::loss::localization_loss`]).

use candle_core::{Device, Tensor};
use fracture_data::{Augmenter, DecodeLimits, FolderDataset, Label, PreprocessConfig, sample_rng};
use rayon::prelude::*;

use crate::Result;
use crate::localize::{BoxIndex, image_id};

/// What the localization loss knows about one training image.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    /// A fractured image without boxes: no localization signal.
    Unknown,
    /// A not-fractured image: no cell holds a fracture.
    Empty,
    /// A fractured image's boxes, `[x, y, w, h]` in the network input's pixels (before
    /// augmentation).
    Boxes(Vec<[f32; 4]>),
}

/// How many training images carry which signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BoxCounts {
    /// Fractured images with at least one box.
    pub(crate) boxed: usize,
    /// Their boxes.
    pub(crate) boxes: usize,
    /// Fractured images without a box (no localization signal).
    pub(crate) unboxed: usize,
    /// Not-fractured images (an empty map is their signal).
    pub(crate) negatives: usize,
}

/// The localization targets of a training set.
#[derive(Debug)]
pub(crate) struct BoxTargets {
    targets: Vec<Target>,
    /// `(cells, offset, stride)` of the head's grid (see `FractureNet::localization_grid`).
    grid: (usize, f32, f32),
    /// Side of the network input, pixels.
    size: usize,
    pub(crate) counts: BoxCounts,
}

/// The targets of one batch, on the training device.
pub(crate) struct BatchTargets {
    /// `(B, cells, cells)`: the share of each cell inside a box.
    pub(crate) coverage: Tensor,
    /// `(B,)`: 1 for images whose every cell has a known target.
    pub(crate) cell_weight: Tensor,
    /// `(B,)`: 1 for fractured images with a box in view.
    pub(crate) point_weight: Tensor,
}

impl BoxTargets {
    /// The targets of `train`'s images from `boxes` (ids are file names without extension, boxes in
    /// the images' own pixels), for a head with grid `grid` on inputs prepared by `preprocess`.
    /// Boxed images are decoded once for their size (in parallel); one that cannot be read any
    /// more gets no signal.
    pub(crate) fn new(
        train: &FolderDataset,
        boxes: &BoxIndex,
        preprocess: &PreprocessConfig,
        limits: &DecodeLimits,
        grid: (usize, f32, f32),
    ) -> BoxTargets {
        let targets: Vec<Target> = train
            .items()
            .par_iter()
            .map(|item| match item.label {
                Label::NotFractured => Target::Empty,
                Label::Fractured => match boxes.get(&image_id(&item.path)) {
                    Some(found) if !found.is_empty() => {
                        image_size(&item.path, limits).map_or(Target::Unknown, |(w, h)| {
                            let content = preprocess.content_box(w, h);
                            let (sx, sy) = (
                                content.width as f64 / f64::from(w.max(1)),
                                content.height as f64 / f64::from(h.max(1)),
                            );
                            Target::Boxes(
                                found
                                    .iter()
                                    .map(|b| {
                                        [
                                            (f64::from(content.x) + b[0] * sx) as f32,
                                            (f64::from(content.y) + b[1] * sy) as f32,
                                            (b[2] * sx) as f32,
                                            (b[3] * sy) as f32,
                                        ]
                                    })
                                    .collect(),
                            )
                        })
                    }
                    _ => Target::Unknown,
                },
            })
            .collect();
        let mut counts = BoxCounts {
            boxed: 0,
            boxes: 0,
            unboxed: 0,
            negatives: 0,
        };
        for t in &targets {
            match t {
                Target::Unknown => counts.unboxed += 1,
                Target::Empty => counts.negatives += 1,
                Target::Boxes(b) => {
                    counts.boxed += 1;
                    counts.boxes += b.len();
                }
            }
        }
        BoxTargets {
            targets,
            grid,
            size: preprocess.size as usize,
            counts,
        }
    }

    /// The targets of the dataset images `indices`, each box moved by the augmentation the image
    /// received: `augment` is the augmenter with the run's seed and the epoch, from which
    /// [`fracture_data::make_batch`] drew the image's transformation.
    pub(crate) fn batch(
        &self,
        indices: &[usize],
        augment: Option<(&Augmenter, u64, u64)>,
        device: &Device,
    ) -> Result<BatchTargets> {
        let cells = self.grid.0;
        let side = (self.size, self.size);
        let mut coverage = vec![0f32; indices.len() * cells * cells];
        let mut cell_weight = vec![0f32; indices.len()];
        let mut point_weight = vec![0f32; indices.len()];
        for (k, &index) in indices.iter().enumerate() {
            match self.targets.get(index) {
                None | Some(Target::Unknown) => {}
                Some(Target::Empty) => cell_weight[k] = 1.0,
                Some(Target::Boxes(boxes)) => {
                    let draw = augment.and_then(|(a, seed, epoch)| {
                        (!a.config().is_identity())
                            .then(|| a.draw(&mut sample_rng(seed, epoch, index as u64)))
                    });
                    let moved: Vec<[f32; 4]> = boxes
                        .iter()
                        .filter_map(|&b| match &draw {
                            Some(d) => d.map_box(b, side),
                            None => Some(b),
                        })
                        .collect();
                    if moved.is_empty() {
                        continue;
                    }
                    let out = &mut coverage[k * cells * cells..(k + 1) * cells * cells];
                    fill_coverage(&moved, self.grid, out);
                    if out.iter().any(|&v| v > 0.0) {
                        cell_weight[k] = 1.0;
                        point_weight[k] = 1.0;
                    }
                }
            }
        }
        let b = indices.len();
        Ok(BatchTargets {
            coverage: Tensor::from_vec(coverage, (b, cells, cells), device)?,
            cell_weight: Tensor::from_vec(cell_weight, b, device)?,
            point_weight: Tensor::from_vec(point_weight, b, device)?,
        })
    }
}

/// The share of each cell of the grid `(cells, offset, stride)` covered by `boxes` (continuous
/// input pixels; overlapping boxes add up to at most 1), row-major into `out`.
fn fill_coverage(boxes: &[[f32; 4]], (cells, offset, stride): (usize, f32, f32), out: &mut [f32]) {
    // Cell i is centred on pixel index offset + stride·i, whose centre is at offset + stride·i + 0.5.
    let span = |i: usize| {
        let centre = offset + stride * i as f32 + 0.5;
        (centre - stride / 2.0, centre + stride / 2.0)
    };
    let area = stride * stride;
    for row in 0..cells {
        let (y0, y1) = span(row);
        for col in 0..cells {
            let (x0, x1) = span(col);
            let covered: f32 = boxes
                .iter()
                .map(|b| {
                    let w = (x1.min(b[0] + b[2]) - x0.max(b[0])).max(0.0);
                    let h = (y1.min(b[1] + b[3]) - y0.max(b[1])).max(0.0);
                    w * h
                })
                .sum();
            out[row * cells + col] = (covered / area).min(1.0);
        }
    }
}

/// The width and height of an image file after its EXIF orientation, `None` when it cannot be
/// read.
fn image_size(path: &std::path::Path, limits: &DecodeLimits) -> Option<(u32, u32)> {
    let bytes = fracture_data::read_file_limited(path, limits).ok()?;
    fracture_data::decode_gray(&bytes, path, limits)
        .ok()
        .map(|g| g.dimensions())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_is_the_share_of_each_cell_inside_the_boxes() {
        // A 4 × 4 grid of 16-pixel cells, cell i spanning pixels [16i, 16i + 16).
        let grid = (4, 7.5, 16.0);
        let mut out = vec![0.0; 16];
        // Half of cell (row 1, col 2) and all of cell (row 3, col 0); a second box over the first
        // adds up to at most 1.
        fill_coverage(
            &[
                [32.0, 16.0, 8.0, 16.0],
                [0.0, 48.0, 16.0, 16.0],
                [32.0, 16.0, 16.0, 16.0],
            ],
            grid,
            &mut out,
        );
        let mut want = vec![0.0; 16];
        want[4 + 2] = 1.0;
        want[12] = 1.0;
        assert_eq!(out, want);
        fill_coverage(&[[32.0, 16.0, 8.0, 16.0]], grid, &mut out);
        assert_eq!(out[6], 0.5);
        assert_eq!(out.iter().sum::<f32>(), 0.5);
    }
}
