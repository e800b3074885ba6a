//! PNG charts of a classifier's results, drawn with plotters into memory and encoded with `image`,
//! and heatmaps of where its evidence lies.
//!
//! Text uses DejaVu Sans compiled into the binary, so charts look the same on every machine and need
//! no system fonts. Every function returns the PNG file's bytes; writing them is the caller's job.
//! "Fractured" is the positive class throughout.
//!
//! ```
//! use fracture_eval::ConfusionMatrix;
//!
//! let cm = ConfusionMatrix::from_labels(&[true, false, true], &[true, true, false])?;
//! let png = fracture_plot::confusion_png(&cm, "validation")?;
//! assert!(png.starts_with(b"\x89PNG"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

use std::sync::OnceLock;

mod heatmap;
pub use heatmap::{colormap, heatmap_rgba_png, overlay_png, resample};

use fracture_eval::{CalibrationBin, ConfusionMatrix, PrPoint, RocPoint};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// What can go wrong drawing a chart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Drawing failed.
    #[error("cannot draw the {chart} chart: {reason}")]
    Draw {
        /// Which chart.
        chart: &'static str,
        /// What plotters or the PNG encoder said.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Chart width in pixels.
pub const WIDTH: u32 = 800;
/// Chart height in pixels.
pub const HEIGHT: u32 = 600;

const FONT: &str = "sans-serif";
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const GREY: RGBColor = RGBColor(140, 140, 140);

fn register_fonts() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // The embedded fonts are valid TrueType files; a failure would only lose text, not the chart.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

fn draw_err(chart: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Draw {
        chart,
        reason: e.to_string(),
    }
}

/// Draws into an RGB buffer with `f`, then encodes it as PNG.
fn render(
    chart: &'static str,
    f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    register_fonts();
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(chart)(&e))?;
        f(&root)?;
        root.present().map_err(|e| draw_err(chart)(&e))?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgb,
        WIDTH,
        HEIGHT,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| draw_err(chart)(&e))?;
    Ok(png)
}

macro_rules! tryd {
    ($chart:expr, $e:expr) => {
        $e.map_err(|e| draw_err($chart)(&e))?
    };
}

/// The 2 × 2 confusion matrix: rows are the truth, columns the decision, each cell with its count and
/// its share of the row. Missed fractures (FN) and false alarms (FP) are shaded red, correct cells blue.
pub fn confusion_png(cm: &ConfusionMatrix, title: &str) -> Result<Vec<u8>> {
    const C: &str = "confusion matrix";
    render(C, |root| {
        let (top, body) = root.split_vertically(70);
        tryd!(C, top.titled(title, (FONT, 28).into_font()));
        let cells = [
            ("fractured", "fractured", cm.tp, cm.tp + cm.fn_, true, "TP"),
            (
                "fractured",
                "not fractured",
                cm.fn_,
                cm.tp + cm.fn_,
                false,
                "FN (missed)",
            ),
            (
                "not fractured",
                "fractured",
                cm.fp,
                cm.tn + cm.fp,
                false,
                "FP (false alarm)",
            ),
            ("not fractured", "not fractured", cm.tn, cm.tn + cm.fp, true, "TN"),
        ];
        let (x0, y0, cw, ch) = (220i32, 60i32, 260i32, 200i32);
        let label = (FONT, 22).into_font();
        tryd!(
            C,
            body.draw(&Text::new("decision →", (x0 + cw - 60, 10), label.clone()))
        );
        tryd!(C, body.draw(&Text::new("truth ↓", (40, 10), label.clone())));
        for (i, name) in ["fractured", "not fractured"].iter().enumerate() {
            let x = x0 + i as i32 * cw + 60;
            tryd!(C, body.draw(&Text::new(*name, (x, 35), label.clone())));
            let y = y0 + i as i32 * ch + ch / 2 - 10;
            tryd!(C, body.draw(&Text::new(*name, (40, y), label.clone())));
        }
        for (k, (_, _, count, row_total, correct, tag)) in cells.iter().enumerate() {
            let (r, c) = ((k / 2) as i32, (k % 2) as i32);
            let share = if *row_total > 0 {
                *count as f64 / *row_total as f64
            } else {
                0.0
            };
            let base = if *correct { BLUE } else { RED };
            let shade = 0.15 + 0.75 * share;
            let fill = RGBColor(
                (255.0 - (255.0 - f64::from(base.0)) * shade) as u8,
                (255.0 - (255.0 - f64::from(base.1)) * shade) as u8,
                (255.0 - (255.0 - f64::from(base.2)) * shade) as u8,
            );
            let (x, y) = (x0 + c * cw, y0 + r * ch);
            tryd!(
                C,
                body.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], fill.filled()))
            );
            tryd!(
                C,
                body.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], BLACK.stroke_width(2)))
            );
            let text_color = if shade > 0.6 { WHITE } else { BLACK };
            let big = (FONT, 40, FontStyle::Bold).into_font().color(&text_color);
            let small = (FONT, 20).into_font().color(&text_color);
            tryd!(C, body.draw(&Text::new(count.to_string(), (x + 20, y + 40), big)));
            tryd!(C, body.draw(&Text::new(*tag, (x + 20, y + 105), small.clone())));
            tryd!(
                C,
                body.draw(&Text::new(
                    format!("{:.1}% of the row", share * 100.0),
                    (x + 20, y + 135),
                    small
                ))
            );
        }
        Ok(())
    })
}

