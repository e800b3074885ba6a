//! What every chart shares: the error type, size, fonts, colours, and rendering into a PNG.

use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
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

pub(crate) const FONT: &str = "sans-serif";
pub(crate) const BLUE: RGBColor = RGBColor(31, 119, 180);
pub(crate) const ORANGE: RGBColor = RGBColor(255, 127, 14);
pub(crate) const GREEN: RGBColor = RGBColor(44, 160, 44);
pub(crate) const RED: RGBColor = RGBColor(214, 39, 40);
pub(crate) const GREY: RGBColor = RGBColor(140, 140, 140);

pub(crate) fn register_fonts() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // The embedded fonts are valid TrueType files; a failure would only lose text, not the chart.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

pub(crate) fn draw_err(chart: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Draw {
        chart,
        reason: e.to_string(),
    }
}

/// Draws into an RGB buffer with `f`, then encodes it as PNG.
pub(crate) fn render(
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

/// A chart on the unit square (both axes 0-1, for rates and probabilities) with its caption, axis
/// descriptions and grid drawn: what the ROC, precision-recall and calibration charts start from.
pub(crate) fn unit_square_chart<'a, 'b>(
    chart: &'static str,
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut ctx = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1f64, 0f64..1.001f64)
        .map_err(|e| draw_err(chart)(&e))?;
    ctx.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .draw()
        .map_err(|e| draw_err(chart)(&e))?;
    Ok(ctx)
}

/// Writes `text` into an RGB image with its top-left corner at `(x, y)`, `size` px high, in `color`.
pub(crate) fn draw_text(
    chart: &'static str,
    canvas: &mut image::RgbImage,
    (x, y): (i32, i32),
    text: &str,
    size: f64,
    color: RGBColor,
) -> Result<()> {
    register_fonts();
    let (w, h) = canvas.dimensions();
    let area = BitMapBackend::with_buffer(canvas.as_mut(), (w, h)).into_drawing_area();
    let style = TextStyle::from((FONT, size).into_font()).color(&color);
    tryd!(chart, area.draw_text(text, &style, (x, y)));
    tryd!(chart, area.present());
    Ok(())
}

/// The width in pixels that `text` takes at `size` px.
pub(crate) fn text_width(text: &str, size: f64) -> u32 {
    register_fonts();
    let font = (FONT, size).into_font();
    font.box_size(text).map_or(0, |(w, _)| w)
}
