//! Secondary captures: a rendered result written back as a DICOM file of the source's study.

use super::*;

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