/// The ROC curve with its AUC in the legend, the chance diagonal, and the operating point
/// `(false-positive rate, sensitivity)` when given.
pub fn roc_png(
    points: &[RocPoint],
    auc: Option<f64>,
    operating: Option<(f64, f64)>,
    title: &str,
) -> Result<Vec<u8>> {
    const C: &str = "ROC";
    render(C, |root| {
        let mut chart = tryd!(
            C,
            ChartBuilder::on(root)
                .caption(title, (FONT, 26))
                .margin(20)
                .x_label_area_size(50)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..1f64, 0f64..1.001f64)
        );
        tryd!(
            C,
            chart
                .configure_mesh()
                .x_desc("false-positive rate (1 − specificity)")
                .y_desc("sensitivity")
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
        );
        tryd!(
            C,
            chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], GREY.stroke_width(1)))
        );
        let label = match auc {
            Some(a) => format!("ROC, AUC = {a:.3}"),
            None => "ROC".to_string(),
        };
        tryd!(
            C,
            chart.draw_series(LineSeries::new(
                points.iter().map(|p| (p.fpr, p.tpr)),
                BLUE.stroke_width(3)
            ))
        )
        .label(label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(3)));
        if let Some((fpr, tpr)) = operating {
            tryd!(C, chart.draw_series([Circle::new((fpr, tpr), 8, RED.filled())]))
                .label(format!(
                    "operating point: sensitivity {:.2}, specificity {:.2}",
                    tpr,
                    1.0 - fpr
                ))
                .legend(|(x, y)| Circle::new((x + 10, y), 6, RED.filled()));
        }
        tryd!(
            C,
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font((FONT, 18))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
        );
        Ok(())
    })
}

/// The precision-recall curve with average precision in the legend, the prevalence line (a random
/// classifier's precision) and the operating point `(recall, precision)` when given.
pub fn pr_png(
    points: &[PrPoint],
    average_precision: Option<f64>,
    prevalence: f64,
    operating: Option<(f64, f64)>,
    title: &str,
) -> Result<Vec<u8>> {
    const C: &str = "precision-recall";
    render(C, |root| {
        let mut chart = tryd!(
            C,
            ChartBuilder::on(root)
                .caption(title, (FONT, 26))
                .margin(20)
                .x_label_area_size(50)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..1f64, 0f64..1.001f64)
        );
        tryd!(
            C,
            chart
                .configure_mesh()
                .x_desc("recall (sensitivity)")
                .y_desc("precision (PPV)")
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
        );
        tryd!(
            C,
            chart.draw_series(LineSeries::new(
                [(0.0, prevalence), (1.0, prevalence)],
                GREY.stroke_width(1)
            ))
        )
        .label(format!("prevalence {prevalence:.3}"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREY.stroke_width(1)));
        // Step-wise, as average precision integrates it.
        let mut path = vec![(0.0, points.first().map_or(1.0, |p| p.precision))];
        for p in points {
            if let Some(&(_, last_p)) = path.last() {
                path.push((p.recall, last_p));
            }
            path.push((p.recall, p.precision));
        }
        let label = match average_precision {
            Some(ap) => format!("PR, average precision = {ap:.3}"),
            None => "PR".to_string(),
        };
        tryd!(
            C,
            chart.draw_series(LineSeries::new(path, ORANGE.stroke_width(3)))
        )
        .label(label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], ORANGE.stroke_width(3)));
        if let Some((r, p)) = operating {
            tryd!(C, chart.draw_series([Circle::new((r, p), 8, RED.filled())]))
                .label(format!("operating point: recall {r:.2}, precision {p:.2}"))
                .legend(|(x, y)| Circle::new((x + 10, y), 6, RED.filled()));
        }
        tryd!(
            C,
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FONT, 18))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
        );
        Ok(())
    })
}

