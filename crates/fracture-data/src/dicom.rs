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

/// Deflated Image Frame Compression: each frame's fragment is deflated on its own.
const DEFLATED_FRAMES: &str = "1.2.840.10008.1.2.8.1";
/// RLE Lossless.
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
/// The JPEG transfer syntaxes the registry decodes: baseline, extended, lossless (processes 14).
const JPEG_SYNTAXES: [&str; 4] = [
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];

thread_local! {
    /// How many [`contain`] calls are running on this thread (their panics are not printed).
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
}
static QUIET_HOOK: Once = Once::new();

/// Runs third-party decoding code, turning a panic inside it into `Err(message)`, so that a codec
/// bug on one crafted file is an error naming that file, not the end of the whole command. The
/// panic message is not printed for contained panics (the error carries it); every other panic
/// still reaches the previous hook.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINED.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
    CONTAINED.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get() - 1));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Whether an explicit VR has the long header (2 reserved bytes, then a 4-byte length) rather
/// than a 2-byte length (PS3.5 7.1.2).
fn has_long_length(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT" | b"UV"
    )
}

/// Where the data set starts (after the preamble, the `DICM` magic and the group-2 meta elements,
/// always explicit VR little endian) and the Transfer Syntax UID the meta group names. `None`
/// when the meta group runs past the end of `bytes`.
fn meta_group(bytes: &[u8]) -> Option<(usize, Option<String>)> {
    let mut at = 132usize;
    let mut syntax = None;
    loop {
        let Some(head) = bytes.get(at..at + 8) else {
            return (at == bytes.len()).then_some((at, syntax));
        };
        if u16::from_le_bytes([head[0], head[1]]) != 0x0002 {
            return Some((at, syntax));
        }
        let long = has_long_length(&head[4..6]);
        let (header, len) = if long {
            let l = bytes.get(at + 8..at + 12)?;
            (12usize, u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        } else {
            (8usize, usize::from(u16::from_le_bytes([head[6], head[7]])))
        };
        let end = at.checked_add(header)?.checked_add(len)?;
        let value = bytes.get(at + header..end)?;
        let element = u16::from_le_bytes([head[2], head[3]]);
        // The group length: the parser reads that many bytes as the meta group.
        if element == 0x0000
            && value.len() == 4
            && u32::from_le_bytes([value[0], value[1], value[2], value[3]]) as usize > bytes.len() - end
        {
            return None;
        }
        if element == 0x0010 {
            let uid = String::from_utf8_lossy(value);
            syntax = Some(uid.trim_end_matches(['\0', ' ']).to_string());
        }
        at = end;
    }
}

/// How the data set's elements are encoded, for [`check_declared_lengths`].
#[derive(Clone, Copy)]
struct Encoding {
    explicit: bool,
    little: bool,
}

/// The deepest nesting of sequences [`check_declared_lengths`] follows.
const MAX_NESTING: usize = 16;

impl Encoding {
    fn u16(self, b: &[u8], at: usize) -> Option<u16> {
        let v = b.get(at..at + 2)?;
        Some(if self.little {
            u16::from_le_bytes([v[0], v[1]])
        } else {
            u16::from_be_bytes([v[0], v[1]])
        })
    }

    fn u32(self, b: &[u8], at: usize) -> Option<u32> {
        let v = b.get(at..at + 4)?;
        Some(if self.little {
            u32::from_le_bytes([v[0], v[1], v[2], v[3]])
        } else {
            u32::from_be_bytes([v[0], v[1], v[2], v[3]])
        })
    }
}

/// Whether an element of `tag` holds a sequence: its VR when explicit, else the dictionary's.
fn is_sequence(tag: (u16, u16), vr: Option<&[u8]>) -> bool {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    match vr {
        Some(vr) => vr == b"SQ",
        None => dicom_dictionary_std::StandardDataDictionary
            .by_tag(dicom_object::Tag(tag.0, tag.1))
            .is_some_and(|e| e.vr().relaxed() == dicom_core::VR::SQ),
    }
}

/// Walks the elements in `b[at..end]` (nested sequences and items included) and refuses any that
/// declares more bytes than remain: the parser allocates (and zero-fills) a declared length
/// before it reads a byte, so a 1 KB file declaring a 4 GB element would cost 4 GB. Returns where
/// the walk stopped (after an item delimiter, or at `end`).
fn check_elements(
    b: &[u8],
    mut at: usize,
    end: usize,
    enc: Encoding,
    depth: usize,
) -> std::result::Result<usize, String> {
    if depth > MAX_NESTING {
        return Err(format!("sequences nested deeper than {MAX_NESTING} levels"));
    }
    while at + 8 <= end {
        let (Some(group), Some(element)) = (enc.u16(b, at), enc.u16(b, at + 2)) else {
            break;
        };
        if group == 0xFFFE && matches!(element, 0xE00D | 0xE0DD) {
            return Ok(at + 8);
        }
        let vr = (enc.explicit && group != 0xFFFE).then(|| &b[at + 4..at + 6]);
        let long = vr.is_none_or(has_long_length);
        let (header, len) = match (vr, long) {
            (Some(_), true) => (12, enc.u32(b, at + 8).ok_or("an element header is cut short")?),
            (Some(_), false) => (
                8,
                u32::from(enc.u16(b, at + 6).ok_or("an element header is cut short")?),
            ),
            (None, _) => (8, enc.u32(b, at + 4).ok_or("an element header is cut short")?),
        };
        at += header;
        let tag = (group, element);
        if len == u32::MAX {
            let pixels = tag == (0x7FE0, 0x0010);
            at = check_items(b, at, end, enc, pixels, depth + 1)?;
            continue;
        }
        let len = len as usize;
        if len > end.saturating_sub(at) {
            return Err(format!(
                "element ({group:04X},{element:04X}) declares {len} bytes, only {} remain",
                end.saturating_sub(at)
            ));
        }
        if is_sequence(tag, vr) {
            check_items(b, at, at + len, enc, false, depth + 1)?;
        }
        at += len;
    }
    Ok(at)
}

/// Walks the items (or, for encapsulated pixel data, the fragments) of a sequence in `b[at..end]`
/// until its delimiter or `end`; see [`check_elements`].
fn check_items(
    b: &[u8],
    mut at: usize,
    end: usize,
    enc: Encoding,
    pixels: bool,
    depth: usize,
) -> std::result::Result<usize, String> {
    while at + 8 <= end {
        let (Some(group), Some(element), Some(len)) =
            (enc.u16(b, at), enc.u16(b, at + 2), enc.u32(b, at + 4))
        else {
            break;
        };
        at += 8;
        if (group, element) == (0xFFFE, 0xE0DD) {
            return Ok(at);
        }
        if (group, element) != (0xFFFE, 0xE000) {
            return Err(format!(
                "({group:04X},{element:04X}) where a sequence item should be"
            ));
        }
        if len == u32::MAX {
            if pixels {
                return Err("a pixel data fragment of undefined length".into());
            }
            at = check_elements(b, at, end, enc, depth + 1)?;
            continue;
        }
        let len = len as usize;
        if len > end.saturating_sub(at) {
            return Err(format!(
                "a sequence item declares {len} bytes, only {} remain",
                end.saturating_sub(at)
            ));
        }
        if !pixels {
            check_elements(b, at, at + len, enc, depth + 1)?;
        }
        at += len;
    }
    Ok(at)
}

/// How many bytes raw-deflated `data` inflates to, counting without keeping them and stopping
/// at `cap + 1`; `None` when the stream is damaged before that.
fn inflated_len(data: &[u8], cap: u64) -> Option<u64> {
    let decoder = flate2::read::DeflateDecoder::new(data);
    std::io::copy(&mut decoder.take(cap.saturating_add(1)), &mut std::io::sink()).ok()
}

/// Columns, rows and components of the first frame header (SOF) of a JPEG stream.
fn jpeg_frame_header(jpeg: &[u8]) -> std::result::Result<(u16, u16, u8), &'static str> {
    if jpeg.get(..2) != Some(&[0xFF, 0xD8][..]) {
        return Err("the JPEG fragment does not start with a JPEG start-of-image marker");
    }
    let mut at = 2usize;
    while let Some(&byte) = jpeg.get(at) {
        if byte != 0xFF {
            at += 1;
            continue;
        }
        let Some(&marker) = jpeg.get(at + 1) else { break };
        match marker {
            0xFF | 0x00 | 0x01 | 0xD0..=0xD8 => at += if marker == 0xFF { 1 } else { 2 },
            0xDA | 0xD9 => return Err("the JPEG stream has no frame header before its scan"),
            _ => {
                let Some(len) = jpeg.get(at + 2..at + 4) else {
                    break;
                };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                let sof = matches!(marker, 0xC0..=0xCF) && ![0xC4, 0xC8, 0xCC].contains(&marker);
                if sof {
                    let Some(f) = jpeg.get(at + 4..at + 10) else { break };
                    let rows = u16::from_be_bytes([f[1], f[2]]);
                    let cols = u16::from_be_bytes([f[3], f[4]]);
                    return Ok((cols, rows, f[5]));
                }
                at += 2 + len;
            }
        }
    }
    Err("the JPEG stream ends before its frame header")
}

