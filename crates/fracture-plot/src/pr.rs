//! The precision-recall chart.

use fracture_eval::PrPoint;
use plotters::prelude::*;

use crate::Result;
use crate::scaffold::{FONT, GREY, ORANGE, RED, render, unit_square_chart};

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
        let mut chart = unit_square_chart(C, root, title, "recall (sensitivity)", "precision (PPV)")?;
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
                // Lower left: a precision-recall curve runs high at low recall and falls towards
                // the prevalence at recall 1, so this corner is the one it leaves free.
                .position(SeriesLabelPosition::LowerLeft)
                .label_font((FONT, 18))
                .background_style(WHITE.mix(0.75))
                .border_style(BLACK)
                .draw()
        );
        Ok(())
    })
}
