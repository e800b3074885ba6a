//! What every chart shares: the error type, size, fonts, colours, and rendering into a PNG.

use std::sync::OnceLock;

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