/// Checks the encapsulated first frame against the header's geometry before any codec reads it:
/// a JPEG's size and component count, an RLE header's segment count and offsets, a deflated
/// frame's inflated size. The codecs trust the header and slice by it.
fn check_encapsulated(
    obj: &DefaultDicomObject,
    ts_uid: &str,
    geometry: (i64, i64, i64, i64),
    frame_bytes: u64,
    origin: &Path,
) -> Result<()> {
    let (cols, rows, spp, bits_allocated) = geometry;
    let Some(fragments) = obj
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .and_then(|e| e.value().fragments())
    else {
        return Ok(());
    };
    let Some(first) = fragments.iter().find(|f| !f.is_empty()) else {
        return Err(dicom_error(
            origin,
            "the encapsulated pixel data holds no fragment",
        ));
    };
    if JPEG_SYNTAXES.contains(&ts_uid) {
        let (w, h, components) = jpeg_frame_header(first).map_err(|e| dicom_error(origin, e))?;
        if i64::from(components) != spp {
            return Err(dicom_error(
                origin,
                format!("the header says {spp} samples per pixel, its JPEG holds {components} components"),
            ));
        }
        if i64::from(w) != cols || (h != 0 && i64::from(h) != rows) {
            return Err(dicom_error(
                origin,
                format!("the header says {cols} × {rows} pixels, its JPEG holds {w} × {h}"),
            ));
        }
    } else if ts_uid == RLE_LOSSLESS {
        let word = |i: usize| {
            first
                .get(4 * i..4 * i + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let segments = word(0).ok_or_else(|| dicom_error(origin, "the RLE header is cut short"))?;
        let expected = (spp * bits_allocated / 8) as usize;
        if segments != expected {
            return Err(dicom_error(
                origin,
                format!(
                    "the RLE header declares {segments} segments, {spp} samples of {bits_allocated} bits need {expected}"
                ),
            ));
        }
        let mut previous = 63usize;
        for i in 1..=segments {
            let offset = word(i).ok_or_else(|| dicom_error(origin, "the RLE header is cut short"))?;
            if offset <= previous || offset >= first.len() {
                return Err(dicom_error(
                    origin,
                    format!(
                        "RLE segment {i} starts at byte {offset}, outside the {}-byte fragment or before the previous one",
                        first.len()
                    ),
                ));
            }
            previous = offset;
        }
    } else if ts_uid == DEFLATED_FRAMES {
        match inflated_len(first, frame_bytes) {
            Some(n) if n > frame_bytes => {
                return Err(dicom_error(
                    origin,
                    format!("the deflated frame inflates past the {frame_bytes} bytes its header declares"),
                ));
            }
            Some(_) => {}
            None => return Err(dicom_error(origin, "the deflated frame is damaged")),
        }
    }
    Ok(())
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
    let rows = int(&obj, tags::ROWS).ok_or_else(|| dicom_error(origin, "no Rows"))?;
    let cols = int(&obj, tags::COLUMNS).ok_or_else(|| dicom_error(origin, "no Columns"))?;
    let spp = int(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let bits_allocated = int(&obj, tags::BITS_ALLOCATED).unwrap_or(16);
    let bits_stored = int(&obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    if rows <= 0 || cols <= 0 {
        return Err(dicom_error(origin, format!("{cols} × {rows} pixels")));
    }
    if cols > i64::from(limits.max_width) || rows > i64::from(limits.max_height) {
        return Err(dicom_error(
            origin,
            format!(
                "{cols} × {rows} pixels, over the limit of {} × {}",
                limits.max_width, limits.max_height
            ),
        ));
    }
    if ![1, 3].contains(&spp) || ![8, 16, 32].contains(&bits_allocated) {
        return Err(dicom_error(
            origin,
            format!("{spp} samples per pixel of {bits_allocated} bits is not supported"),
        ));
    }
    if !(1..=bits_allocated).contains(&bits_stored) {
        return Err(dicom_error(
            origin,
            format!("Bits Stored {bits_stored} with Bits Allocated {bits_allocated}"),
        ));
    }
    // Rows and columns fit in u32 here, so the product fits in u64.
    let frame_bytes = (rows * cols * spp * bits_allocated / 8) as u64;
    if frame_bytes.saturating_mul(9) > limits.max_alloc_bytes {
        return Err(dicom_error(
            origin,
            format!(
                "a frame of {frame_bytes} bytes needs more memory to decode than the limit of {} bytes",
                limits.max_alloc_bytes
            ),
        ));
    }
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
    let slope = floats(&obj, tags::RESCALE_SLOPE)
        .and_then(|v| v.first().copied())
        .unwrap_or(1.0);
    let intercept = floats(&obj, tags::RESCALE_INTERCEPT)
        .and_then(|v| v.first().copied())
        .unwrap_or(0.0);
    if slope == 0.0 || !slope.is_finite() || !intercept.is_finite() {
        return Err(dicom_error(
            origin,
            format!(
                "Rescale Slope {slope} and Intercept {intercept} do not map stored values to distinct finite values"
            ),
        ));
    }
    let n = (rows * cols) as usize;
    let stored: Vec<i64> = match bits_allocated {
        8 => data[..n]
            .iter()
            .map(|&b| stored_value(u32::from(b), bits_stored as u16, signed))
            .collect(),
        16 => data[..2 * n]
            .chunks_exact(2)
            .map(|c| {
                stored_value(
                    u32::from(u16::from_le_bytes([c[0], c[1]])),
                    bits_stored as u16,
                    signed,
                )
            })
            .collect(),
        _ => data[..4 * n]
            .chunks_exact(4)
            .map(|c| {
                stored_value(
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    bits_stored as u16,
                    signed,
                )
            })
            .collect(),
    };
    let padding = int(&obj, tags::PIXEL_PADDING_VALUE).map(|p| {
        // Stored in the sample's own representation: the same masking and sign rule.
        stored_value(p as u32, bits_stored as u16, signed)
    });
    let modality = |v: i64| v as f64 * slope + intercept;
    let (voi, window) = choose_voi(&obj, &stored, padding, modality, origin)?;
    let monochrome1 = photometric == "MONOCHROME1";
    let (lo, hi) = stored
        .iter()
        .fold((i64::MAX, i64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let pixels = if hi - lo < 1 << 20 {
        // One display value per stored value in the image's range: the pipeline runs once per
        // distinct value, not once per pixel.
        let lut = to_display(&(lo..=hi).map(modality).collect::<Vec<f64>>(), &voi, monochrome1);
        stored.iter().map(|&v| lut[(v - lo) as usize]).collect()
    } else {
        to_display(
            &stored.iter().map(|&v| modality(v)).collect::<Vec<f64>>(),
            &voi,
            monochrome1,
        )
    };
    let gray =
        GrayImage::from_raw(w, h, pixels).ok_or_else(|| dicom_error(origin, "pixel count mismatch"))?;
    Ok((refuse_constant(gray, origin)?, info(Some(window))))
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

/// Checks the data set before the parser sees it: a deflated one must inflate to no more than
/// [`DecodeLimits::max_file_bytes`] (counted first, without keeping the bytes), and no element
/// may declare more bytes than the data set holds (see [`check_elements`]).
fn check_data_set(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<()> {
    let Some((start, syntax)) = meta_group(bytes) else {
        return Err(dicom_error(
            origin,
            "the file meta group runs past the end of the file",
        ));
    };
    let ts = syntax.as_deref().and_then(|uid| TransferSyntaxRegistry.get(uid));
    let deflated =
        ts.is_some_and(|ts| matches!(ts.codec(), dicom_encoding::transfer_syntax::Codec::Dataset(_)));
    let enc = Encoding {
        // Implicit VR Little Endian is the one syntax without VRs in the data set.
        explicit: syntax.as_deref() != Some("1.2.840.10008.1.2"),
        little: ts.is_none_or(|ts| ts.endianness() == dicom_encoding::transfer_syntax::Endianness::Little),
    };
    let walk = |data: &[u8]| {
        check_elements(data, 0, data.len(), enc, 0)
            .map(|_| ())
            .map_err(|why| dicom_error(origin, format!("{why}: a damaged or crafted file")))
    };
    if !deflated {
        return walk(&bytes[start..]);
    }
    let cap = limits.max_file_bytes;
    match inflated_len(&bytes[start..], cap) {
        Some(n) if n > cap => Err(dicom_error(
            origin,
            format!("the deflated data set inflates to more than the limit of {cap} bytes"),
        )),
        Some(n) => {
            let mut inflated = Vec::with_capacity(n as usize);
            let _ = flate2::read::DeflateDecoder::new(&bytes[start..])
                .take(cap)
                .read_to_end(&mut inflated);
            walk(&inflated)
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_linear_window_is_monotone_and_clamped(c in -5000.0f64..5000.0, w in 1.0f64..8000.0, a in -10000.0f64..10000.0, b in -10000.0f64..10000.0) {
            let (lo, hi) = (a.min(b), a.max(b));
            let (ya, yb) = (voi_linear(lo, c, w), voi_linear(hi, c, w));
            prop_assert!(ya <= yb + 1e-12);
            prop_assert!((0.0..=1.0).contains(&ya) && (0.0..=1.0).contains(&yb));
            prop_assert_eq!(voi_linear(c - w, c, w), 0.0);
            prop_assert_eq!(voi_linear(c + w, c, w), 1.0);
            let (ea, eb) = (voi_linear_exact(lo, c, w), voi_linear_exact(hi, c, w));
            prop_assert!(ea <= eb && (0.0..=1.0).contains(&ea) && (0.0..=1.0).contains(&eb));
            let (sa, sb) = (voi_sigmoid(lo, c, w), voi_sigmoid(hi, c, w));
            prop_assert!(sa <= sb && (0.0..=1.0).contains(&sa));
        }

        #[test]
        fn monochrome1_inverts_exactly(values in proptest::collection::vec(-4096.0f64..4096.0, 1..64), c in -100.0f64..100.0, w in 1.0f64..5000.0) {
            let voi = Voi::Linear { center: c, width: w };
            let m2 = to_display(&values, &voi, false);
            let m1 = to_display(&values, &voi, true);
            for (a, b) in m2.iter().zip(&m1) {
                prop_assert_eq!(u16::from(*a) + u16::from(*b), 255);
            }
        }

        #[test]
        fn stored_values_mask_and_sign_extend(v in 0u32..4096, junk in 0u32..16) {
            // 12 bits stored in 16: the top four bits are junk and ignored.
            let raw = v | (junk << 12);
            prop_assert_eq!(stored_value(raw, 12, false), i64::from(v));
            let signed = stored_value(raw, 12, true);
            prop_assert_eq!(signed, if v >= 2048 { i64::from(v) - 4096 } else { i64::from(v) });
        }
    }

    #[test]
    fn a_panic_inside_a_contained_decoder_is_an_error_with_its_message() {
        assert_eq!(contain(|| 7), Ok(7));
        let e = contain(|| -> u8 { panic!("codec bug at byte {}", 12) }).unwrap_err();
        assert_eq!(e, "codec bug at byte 12");
        let short: Vec<u8> = vec![1, 2];
        let e = contain(|| short[..std::hint::black_box(5)].len()).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        // Nested containment unwinds only to the inner boundary.
        assert_eq!(
            contain(|| contain(|| -> u8 { panic!("inner") }).is_err()),
            Ok(true)
        );
    }

    #[test]
    fn the_linear_window_follows_the_standard() {
        // PS3.3 C.11.2.1.2.1 with c = 2048, w = 4096: the full 12-bit range.
        assert_eq!(voi_linear(0.0, 2048.0, 4096.0), 0.0);
        assert_eq!(voi_linear(4095.0, 2048.0, 4096.0), 1.0);
        assert!((voi_linear(2047.5, 2048.0, 4096.0) - 0.5).abs() < 1e-12);
        // Width 1: a threshold at c − 0.5.
        assert_eq!(voi_linear(9.4, 10.0, 1.0), 0.0);
        assert_eq!(voi_linear(9.6, 10.0, 1.0), 1.0);
    }

    #[test]
    fn the_percentile_window_leaves_out_the_padding() {
        let mut values: Vec<i64> = (0..1000).collect();
        values.extend(std::iter::repeat_n(-2000, 5000));
        assert_eq!(percentile_window(&values, Some(-2000)), Some((5, 995)));
        assert_eq!(percentile_window(&[-2000], Some(-2000)), None);
        // A range too wide for a histogram gives the same answer by sorting.
        let mut wide: Vec<i64> = (0..1000).map(|v| v << 20).collect();
        wide.push(-2000);
        assert_eq!(percentile_window(&wide, Some(-2000)), Some((5 << 20, 995 << 20)));
    }
}

/// SOP Class UID of Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7";

/// Attributes copied from the source into a secondary capture: the Patient module and the
/// General Study module, so that an archive files the result with its study. They go into the
/// DICOM file only: nothing here logs them.
const COPIED: [(dicom_object::Tag, dicom_core::VR); 11] = [
    (tags::PATIENT_NAME, dicom_core::VR::PN),
    (tags::PATIENT_ID, dicom_core::VR::LO),
    (tags::ISSUER_OF_PATIENT_ID, dicom_core::VR::LO),
    (tags::PATIENT_BIRTH_DATE, dicom_core::VR::DA),
    (tags::PATIENT_SEX, dicom_core::VR::CS),
    (tags::STUDY_DATE, dicom_core::VR::DA),
    (tags::STUDY_TIME, dicom_core::VR::TM),
    (tags::REFERRING_PHYSICIAN_NAME, dicom_core::VR::PN),
    (tags::STUDY_ID, dicom_core::VR::SH),
    (tags::ACCESSION_NUMBER, dicom_core::VR::SH),
    (tags::BODY_PART_EXAMINED, dicom_core::VR::CS),
];

/// A new globally unique UID: `2.25.` and a random 128-bit number in decimal (ISO/IEC 9834-8, the
/// UUID form of an OID), so no organisation root is needed.
pub fn new_uid() -> String {
    format!("2.25.{}", rand::random::<u128>())
}

/// The UIDs of a [`secondary_capture`] and the source it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureUids {
    /// Study Instance UID: the source's (a new one when the source has none).
    pub study: String,
    /// Series Instance UID of the new series the capture starts.
    pub series: String,
    /// SOP Instance UID of the capture.
    pub instance: String,
    /// The source's Series Instance UID, when it has one (in Referenced Series Sequence).
    pub source_series: Option<String>,
    /// The source's SOP Instance UID, when it has one (in Source Image Sequence).
    pub source_instance: Option<String>,
}

/// A DICOM Secondary Capture (explicit VR little endian) of `image` (RGB, 8 bits, its text burned
/// in by the caller) derived from the DICOM file `source`: the source's Patient and General Study
/// attributes copied, its Study Instance UID kept, a new series and instance, the source image
/// referenced (Source Image Sequence, Referenced Series Sequence), Burned In Annotation `YES`,
/// Image Type `DERIVED\SECONDARY`, and `comments` as Image Comments and `description` as Series
/// and Derivation Description. Returns the file's bytes and its UIDs. The source is checked against
/// `limits` as [`decode_dicom`] checks it; `origin` names it in errors.
pub fn secondary_capture(
    source: &[u8],
    origin: &Path,
    limits: &DecodeLimits,
    image: &image::RgbImage,
    description: &str,
    comments: &str,
) -> Result<(Vec<u8>, CaptureUids)> {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    let src = parse(source, origin, limits)?;
    let (w, h) = image.dimensions();
    let (rows, cols) = (
        u16::try_from(h).map_err(|_| dicom_error(origin, format!("the capture is {h} rows high")))?,
        u16::try_from(w).map_err(|_| dicom_error(origin, format!("the capture is {w} columns wide")))?,
    );
    let uids = CaptureUids {
        study: text(&src, tags::STUDY_INSTANCE_UID).unwrap_or_else(new_uid),
        series: new_uid(),
        instance: new_uid(),
        source_series: text(&src, tags::SERIES_INSTANCE_UID),
        source_instance: text(&src, tags::SOP_INSTANCE_UID),
    };
    let el = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let mut obj = InMemDicomObject::new_empty();
    for (tag, vr) in COPIED {
        if let Some(v) = text(&src, tag) {
            obj.put(el(tag, vr, &v));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (date, time) = utc_date_time(now);
    for e in [
        el(tags::SOP_CLASS_UID, VR::UI, SECONDARY_CAPTURE_SOP_CLASS),
        el(tags::SOP_INSTANCE_UID, VR::UI, &uids.instance),
        el(tags::STUDY_INSTANCE_UID, VR::UI, &uids.study),
        el(tags::SERIES_INSTANCE_UID, VR::UI, &uids.series),
        el(tags::MODALITY, VR::CS, "OT"),
        el(tags::CONVERSION_TYPE, VR::CS, "WSD"),
        el(tags::SERIES_NUMBER, VR::IS, "9901"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::SERIES_DESCRIPTION, VR::LO, description),
        el(tags::DERIVATION_DESCRIPTION, VR::ST, description),
        el(tags::IMAGE_COMMENTS, VR::LT, comments),
        el(tags::CONTENT_DATE, VR::DA, &date),
        el(tags::CONTENT_TIME, VR::TM, &time),
        el(tags::MANUFACTURER, VR::LO, "fracture"),
        el(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        el(tags::BURNED_IN_ANNOTATION, VR::CS, "YES"),
        DataElement::new(
            tags::IMAGE_TYPE,
            VR::CS,
            PrimitiveValue::Strs(["DERIVED".to_string(), "SECONDARY".to_string()].into()),
        ),
        us(tags::SAMPLES_PER_PIXEL, 3),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"),
        us(tags::PLANAR_CONFIGURATION, 0),
        us(tags::ROWS, rows),
        us(tags::COLUMNS, cols),
        us(tags::BITS_ALLOCATED, 8),
        us(tags::BITS_STORED, 8),
        us(tags::HIGH_BIT, 7),
        us(tags::PIXEL_REPRESENTATION, 0),
    ] {
        obj.put(e);
    }
    if let Some(series) = &uids.source_series {
        let item = InMemDicomObject::from_element_iter([el(tags::SERIES_INSTANCE_UID, VR::UI, series)]);
        obj.put(DataElement::new(
            tags::REFERENCED_SERIES_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![item]),
        ));
    }
    if let Some(instance) = &uids.source_instance {
        let class = text(&src, tags::SOP_CLASS_UID).unwrap_or_default();
        let item = InMemDicomObject::from_element_iter([
            el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &class),
            el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
        ]);
        obj.put(DataElement::new(
            tags::SOURCE_IMAGE_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![item]),
        ));
    }
    let mut pixels = image.as_raw().clone();
    if pixels.len() % 2 == 1 {
        pixels.push(0); // values have even length
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(pixels),
    ));
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.1")
                .media_storage_sop_class_uid(SECONDARY_CAPTURE_SOP_CLASS)
                .media_storage_sop_instance_uid(uids.instance.as_str()),
        )
        .map_err(|e| dicom_error(origin, format!("cannot build the capture's meta group: {e}")))?;
    let mut out = Vec::new();
    file.write_all(&mut out)
        .map_err(|e| dicom_error(origin, format!("cannot write the capture: {e}")))?;
    Ok((out, uids))
}

/// `YYYYMMDD` and `HHMMSS` (UTC) of a Unix time in seconds.
fn utc_date_time(secs: u64) -> (String, String) {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    // RFC 3339 to the second (`2026-12-03T17:05:09Z`), digits only: `20261203170509`.
    let digits: String = humantime::format_rfc3339_seconds(at)
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    (digits[..8].to_string(), digits[8..14].to_string())
}

#[cfg(test)]
mod capture_tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date_time(0), ("19700101".into(), "000000".into()));
        // 2026-12-03 17:05:09 UTC.
        assert_eq!(utc_date_time(1_796_317_509), ("20261203".into(), "170509".into()));
        // 2000-02-29 (a leap day) 23:59:59.
        assert_eq!(utc_date_time(951_868_799), ("20000229".into(), "235959".into()));
    }
}
