#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod heatmap;
pub use heatmap::{
    BANNER_LINE, HEATMAP_FLOOR, LEGEND_HEIGHT, colormap, heatmap_alpha, heatmap_rgba_png, overlay_png,
    resample, with_banner,
};

/// `?` for plotters' results: the error becomes [`Error::Draw`] naming the chart.
macro_rules! tryd {
    ($chart:expr, $e:expr) => {
        $e.map_err(|e| $crate::scaffold::draw_err($chart)(&e))?
    };
}

mod calibration;
mod confusion;
mod curves;
mod forest;
mod pr;
mod roc;
mod scaffold;
mod sheet;

pub use calibration::calibration_png;
pub use confusion::confusion_png;
pub use curves::{EpochPoint, training_curves_png};
pub use forest::{ForestCell, ForestRow, forest_png};
pub use pr::pr_png;
pub use roc::roc_png;
pub use scaffold::{Error, HEIGHT, Result, WIDTH};
pub use sheet::{CAPTION_HEIGHT, SheetTile, contact_sheet_png};

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_eval::{ConfusionMatrix, calibration_bins, pr_curve, roc_curve};

    fn is_png_of_the_chart_size(bytes: &[u8]) -> bool {
        match image::load_from_memory_with_format(bytes, image::ImageFormat::Png) {
            Ok(img) => img.width() == WIDTH && img.height() == HEIGHT,
            Err(_) => false,
        }
    }

    /// Distinct colours in the image: a blank or text-less chart has very few.
    fn colours(bytes: &[u8]) -> usize {
        let img = image::load_from_memory(bytes).map(|i| i.to_rgb8());
        let mut set = std::collections::HashSet::new();
        if let Ok(img) = img {
            for p in img.pixels() {
                set.insert(p.0);
            }
        }
        set.len()
    }

    #[test]
    fn every_chart_is_a_valid_png_with_content() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1];
        let actual = [true, true, false, true, false, false, true, false];
        let roc = roc_curve(&scores, &actual).unwrap().unwrap();
        let pr = pr_curve(&scores, &actual).unwrap().unwrap();
        let bins = calibration_bins(&scores, &actual, 10).unwrap();
        let cm = ConfusionMatrix::from_scores(&scores, &actual, 0.5).unwrap();
        let epochs: Vec<EpochPoint> = (1..=4)
            .map(|e| EpochPoint {
                epoch: e,
                train_loss: 1.0 / e as f64,
                val_loss: 1.2 / e as f64,
                val_roc_auc: Some(0.6 + 0.05 * e as f64),
                val_sensitivity: Some(0.5),
                val_specificity: Some(0.7),
            })
            .collect();
        let charts = [
            confusion_png(&cm, "confusion").unwrap(),
            roc_png(&roc, Some(0.75), Some((0.25, 0.75)), "ROC").unwrap(),
            pr_png(&pr, Some(0.7), 0.5, Some((0.75, 0.75)), "PR").unwrap(),
            calibration_png(&bins, Some(0.1), "calibration").unwrap(),
            training_curves_png(&epochs, "training").unwrap(),
            forest_png(
                "subgroups",
                &["ROC-AUC", "sensitivity", "specificity"],
                &[Some(0.9), Some(0.91), None],
                &[None, Some(0.85), None],
                &[
                    ForestRow {
                        label: "hand (n 120, 30 fractured)".into(),
                        cells: vec![
                            Some(ForestCell {
                                value: 0.9,
                                interval: Some(fracture_eval::Interval {
                                    lower: 0.85,
                                    upper: 0.95,
                                }),
                            }),
                            Some(ForestCell {
                                value: 0.8,
                                interval: None,
                            }),
                            None,
                        ],
                    },
                    ForestRow {
                        label: "hip (n 9)".into(),
                        cells: vec![None, None, None],
                    },
                ],
            )
            .unwrap(),
        ];
        for png in &charts {
            assert!(is_png_of_the_chart_size(png));
            assert!(
                colours(png) > 20,
                "{} colours: text and curves were drawn",
                colours(png)
            );
        }
    }
}
