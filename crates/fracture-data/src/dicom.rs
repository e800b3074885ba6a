//! DICOM radiographs to 8-bit luma, through the display pipeline a radiologist's viewer applies.
//!
//! A file is DICOM when it holds the `DICM` magic after its 128-byte preamble (the extension does
//! not matter). The first frame is decoded (uncompressed little endian with implicit or explicit
//! VR, deflated, RLE, JPEG baseline, extended and lossless: the pure-Rust codecs of
//! `dicom-pixeldata`); then, in this order:
//!
//! 1. **stored values**: each sample masked to Bits Stored, sign-extended when Pixel
//!    Representation is 1;
//! 2. **Modality LUT**: `v · Rescale Slope + Rescale Intercept` (1 and 0 when absent);
//! 3. **VOI LUT**: the first VOI LUT Sequence item when present; else the first Window Center /
//!    Width pair with the VOI LUT Function (`LINEAR`, the default, `LINEAR_EXACT` or `SIGMOID`, as
//!    DICOM PS3.3 C.11.2.1.2 defines them); else a window from the image itself, its 0.5th to
//!    99.5th percentile ([`crate::WINDOW_TAIL`], the rule 16-bit PNG and TIFF follow), with the
//!    Pixel Padding Value left out — never the container's full range;
//! 4. **MONOCHROME1** inverted (white = 0 there);
//! 5. to 8 bits, rounded.
//!
//! Colour secondary captures (RGB, YBR) go to luma like other colour images. Header values are
//! checked against [`DecodeLimits`] before anything is allocated for the pixels, and every
//! failure is an [`Error::Dicom`] naming the file and the reason.

use std::cell::Cell;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::GrayImage;
use serde::{Deserialize, Serialize};

use crate::luma::{DecodeLimits, WINDOW_TAIL, dynamic_to_luma, refuse_constant};
use crate::{Error, Result};

mod capture;
mod checks;
pub use capture::{CaptureUids, SECONDARY_CAPTURE_SOP_CLASS, new_uid, secondary_capture};
use checks::*;
mod pixels;
use pixels::{Frame, frame, rescale, stored_values};

/// Whether `bytes` are a DICOM file: the `DICM` magic at offset 128.
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM")
}

/// The VOI transformation applied to a DICOM image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum Window {
    /// The file's first Window Center / Width pair, with its VOI LUT Function.
    Tags {
        /// Window Center, in modality units.
        center: f64,
        /// Window Width, in modality units.
        width: f64,
        /// `LINEAR`, `LINEAR_EXACT` or `SIGMOID`.
        function: String,
    },
    /// The first item of the VOI LUT Sequence.
    Lut {
        /// Its entries.
        entries: usize,
    },
    /// The image's own 0.5th-99.5th percentile (no windowing attributes).
    Percentile {
        /// Lower bound, modality units.
        low: f64,
        /// Upper bound, modality units.
        high: f64,
    },
}

/// The technical attributes of a decoded DICOM image (never a patient-identifying one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DicomInfo {
    /// Modality (`CR`, `DX`, …), when present.
    pub modality: Option<String>,
    /// Body Part Examined, when present.
    pub body_part: Option<String>,
    /// Photometric Interpretation (`MONOCHROME1`, `MONOCHROME2`, `RGB`, …).
    pub photometric: String,
    /// Bits Stored.
    pub bits_stored: u16,
    /// Number of Frames (the first one is decoded).
    pub frames: u32,
    /// The transfer syntax, UID and name.
    pub transfer_syntax: String,
    /// The VOI transformation used (grayscale images).
    pub window: Option<Window>,
}

/// A VOI LUT: the output for stored values from `first` on, `bits` bits deep.
#[derive(Debug, Clone, PartialEq)]
struct VoiLut {
    first: f64,
    data: Vec<f64>,
    bits: u32,
}

/// The VOI step, ready to apply.
#[derive(Debug, Clone, PartialEq)]
enum Voi {
    Linear { center: f64, width: f64 },
    LinearExact { center: f64, width: f64 },
    Sigmoid { center: f64, width: f64 },
    Lut(VoiLut),
}