/// The reliability diagram: observed share of fractures against mean predicted P(fractured) per bin
/// (point size grows with the bin's count), the diagonal of perfect calibration, and the ECE.
pub fn calibration_png(bins: &[CalibrationBin], ece: Option<f64>, title: &str) -> Result<Vec<u8>> {
    const C: &str = "calibration";
    render(C, |root| {
        let mut chart = tryd!(
            C,
            ChartBuilder::on(root)
                .caption(title, (FONT, 26))
                .margin(20)
                .x_label_area_size(50)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..1f64, 0f64..1.001f64)
        );
        tryd!(
            C,
            chart
                .configure_mesh()
                .x_desc("mean predicted P(fractured)")
                .y_desc("observed share fractured")
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
        );
        tryd!(
            C,
            chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], GREY.stroke_width(1)))
        )
        .label("perfect calibration")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREY.stroke_width(1)));
        let total: usize = bins.iter().map(|b| b.count).sum::<usize>().max(1);
        let filled: Vec<(f64, f64, usize)> = bins
            .iter()
            .filter_map(|b| Some((b.mean_predicted?, b.observed?, b.count)))
            .collect();
        let label = match ece {
            Some(e) => format!("model, ECE = {e:.3}"),
            None => "model".into(),
        };
        tryd!(
            C,
            chart.draw_series(LineSeries::new(
                filled.iter().map(|&(x, y, _)| (x, y)),
                GREEN.stroke_width(2)
            ))
        )
        .label(label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN.stroke_width(2)));
        tryd!(
            C,
            chart.draw_series(filled.iter().map(|&(x, y, n)| {
                let radius = 4 + (16.0 * (n as f64 / total as f64).sqrt()) as i32;
                Circle::new((x, y), radius, GREEN.filled())
            }))
        );
        tryd!(
            C,
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font((FONT, 18))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
        );
        Ok(())
    })
}

/// One epoch of a training run, as the training curves need it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochPoint {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Mean validation loss.
    pub val_loss: f64,
    /// Validation ROC-AUC.
    pub val_roc_auc: Option<f64>,
    /// Validation sensitivity at 0.5.
    pub val_sensitivity: Option<f64>,
    /// Validation specificity at 0.5.
    pub val_specificity: Option<f64>,
}

/// Training curves: losses on the left, validation ROC-AUC, sensitivity and specificity on the right.
pub fn training_curves_png(epochs: &[EpochPoint], title: &str) -> Result<Vec<u8>> {
    const C: &str = "training curves";
    render(C, |root| {
        let (top, body) = root.split_vertically(50);
        tryd!(C, top.titled(title, (FONT, 26).into_font()));
        let (left, right) = body.split_horizontally(WIDTH / 2);
        let last = epochs.iter().map(|e| e.epoch).max().unwrap_or(1).max(2) as f64;
        // One tick per epoch up to 10 epochs, then about ten ticks.
        let ticks = (last as usize).min(10);
        let max_loss = epochs
            .iter()
            .flat_map(|e| [e.train_loss, e.val_loss])
            .filter(|v| v.is_finite())
            .fold(0.1f64, f64::max)
            * 1.1;
        let mut losses = tryd!(
            C,
            ChartBuilder::on(&left)
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(55)
                .build_cartesian_2d(1f64..last, 0f64..max_loss)
        );
        tryd!(
            C,
            losses
                .configure_mesh()
                .x_desc("epoch")
                .y_desc("loss")
                .x_labels(ticks)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()
        );
        for (name, color, f) in [
            (
                "train loss",
                BLUE,
                (|e: &EpochPoint| Some(e.train_loss)) as fn(&EpochPoint) -> Option<f64>,
            ),
            ("val loss", ORANGE, |e: &EpochPoint| Some(e.val_loss)),
        ] {
            series(&mut losses, epochs, f, name, color)?;
        }
        tryd!(
            C,
            losses
                .configure_series_labels()
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
        );
        let mut scores = tryd!(
            C,
            ChartBuilder::on(&right)
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(55)
                .build_cartesian_2d(1f64..last, 0f64..1.001f64)
        );
        tryd!(
            C,
            scores
                .configure_mesh()
                .x_desc("epoch")
                .y_desc("validation (sensitivity, specificity at 0.5)")
                .x_labels(ticks)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()
        );
        for (name, color, f) in [
            (
                "ROC-AUC",
                GREEN,
                (|e: &EpochPoint| e.val_roc_auc) as fn(&EpochPoint) -> Option<f64>,
            ),
            ("sensitivity", RED, |e: &EpochPoint| e.val_sensitivity),
            ("specificity", BLUE, |e: &EpochPoint| e.val_specificity),
        ] {
            series(&mut scores, epochs, f, name, color)?;
        }
        tryd!(
            C,
            scores
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
        );
        Ok(())
    })
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn series(
    chart: &mut Chart<'_, '_>,
    epochs: &[EpochPoint],
    value: fn(&EpochPoint) -> Option<f64>,
    name: &str,
    color: RGBColor,
) -> Result<()> {
    const C: &str = "training curves";
    let pts: Vec<(f64, f64)> = epochs
        .iter()
        .filter_map(|e| value(e).filter(|v| v.is_finite()).map(|v| (e.epoch as f64, v)))
        .collect();
    tryd!(
        C,
        chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
    )
    .label(name)
    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    tryd!(
        C,
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_eval::{calibration_bins, pr_curve, roc_curve};

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
