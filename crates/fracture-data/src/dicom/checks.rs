//! The byte stream checked before the DICOM parser sees it: the file meta group, every element's
//! declared length against the bytes there are, sequence nesting, encapsulated JPEG frame headers
//! and a deflated data set's inflated size, all against [`DecodeLimits`]; and the parser's panics
//! turned into errors.

use super::*;

/// Deflated Image Frame Compression: each frame's fragment is deflated on its own.
pub(super) const DEFLATED_FRAMES: &str = "1.2.840.10008.1.2.8.1";
/// RLE Lossless.
pub(super) const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
/// The JPEG transfer syntaxes the registry decodes: baseline, extended, lossless (processes 14).
pub(super) const JPEG_SYNTAXES: [&str; 4] = [
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
pub(super) fn has_long_length(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT" | b"UV"
    )
}

/// Where the data set starts (after the preamble, the `DICM` magic and the group-2 meta elements,
/// always explicit VR little endian) and the Transfer Syntax UID the meta group names. `None`
/// when the meta group runs past the end of `bytes`.
pub(super) fn meta_group(bytes: &[u8]) -> Option<(usize, Option<String>)> {
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
pub(super) struct Encoding {
    explicit: bool,
    little: bool,
}

/// The deepest nesting of sequences [`check_declared_lengths`] follows.
pub(super) const MAX_NESTING: usize = 16;

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
pub(super) fn is_sequence(tag: (u16, u16), vr: Option<&[u8]>) -> bool {
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
pub(super) fn check_elements(
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
pub(super) fn check_items(
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
pub(super) fn inflated_len(data: &[u8], cap: u64) -> Option<u64> {
    let decoder = flate2::read::DeflateDecoder::new(data);
    std::io::copy(&mut decoder.take(cap.saturating_add(1)), &mut std::io::sink()).ok()
}

/// Columns, rows and components of the first frame header (SOF) of a JPEG stream.
pub(super) fn jpeg_frame_header(jpeg: &[u8]) -> std::result::Result<(u16, u16, u8), &'static str> {
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
pub(super) fn check_encapsulated(
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

/// Checks the data set before the parser sees it: a deflated one must inflate to no more than
/// [`DecodeLimits::max_file_bytes`] (counted first, without keeping the bytes), and no element
/// may declare more bytes than the data set holds (see [`check_elements`]).
pub(super) fn check_data_set(bytes: &[u8], origin: &Path, limits: &DecodeLimits) -> Result<()> {
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
