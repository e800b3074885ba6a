//! The ROC chart.

use fracture_eval::RocPoint;
use plotters::prelude::*;

use crate::Result;
use crate::scaffold::{BLUE, FONT, GREY, RED, render, unit_square_chart};

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
        let mut chart = unit_square_chart(
            C,
            root,
            title,
            "false-positive rate (1 − specificity)",
            "sensitivity",
        )?;
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
