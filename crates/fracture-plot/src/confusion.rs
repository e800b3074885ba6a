//! The confusion-matrix chart.

use fracture_eval::ConfusionMatrix;
use plotters::prelude::*;

use crate::Result;
use crate::scaffold::{BLUE, FONT, RED, render};

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
