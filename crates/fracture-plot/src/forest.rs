//! The forest plot: one row per group (or per acquisition shift), one panel per metric, each value
//! a dot with its 95% interval as a whisker, beside a dashed line at the value on all images.

use fracture_eval::Interval;
use plotters::prelude::*;

use crate::Result;
use crate::scaffold::{BLUE, FONT, GREY, RED, render};

/// One value of a forest plot: the estimate and its interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForestCell {
    /// The estimate, in [0, 1].
    pub value: f64,
    /// Its 95% interval, when known.
    pub interval: Option<Interval>,
}

/// One row of a forest plot.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestRow {
    /// The row's label (a group or shift name, with its counts).
    pub label: String,
    /// One cell per panel; `None` draws "n/a" (a metric not reported, e.g. too few cases).
    pub cells: Vec<Option<ForestCell>>,
}

/// Draws a forest plot: `panels` names the metric of each column (e.g. ROC-AUC, sensitivity,
/// specificity), `reference` its value on all images (a dashed vertical line; `None` for none),
/// `rows` the groups from top to bottom. Each panel's axis runs from just below its smallest
/// interval end to 1. Dots below a panel's `floor` (its own target, e.g. 0.85 for sensitivity) are
/// drawn red; `floors` holds one optional floor per panel.
pub fn forest_png(
    title: &str,
    panels: &[&str],
    reference: &[Option<f64>],
    floors: &[Option<f64>],
    rows: &[ForestRow],
) -> Result<Vec<u8>> {
    const C: &str = "forest";
    render(C, |root| {
        let root = root
            .titled(title, (FONT, 24))
            .map_err(|e| crate::scaffold::draw_err(C)(&e))?;
        let (labels, plots) = root.split_horizontally(230);
        let areas = plots.split_evenly((1, panels.len().max(1)));
        let n = rows.len().max(1) as f64;
        let mut label_pixels: Vec<i32> = Vec::new();
        for (p, (area, name)) in areas.iter().zip(panels).enumerate() {
            let lows = rows.iter().filter_map(|r| {
                r.cells
                    .get(p)
                    .copied()
                    .flatten()
                    .map(|c| c.interval.map_or(c.value, |i| i.lower))
            });
            let low = lows
                .chain(reference.get(p).copied().flatten())
                .chain(floors.get(p).copied().flatten())
                .fold(1.0f64, f64::min);
            let x0 = ((low - 0.05) * 10.0).floor() / 10.0;
            let x0 = x0.clamp(0.0, 0.9);
            let mut chart = tryd!(
                C,
                ChartBuilder::on(area)
                    .caption(*name, (FONT, 20))
                    .margin(8)
                    .x_label_area_size(30)
                    .y_label_area_size(0)
                    .build_cartesian_2d(x0..1.0f64, -0.5f64..(n - 0.5))
            );
            tryd!(
                C,
                chart
                    .configure_mesh()
                    .disable_y_mesh()
                    .disable_y_axis()
                    .light_line_style(WHITE)
                    .x_labels(5)
                    .label_style((FONT, 14))
                    .draw()
            );
            if let Some(r) = reference.get(p).copied().flatten() {
                tryd!(
                    C,
                    chart.draw_series(DashedLineSeries::new(
                        [(r, -0.5), (r, n - 0.5)],
                        6,
                        4,
                        GREY.stroke_width(2)
                    ))
                );
            }
            if let Some(f) = floors.get(p).copied().flatten() {
                tryd!(
                    C,
                    chart.draw_series(LineSeries::new(
                        [(f, -0.5), (f, n - 0.5)],
                        RED.mix(0.4).stroke_width(1)
                    ))
                );
            }
            for (k, row) in rows.iter().enumerate() {
                // Rows run from the top down.
                let y = n - 1.0 - k as f64;
                if p == 0 {
                    label_pixels.push(chart.backend_coord(&(x0, y)).1);
                }
                match row.cells.get(p).copied().flatten() {
                    Some(cell) => {
                        let below = floors.get(p).copied().flatten().is_some_and(|f| cell.value < f);
                        let colour = if below { RED } else { BLUE };
                        if let Some(i) = cell.interval {
                            tryd!(
                                C,
                                chart.draw_series(LineSeries::new(
                                    [(i.lower.max(x0), y), (i.upper, y)],
                                    colour.stroke_width(2)
                                ))
                            );
                        }
                        tryd!(
                            C,
                            chart.draw_series([Circle::new((cell.value.max(x0), y), 5, colour.filled())])
                        );
                    }
                    None => {
                        tryd!(
                            C,
                            chart.draw_series([Text::new(
                                "n/a",
                                (x0 + 0.02 * (1.0 - x0), y),
                                (FONT, 14).into_font().color(&GREY)
                            )])
                        );
                    }
                }
            }
        }
        let (_, top) = labels.get_base_pixel();
        for (row, py) in rows.iter().zip(label_pixels) {
            let style = TextStyle::from((FONT, 15).into_font()).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            ));
            tryd!(C, labels.draw_text(&row.label, &style, (8, py - top)));
        }
        Ok(())
    })
}
