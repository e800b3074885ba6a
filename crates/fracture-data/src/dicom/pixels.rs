//! The first frame's header values and samples: its geometry checked against the limits, the
//! stored values, and the Modality LUT's rescale.

use super::*;

/// The first frame's geometry, from the header, checked against `limits` before anything is
/// decoded: rows and columns, samples per pixel, bits allocated and stored, the frame's bytes.
pub(super) struct Frame {
    pub(super) rows: i64,
    pub(super) cols: i64,
    pub(super) spp: i64,
    pub(super) bits_allocated: i64,
    pub(super) bits_stored: i64,
    pub(super) frame_bytes: u64,
}

pub(super) fn frame(obj: &DefaultDicomObject, limits: &DecodeLimits, origin: &Path) -> Result<Frame> {
    let rows = int(obj, tags::ROWS).ok_or_else(|| dicom_error(origin, "no Rows"))?;
    let cols = int(obj, tags::COLUMNS).ok_or_else(|| dicom_error(origin, "no Columns"))?;
    let spp = int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let bits_allocated = int(obj, tags::BITS_ALLOCATED).unwrap_or(16);
    let bits_stored = int(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
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
    Ok(Frame {
        rows,
        cols,
        spp,
        bits_allocated,
        bits_stored,
        frame_bytes,
    })
}

/// The first `n` samples of `data` (little endian, `bits_allocated` 8, 16 or 32 bits each) as
/// stored values: masked to `bits_stored`, sign-extended when `signed`.
pub(super) fn stored_values(
    data: &[u8],
    n: usize,
    bits_allocated: i64,
    bits_stored: u16,
    signed: bool,
) -> Vec<i64> {
    match bits_allocated {
        8 => data[..n]
            .iter()
            .map(|&b| stored_value(u32::from(b), bits_stored, signed))
            .collect(),
        16 => data[..2 * n]
            .chunks_exact(2)
            .map(|c| stored_value(u32::from(u16::from_le_bytes([c[0], c[1]])), bits_stored, signed))
            .collect(),
        _ => data[..4 * n]
            .chunks_exact(4)
            .map(|c| stored_value(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), bits_stored, signed))
            .collect(),
    }
}

/// The Modality LUT's Rescale Slope and Intercept (1 and 0 when absent), refused when they do not
/// map stored values to distinct finite values.
pub(super) fn rescale(obj: &DefaultDicomObject, origin: &Path) -> Result<(f64, f64)> {
    let slope = floats(obj, tags::RESCALE_SLOPE)
        .and_then(|v| v.first().copied())
        .unwrap_or(1.0);
    let intercept = floats(obj, tags::RESCALE_INTERCEPT)
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
    Ok((slope, intercept))
}