/// The DICOM linear VOI function (PS3.3 C.11.2.1.2.1) onto [0, 1]: 0 at or below
/// `c − 0.5 − (w − 1)/2`, 1 above `c − 0.5 + (w − 1)/2`, linear between. `width` below 1 is taken
/// as 1 (the standard requires at least 1).
pub fn voi_linear(x: f64, center: f64, width: f64) -> f64 {
    let w = width.max(1.0);
    if w <= 1.0 {
        return if x <= center - 0.5 { 0.0 } else { 1.0 };
    }
    let lo = center - 0.5 - (w - 1.0) / 2.0;
    let hi = center - 0.5 + (w - 1.0) / 2.0;
    if x <= lo {
        0.0
    } else if x > hi {
        1.0
    } else {
        (x - (center - 0.5)) / (w - 1.0) + 0.5
    }
}

/// `LINEAR_EXACT` (C.11.2.1.3.2) onto [0, 1]: `(x − c)/w + 0.5`, clamped.
pub fn voi_linear_exact(x: f64, center: f64, width: f64) -> f64 {
    if width <= 0.0 {
        return if x <= center { 0.0 } else { 1.0 };
    }
    ((x - center) / width + 0.5).clamp(0.0, 1.0)
}

/// `SIGMOID` (C.11.2.1.3.1) onto (0, 1): `1 / (1 + exp(−4 (x − c) / w))`.
pub fn voi_sigmoid(x: f64, center: f64, width: f64) -> f64 {
    1.0 / (1.0 + (-4.0 * (x - center) / width.max(f64::MIN_POSITIVE)).exp())
}

/// A stored sample (`raw`, the bits of its container) masked to `bits_stored` and, when
/// `signed`, sign-extended from its high bit.
pub fn stored_value(raw: u32, bits_stored: u16, signed: bool) -> i64 {
    let bits = u32::from(bits_stored.clamp(1, 32));
    let mask = if bits == 32 { u32::MAX } else { (1u32 << bits) - 1 };
    let v = i64::from(raw & mask);
    if signed && v >= 1i64 << (bits - 1) {
        v - (1i64 << bits)
    } else {
        v
    }
}

impl Voi {
    fn apply(&self, x: f64) -> f64 {
        match self {
            Voi::Linear { center, width } => voi_linear(x, *center, *width),
            Voi::LinearExact { center, width } => voi_linear_exact(x, *center, *width),
            Voi::Sigmoid { center, width } => voi_sigmoid(x, *center, *width),
            Voi::Lut(lut) => {
                let last = lut.data.len().saturating_sub(1);
                let i = (x - lut.first).round().clamp(0.0, last as f64) as usize;
                let top = f64::from((1u32 << lut.bits.clamp(1, 16)) - 1);
                (lut.data.get(i).copied().unwrap_or(0.0) / top).clamp(0.0, 1.0)
            }
        }
    }
}

