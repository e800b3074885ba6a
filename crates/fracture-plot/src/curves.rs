//! The training-curves chart.

use plotters::prelude::*;

use crate::Result;
use crate::scaffold::{BLUE, FONT, GREEN, ORANGE, RED, WIDTH, render};

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
