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
        let losses: [Line; 2] = [
            ("train loss", BLUE, |e| Some(e.train_loss)),
            ("val loss", ORANGE, |e| Some(e.val_loss)),
        ];
        Panel {
            area: &left,
            y_max: max_loss,
            y_desc: "loss",
            ticks,
            last,
            lines: &losses,
            legend: SeriesLabelPosition::MiddleRight,
        }
        .draw(epochs)?;
        let scores: [Line; 3] = [
            ("ROC-AUC", GREEN, |e| e.val_roc_auc),
            ("sensitivity", RED, |e| e.val_sensitivity),
            ("specificity", BLUE, |e| e.val_specificity),
        ];
        Panel {
            area: &right,
            y_max: 1.001,
            y_desc: "validation (sensitivity, specificity at 0.5)",
            ticks,
            last,
            lines: &scores,
            legend: SeriesLabelPosition::LowerRight,
        }
        .draw(epochs)?;
        Ok(())
    })
}

/// One curve: its legend name, colour and value per epoch (`None` where undefined).
type Line = (&'static str, RGBColor, fn(&EpochPoint) -> Option<f64>);

/// One half of the chart: epochs across, `lines` against a y axis from 0 to `y_max`.
struct Panel<'p, 'b> {
    area: &'p DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    y_max: f64,
    y_desc: &'p str,
    ticks: usize,
    last: f64,
    lines: &'p [Line],
    legend: SeriesLabelPosition,
}

impl Panel<'_, '_> {
    fn draw(self, epochs: &[EpochPoint]) -> Result<()> {
        const C: &str = "training curves";
        let mut chart = tryd!(
            C,
            ChartBuilder::on(self.area)
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(55)
                .build_cartesian_2d(1f64..self.last, 0f64..self.y_max)
        );
        tryd!(
            C,
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(self.y_desc)
                .x_labels(self.ticks)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()
        );
        for &(name, color, value) in self.lines {
            series(&mut chart, epochs, value, name, color)?;
        }
        tryd!(
            C,
            chart
                .configure_series_labels()
                .position(self.legend)
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
        );
        Ok(())
    }
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