/// The `[low, high]` stored values holding all but [`WINDOW_TAIL`] of `stored` at each end (values
/// equal to `padding` left out), by a histogram over the values' range; `None` when nothing is
/// left.
fn percentile_window(stored: &[i64], padding: Option<i64>) -> Option<(i64, i64)> {
    let kept = || stored.iter().copied().filter(|v| padding != Some(*v));
    let (lo, hi) = kept().fold((i64::MAX, i64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return None;
    }
    let n = kept().count();
    // Stored values span at most 32 bits; a histogram over their range is the common case.
    if hi - lo < 1 << 24 {
        let mut histogram = vec![0u32; (hi - lo + 1) as usize];
        for v in kept() {
            histogram[(v - lo) as usize] += 1;
        }
        let (a, b) = crate::luma::histogram_window(&histogram, n);
        return Some((lo + a as i64, lo + b as i64));
    }
    let rank = |fraction: f64| ((fraction * n as f64).floor() as usize).min(n - 1);
    let mut sorted: Vec<i64> = kept().collect();
    sorted.sort_unstable();
    Some((sorted[rank(WINDOW_TAIL)], sorted[rank(1.0 - WINDOW_TAIL)]))
}

/// Modality values to 8-bit display values: `voi`, then the MONOCHROME1 inversion.
fn to_display(values: &[f64], voi: &Voi, monochrome1: bool) -> Vec<u8> {
    values
        .iter()
        .map(|&v| {
            let y = voi.apply(v);
            let y = if monochrome1 { 1.0 - y } else { y };
            (y * 255.0).round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

fn dicom_error(origin: &Path, reason: impl Into<String>) -> Error {
    Error::Dicom {
        path: origin.to_path_buf(),
        reason: reason.into(),
    }
}

fn text(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok()??;
    let s = e.to_str().ok()?.trim().trim_end_matches('\0').to_string();
    (!s.is_empty()).then_some(s)
}

fn int(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<i64> {
    obj.element_opt(tag).ok()??.to_int::<i64>().ok()
}

fn floats(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag).ok()??.to_multi_float64().ok()
}

/// The DICOM object in `bytes`, after its magic and the whole data set have been checked against
/// `limits` (see [`check_data_set`]), parsed with a panic in the parser turned into an error
/// naming `origin`: the one way in for every reader here.
fn parse(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<DefaultDicomObject> {
    if !is_dicom(bytes) {
        return Err(dicom_error(origin, "no DICM magic after the 128-byte preamble"));
    }
    check_data_set(bytes, origin, limits)?;
    contain(|| {
        OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(bytes)
    })
    .map_err(|panic| dicom_error(origin, format!("the DICOM parser failed: {panic}")))?
    .map_err(|e| dicom_error(origin, format!("cannot parse: {e}")))
}

/// Decodes the first frame of a DICOM file to 8-bit luma (see the module documentation), with
/// the technical attributes that describe it. `origin` names the file in errors.
pub fn decode_dicom(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<(GrayImage, DicomInfo)> {
    let obj = parse(bytes, origin, limits)?;
    let ts_uid = obj.meta().transfer_syntax().trim_end_matches('\0').to_string();
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        let what = if obj
            .meta()
            .media_storage_sop_class_uid()
            .starts_with("1.2.840.10008.1.3.10")
        {
            "a DICOMDIR (a directory of other files), not an image"
        } else {
            "no pixel data (not an image object)"
        };
        return Err(dicom_error(origin, what));
    }
    let Some(ts) = TransferSyntaxRegistry.get(&ts_uid) else {
        return Err(dicom_error(origin, format!("unknown transfer syntax {ts_uid}")));
    };
    let ts_name = ts.name().to_string();
    if !ts.can_decode_all() {
        return Err(dicom_error(
            origin,
            format!("transfer syntax {ts_uid} ({ts_name}) is not supported"),
        ));
    }
    let Frame {
        rows,
        cols,
        spp,
        bits_allocated,
        bits_stored,
        frame_bytes,
    } = frame(&obj, limits, origin)?;
    let frames = int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as u32;
    let photometric = text(&obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_else(|| "MONOCHROME2".into());
    check_photometric(&obj, &photometric, spp, origin)?;
    check_encapsulated(
        &obj,
        &ts_uid,
        (cols, rows, spp, bits_allocated),
        frame_bytes,
        origin,
    )?;
    let decoded = contain(|| obj.decode_pixel_data_frame(0))
        .map_err(|panic| dicom_error(origin, format!("the pixel decoder failed: {panic}")))?
        .map_err(|e| dicom_error(origin, format!("cannot decode the pixel data: {e}")))?;
    let info = |window| DicomInfo {
        modality: text(&obj, tags::MODALITY),
        body_part: text(&obj, tags::BODY_PART_EXAMINED),
        photometric: photometric.clone(),
        bits_stored: bits_stored as u16,
        frames,
        transfer_syntax: format!("{ts_uid} ({ts_name})"),
        window,
    };
    let (w, h) = (cols as u32, rows as u32);
    if decoded.rows() != rows as u32 || decoded.columns() != cols as u32 {
        return Err(dicom_error(
            origin,
            format!(
                "the header says {cols} × {rows} pixels, the decoder produced {} × {}",
                decoded.columns(),
                decoded.rows()
            ),
        ));
    }
    if spp == 3 || photometric == "PALETTE COLOR" {
        let image = contain(|| decoded.to_dynamic_image(0))
            .map_err(|panic| dicom_error(origin, format!("the colour conversion failed: {panic}")))?
            .map_err(|e| dicom_error(origin, format!("cannot convert the colour image: {e}")))?;
        let gray = refuse_constant(dynamic_to_luma(image), origin)?;
        return Ok((gray, info(None)));
    }
    let data = decoded.data();
    let expected = frame_bytes as usize;
    if data.len() < expected {
        return Err(dicom_error(
            origin,
            format!(
                "the pixel data holds {} bytes, fewer than the {expected} of {cols} × {rows} pixels of {bits_allocated} bits",
                data.len()
            ),
        ));
    }
    let signed = int(&obj, tags::PIXEL_REPRESENTATION) == Some(1);
    let (slope, intercept) = rescale(&obj, origin)?;
    let stored = stored_values(
        data,
        (rows * cols) as usize,
        bits_allocated,
        bits_stored as u16,
        signed,
    );
    let padding = int(&obj, tags::PIXEL_PADDING_VALUE).map(|p| {
        // Stored in the sample's own representation: the same masking and sign rule.
        stored_value(p as u32, bits_stored as u16, signed)
    });
    let modality = |v: i64| v as f64 * slope + intercept;
    let (voi, window) = choose_voi(&obj, &stored, padding, modality, origin)?;
    let monochrome1 = photometric == "MONOCHROME1";
    let pixels = display_values(&stored, modality, &voi, monochrome1);
    let gray =
        GrayImage::from_raw(w, h, pixels).ok_or_else(|| dicom_error(origin, "pixel count mismatch"))?;
    Ok((refuse_constant(gray, origin)?, info(Some(window))))
}

/// Each stored value through the Modality LUT (`modality`), the VOI step and MONOCHROME1's
/// inversion to 8 bits.
fn display_values(stored: &[i64], modality: impl Fn(i64) -> f64, voi: &Voi, monochrome1: bool) -> Vec<u8> {
    let (lo, hi) = stored
        .iter()
        .fold((i64::MAX, i64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if hi - lo < 1 << 20 {
        // One display value per stored value in the image's range: the pipeline runs once per
        // distinct value, not once per pixel.
        let lut = to_display(&(lo..=hi).map(modality).collect::<Vec<f64>>(), voi, monochrome1);
        stored.iter().map(|&v| lut[(v - lo) as usize]).collect()
    } else {
        to_display(
            &stored.iter().map(|&v| modality(v)).collect::<Vec<f64>>(),
            voi,
            monochrome1,
        )
    }
}

/// The VOI step: the VOI LUT Sequence, the window attributes, or the image's own percentiles.
fn choose_voi(
    obj: &DefaultDicomObject,
    stored: &[i64],
    padding: Option<i64>,
    modality: impl Fn(i64) -> f64,
    origin: &Path,
) -> Result<(Voi, Window)> {
    if let Some(lut) = voi_lut_sequence(obj, origin)? {
        let entries = lut.data.len();
        return Ok((Voi::Lut(lut), Window::Lut { entries }));
    }
    let center = floats(obj, tags::WINDOW_CENTER).and_then(|v| v.first().copied());
    let width = floats(obj, tags::WINDOW_WIDTH).and_then(|v| v.first().copied());
    if let (Some(center), Some(width)) = (center, width)
        && center.is_finite()
        && width.is_finite()
        && width > 0.0
    {
        let function = text(obj, tags::VOILUT_FUNCTION).unwrap_or_else(|| "LINEAR".into());
        let voi = match function.as_str() {
            "LINEAR_EXACT" => Voi::LinearExact { center, width },
            "SIGMOID" => Voi::Sigmoid { center, width },
            _ => Voi::Linear { center, width },
        };
        return Ok((
            voi,
            Window::Tags {
                center,
                width,
                function,
            },
        ));
    }
    let (low, high) = percentile_window(stored, padding)
        .map(|(a, b)| {
            // The Modality LUT is linear: a negative slope swaps the ends.
            let (a, b) = (modality(a), modality(b));
            (a.min(b), a.max(b))
        })
        .ok_or_else(|| dicom_error(origin, "no pixel values outside the padding"))?;
    // An exact window: low maps to 0 and high to 1 (a flat image keeps its level at mid-gray).
    let width = (high - low).max(f64::MIN_POSITIVE);
    let voi = Voi::LinearExact {
        center: (low + high) / 2.0,
        width,
    };
    Ok((voi, Window::Percentile { low, high }))
}

/// The first item of the VOI LUT Sequence, when present; an error when its descriptor and its
/// data disagree (fewer entries than declared, or none).
fn voi_lut_sequence(obj: &DefaultDicomObject, origin: &Path) -> Result<Option<VoiLut>> {
    let Some(item) = obj
        .element_opt(tags::VOILUT_SEQUENCE)
        .ok()
        .flatten()
        .and_then(|seq| seq.items().and_then(|items| items.first()))
    else {
        return Ok(None);
    };
    let bad = |reason: String| dicom_error(origin, format!("VOI LUT Sequence: {reason}"));
    let descriptor = item
        .element(tags::LUT_DESCRIPTOR)
        .ok()
        .and_then(|e| e.to_multi_int::<i64>().ok())
        .ok_or_else(|| bad("no readable LUT Descriptor".into()))?;
    let Some(&[entries, first, bits]) = descriptor.get(..3) else {
        return Err(bad(format!(
            "the LUT Descriptor has {} values, not 3",
            descriptor.len()
        )));
    };
    let entries = if entries == 0 { 65_536 } else { entries as usize };
    if !(1..=16).contains(&bits) {
        return Err(bad(format!("the LUT Descriptor says {bits} bits per entry")));
    }
    let data: Vec<f64> = item
        .element(tags::LUT_DATA)
        .ok()
        .and_then(|e| e.to_multi_int::<i64>().ok())
        .ok_or_else(|| bad("no readable LUT Data".into()))?
        .into_iter()
        .take(entries)
        .map(|v| v as f64)
        .collect();
    if data.len() < entries {
        return Err(bad(format!(
            "the LUT Descriptor declares {entries} entries, the LUT Data holds {}",
            data.len()
        )));
    }
    Ok(Some(VoiLut {
        first: first as f64,
        data,
        bits: bits as u32,
    }))
}

/// Refuses a Photometric Interpretation that does not fit the samples per pixel, and a
/// PALETTE COLOR image without its palette.
fn check_photometric(obj: &DefaultDicomObject, photometric: &str, spp: i64, origin: &Path) -> Result<()> {
    let monochrome = matches!(photometric, "MONOCHROME1" | "MONOCHROME2");
    let fits = match (spp, photometric) {
        (1, "PALETTE COLOR") => {
            let has = |tag| obj.element_opt(tag).ok().flatten().is_some();
            if !(has(tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR)
                && has(tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR)
                && has(tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR))
            {
                return Err(dicom_error(
                    origin,
                    "PALETTE COLOR without its palette (no Red, Green and Blue Palette Color Lookup Table Descriptors)",
                ));
            }
            true
        }
        (1, _) => monochrome,
        _ => !monochrome && photometric != "PALETTE COLOR",
    };
    if fits {
        Ok(())
    } else {
        Err(dicom_error(
            origin,
            format!("Photometric Interpretation {photometric} does not fit {spp} samples per pixel"),
        ))
    }
}

#[cfg(test)]
mod tests;
