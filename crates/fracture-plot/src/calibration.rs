//! The calibration (reliability) chart.

use fracture_eval::CalibrationBin;
use plotters::prelude::*;

use crate::Result;
use crate::scaffold::{FONT, GREEN, GREY, render, unit_square_chart};

/// The reliability diagram: observed share of fractures against mean predicted P(fractured) per bin
/// (point size grows with the bin's count), the diagonal of perfect calibration, and the ECE.
pub fn calibration_png(bins: &[CalibrationBin], ece: Option<f64>, title: &str) -> Result<Vec<u8>> {
    const C: &str = "calibration";
    render(C, |root| {
        let mut chart = unit_square_chart(
            C,
            root,
            title,
            "mean predicted P(fractured)",
            "observed share fractured",
        )?;
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
