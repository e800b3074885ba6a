//! DICOM files written the way a scanner stores a radiograph, for tests: grayscale samples of 8 or
//! 16 bits with the attributes a viewer reads (Bits Stored, Pixel Representation, Photometric
//! Interpretation, Rescale, Window), uncompressed, deflated, or encapsulated as lossless JPEG
//! (process 14, first-order prediction, written by [`jpeg_lossless`]), RLE ([`rle_lossless`]) or
//! baseline JPEG ([`jpeg_baseline`]).

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, DicomValue, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use std::io::Read;

use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

mod codecs;
pub use codecs::{jpeg_baseline, jpeg_lossless, rle_lossless};

/// Transfer syntax UIDs used by the tests.
pub mod syntax {
    /// Implicit VR Little Endian.
    pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    /// Explicit VR Little Endian.
    pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    /// JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, Selection Value 1).
    pub const JPEG_LOSSLESS_SV1: &str = "1.2.840.10008.1.2.4.70";
    /// JPEG-LS Lossless (not decodable without a C library: refused).
    pub const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";
    /// Deflated Explicit VR Little Endian (the whole data set zlib-deflated).
    pub const DEFLATED_LE: &str = "1.2.840.10008.1.2.1.99";
    /// RLE Lossless (DICOM PS3.5 annex G: one PackBits segment per byte plane).
    pub const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
    /// JPEG Baseline (Process 1): 8-bit lossy JPEG.
    pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
}

/// How a test DICOM file stores its samples.
#[derive(Debug, Clone)]
pub struct DicomSpec {
    /// Columns and rows.
    pub size: (u32, u32),
    /// Bits Allocated (8 or 16) and Bits Stored.
    pub bits: (u16, u16),
    /// Pixel Representation 1 (two's complement).
    pub signed: bool,
    /// `MONOCHROME1` or `MONOCHROME2`.
    pub photometric: &'static str,
    /// Rescale Slope and Intercept, when written.
    pub rescale: Option<(f64, f64)>,
    /// Window Center and Width, when written.
    pub window: Option<(f64, f64)>,
    /// Pixel Padding Value, when written.
    pub padding: Option<i32>,
    /// Transfer syntax UID.
    pub syntax: &'static str,
    /// Number of Frames written (the samples are repeated per frame).
    pub frames: u32,
}

impl DicomSpec {
    /// A 12-bit MONOCHROME2 radiograph of `size`, uncompressed explicit VR, no windowing attributes.
    pub fn twelve_bit(size: (u32, u32)) -> Self {
        DicomSpec {
            size,
            bits: (16, 12),
            signed: false,
            photometric: "MONOCHROME2",
            rescale: None,
            window: None,
            padding: None,
            syntax: syntax::EXPLICIT_LE,
            frames: 1,
        }
    }
}

/// The bytes of a DICOM file (preamble, meta group, data set) holding `samples` (row-major, one per
/// pixel, the low `bits.1` bits of each written as stored; signed values in two's complement) as
/// `spec` says, with a CR modality, a body part and fictitious patient attributes (a test checks
/// they are never echoed).
pub fn dicom_bytes(samples: &[i32], spec: &DicomSpec) -> Vec<u8> {
    let (w, h) = spec.size;
    assert_eq!(samples.len(), (w * h) as usize);
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let text = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let mut obj = InMemDicomObject::from_element_iter([
        text(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.1"),
        text(tags::SOP_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.2.1125.1.1"),
        text(tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
        text(tags::PATIENT_ID, VR::LO, "PID-0042-SECRET"),
        text(tags::PATIENT_BIRTH_DATE, VR::DA, "19700101"),
        text(tags::ACCESSION_NUMBER, VR::SH, "ACC-77-SECRET"),
        text(tags::MODALITY, VR::CS, "CR"),
        text(tags::BODY_PART_EXAMINED, VR::CS, "HAND"),
        us(tags::SAMPLES_PER_PIXEL, 1),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, spec.photometric),
        us(tags::ROWS, h as u16),
        us(tags::COLUMNS, w as u16),
        us(tags::BITS_ALLOCATED, spec.bits.0),
        us(tags::BITS_STORED, spec.bits.1),
        us(tags::HIGH_BIT, spec.bits.1 - 1),
        us(tags::PIXEL_REPRESENTATION, u16::from(spec.signed)),
    ]);
    if spec.frames > 1 {
        obj.put(text(tags::NUMBER_OF_FRAMES, VR::IS, &spec.frames.to_string()));
    }
    if let Some((slope, intercept)) = spec.rescale {
        obj.put(text(tags::RESCALE_SLOPE, VR::DS, &slope.to_string()));
        obj.put(text(tags::RESCALE_INTERCEPT, VR::DS, &intercept.to_string()));
    }
    if let Some((center, width)) = spec.window {
        obj.put(text(tags::WINDOW_CENTER, VR::DS, &center.to_string()));
        obj.put(text(tags::WINDOW_WIDTH, VR::DS, &width.to_string()));
    }
    if let Some(p) = spec.padding {
        let vr = if spec.signed { VR::SS } else { VR::US };
        let value = if spec.signed {
            PrimitiveValue::from(p as i16)
        } else {
            PrimitiveValue::from(p as u16)
        };
        obj.put(DataElement::new(tags::PIXEL_PADDING_VALUE, vr, value));
    }
    let mask = (1u32 << spec.bits.1) - 1;
    let stored: Vec<u32> = samples.iter().map(|&v| (v as u32) & mask).collect();
    let frame: Vec<u8> = match spec.bits.0 {
        8 => stored.iter().map(|&v| v as u8).collect(),
        _ => stored.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect(),
    };
    let encoded = |frame: &dyn Fn() -> Vec<u8>| -> Option<Vec<Vec<u8>>> {
        Some((0..spec.frames).map(|_| frame()).collect())
    };
    let fragments = match spec.syntax {
        syntax::JPEG_LOSSLESS_SV1 => encoded(&|| jpeg_lossless(&stored, w, h, spec.bits.1 as u8)),
        syntax::RLE_LOSSLESS => encoded(&|| rle_lossless(&frame, spec.bits.0)),
        syntax::JPEG_BASELINE => encoded(&|| jpeg_baseline(&frame, w, h)),
        _ => None,
    };
    if let Some(fragments) = fragments {
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            DicomValue::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), fragments)),
        ));
    } else {
        let all: Vec<u8> = (0..spec.frames).flat_map(|_| frame.iter().copied()).collect();
        let vr = if spec.bits.0 == 8 { VR::OB } else { VR::OW };
        obj.put(DataElement::new(tags::PIXEL_DATA, vr, PrimitiveValue::from(all)));
    }
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(spec.syntax))
        .unwrap();
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

/// 8-bit values onto 0..=4095 (12 bits), rounded.
pub fn to_twelve_bits(s: u8) -> i32 {
    (f64::from(s) * 4095.0 / 255.0).round() as i32
}

/// An 8-bit radiograph as a scanner would store it, in the ways the tests check: 12-bit
/// MONOCHROME2 and MONOCHROME1 with window tags spanning 0..=4095, 16-bit signed with a rescale
/// and a window in modality units, 12-bit lossless JPEG, RLE lossless and deflated, 8-bit baseline
/// JPEG (quality 95), and implicit VR with two frames. Each
/// displays (window applied, MONOCHROME1 inverted) as the source picture: `(name, spec, bytes)`.
pub fn scanner_variants(width: u32, height: u32, luma: &[u8]) -> Vec<(&'static str, DicomSpec, Vec<u8>)> {
    let size = (width, height);
    let v12: Vec<i32> = luma.iter().map(|&x| to_twelve_bits(x)).collect();
    let full = Some((2048.0, 4096.0));
    let cases: Vec<(&'static str, Vec<i32>, DicomSpec)> = vec![
        (
            "12-bit MONOCHROME2, window tags",
            v12.clone(),
            DicomSpec {
                window: full,
                ..DicomSpec::twelve_bit(size)
            },
        ),
        (
            "12-bit MONOCHROME1, window tags",
            v12.iter().map(|v| 4095 - v).collect(),
            DicomSpec {
                window: full,
                photometric: "MONOCHROME1",
                ..DicomSpec::twelve_bit(size)
            },
        ),
        (
            "16-bit signed, rescale, window in modality units",
            luma.iter()
                .map(|&x| (f64::from(x) * 65535.0 / 255.0).round() as i32 - 32768)
                .collect(),
            DicomSpec {
                bits: (16, 16),
                signed: true,
                rescale: Some((1.0, 32768.0)),
                window: Some((32768.0, 65536.0)),
                ..DicomSpec::twelve_bit(size)
            },
        ),
        (
            "12-bit, lossless JPEG",
            v12.clone(),
            DicomSpec {
                window: full,
                syntax: syntax::JPEG_LOSSLESS_SV1,
                ..DicomSpec::twelve_bit(size)
            },
        ),
        (
            "12-bit, RLE lossless",
            v12.clone(),
            DicomSpec {
                window: full,
                syntax: syntax::RLE_LOSSLESS,
                ..DicomSpec::twelve_bit(size)
            },
        ),
        (
            "12-bit, deflated explicit VR",
            v12.clone(),
            DicomSpec {
                window: full,
                syntax: syntax::DEFLATED_LE,
                ..DicomSpec::twelve_bit(size)
            },
        ),
        (
            "8-bit, JPEG baseline (quality 95)",
            luma.iter().map(|&x| i32::from(x)).collect(),
            DicomSpec {
                bits: (8, 8),
                window: Some((128.0, 256.0)),
                syntax: syntax::JPEG_BASELINE,
                ..DicomSpec::twelve_bit(size)
            },
        ),
        (
            "12-bit, implicit VR, two frames",
            v12,
            DicomSpec {
                window: full,
                syntax: syntax::IMPLICIT_LE,
                frames: 2,
                ..DicomSpec::twelve_bit(size)
            },
        ),
    ];
    cases
        .into_iter()
        .map(|(name, samples, spec)| {
            let bytes = dicom_bytes(&samples, &spec);
            (name, spec, bytes)
        })
        .collect()
}

/// `bytes` (a DICOM file) reopened, changed by `edit` and written again with the same transfer
/// syntax: how a test crafts a file whose header and pixel data disagree.
pub fn edit_dicom(bytes: &[u8], edit: impl FnOnce(&mut InMemDicomObject)) -> Vec<u8> {
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(bytes)
        .unwrap();
    edit(&mut obj);
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

fn fragment(bytes: Vec<u8>) -> DataElement<InMemDicomObject> {
    DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        DicomValue::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), vec![bytes])),
    )
}

/// A deflated-data-set DICOM file whose data set inflates to more than `inflated_bytes` (a
/// Pixel Data element of that many zeros), built by streaming the zeros into the deflater: the
/// file is about a thousandth of the inflated size and never exists inflated in memory here.
pub fn deflated_bomb(inflated_bytes: u32) -> Vec<u8> {
    use std::io::Write;
    let small = dicom_bytes(
        &[100; 4],
        &DicomSpec {
            syntax: syntax::DEFLATED_LE,
            bits: (8, 8),
            ..DicomSpec::twelve_bit((2, 2))
        },
    );
    // The meta group (explicit VR little endian, group 0002) ends where group 0008 starts.
    let mut at = 132;
    while small[at..at + 2] == [2, 0] {
        let long = matches!(&small[at + 4..at + 6], b"OB" | b"UN" | b"SQ" | b"UT" | b"OW");
        at += if long {
            12 + u32::from_le_bytes(small[at + 8..at + 12].try_into().unwrap()) as usize
        } else {
            8 + usize::from(u16::from_le_bytes([small[at + 6], small[at + 7]]))
        };
    }
    let mut data_set = Vec::new();
    flate2::read::DeflateDecoder::new(&small[at..])
        .read_to_end(&mut data_set)
        .unwrap();
    let pixel_data = data_set
        .windows(4)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00])
        .unwrap();
    data_set.truncate(pixel_data);
    data_set.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    data_set.extend(inflated_bytes.to_le_bytes());
    let mut out = small[..at].to_vec();
    let mut deflater = flate2::write::DeflateEncoder::new(&mut out, flate2::Compression::fast());
    deflater.write_all(&data_set).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = inflated_bytes as usize;
    while left > 0 {
        let n = left.min(zeros.len());
        deflater.write_all(&zeros[..n]).unwrap();
        left -= n;
    }
    deflater.finish().unwrap();
    out
}

/// `plain` with a VOI LUT Sequence whose descriptor declares 65,536 entries and whose data holds 10.
fn short_voi_lut(plain: &[u8]) -> Vec<u8> {
    edit_dicom(plain, |o| {
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16([0u16, 0, 16].into_iter().collect()),
            ),
            DataElement::new(
                tags::LUT_DATA,
                VR::OW,
                PrimitiveValue::U16((0..10u16).map(|v| v * 6000).collect()),
            ),
        ]);
        o.put(DataElement::new(
            tags::VOILUT_SEQUENCE,
            VR::SQ,
            DicomValue::new_sequence(vec![item], dicom_core::Length::UNDEFINED),
        ));
    })
}

/// `plain` (explicit VR) with its Modality element rewritten to declare 4 GB in a small file: a
/// parser that trusted the length would allocate it before reading.
fn four_gigabyte_element(plain: &[u8]) -> Vec<u8> {
    // An element declaring 4 GB in a small file: the parser would allocate it before reading.
    let mut huge = plain.to_vec();
    let at = huge
        .windows(4)
        .position(|w| w == [0x08, 0x00, 0x60, 0x00])
        .expect("a Modality element");
    // (0008,0060) CS has a short explicit-VR header: rewritten as UN with a 4-byte length.
    huge.splice(at + 4..at + 8, [b'U', b'N', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF]);
    huge
}

/// DICOM files whose header and pixel data disagree, or that decode to nothing a model could
/// classify, each of which a reader must refuse with an error naming the file: `(kind, bytes)`.
/// `luma` is a `width × height` radiograph (at least 16 × 16) the files start from. Every kind
/// was once decoded silently into a wrong picture, or panicked inside a codec.
pub fn crafted_dicoms(width: u32, height: u32, luma: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let size = (width, height);
    let v12: Vec<i32> = luma.iter().map(|&x| to_twelve_bits(x)).collect();
    let v8: Vec<i32> = luma.iter().map(|&x| i32::from(x)).collect();
    let plain = dicom_bytes(&v12, &DicomSpec::twelve_bit(size));
    let eight = DicomSpec {
        bits: (8, 8),
        ..DicomSpec::twelve_bit(size)
    };
    let baseline = dicom_bytes(
        &v8,
        &DicomSpec {
            syntax: syntax::JPEG_BASELINE,
            ..eight.clone()
        },
    );
    let rle = dicom_bytes(
        &v8,
        &DicomSpec {
            syntax: syntax::RLE_LOSSLESS,
            ..eight.clone()
        },
    );
    let ds = |tag, v: &str| DataElement::new(tag, VR::DS, PrimitiveValue::from(v));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let rgb: Vec<u8> = luma.iter().flat_map(|&v| [v, v / 2, 255 - v]).collect();
    let mut colour_jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut colour_jpeg, 90)
        .encode(&rgb, width, height, image::ExtendedColorType::Rgb8)
        .unwrap();
    let mut cases = vec![
        (
            "DICOM: 1 sample per pixel declared, a 3-component JPEG inside",
            edit_dicom(&baseline, |o| {
                o.put(fragment(colour_jpeg));
            }),
        ),
        (
            "DICOM: RLE declaring 2 segments for 8-bit samples, holding 1",
            edit_dicom(&rle, |o| {
                let mut frame = rle_lossless(&v8.iter().map(|&v| v as u8).collect::<Vec<_>>(), 8);
                frame[0] = 2;
                let past_the_end = frame.len() as u32 + 1000;
                frame[8..12].copy_from_slice(&past_the_end.to_le_bytes());
                o.put(fragment(frame));
            }),
        ),
        (
            "DICOM: Rows and Columns 4000 around a smaller JPEG",
            edit_dicom(&baseline, |o| {
                o.put(us(tags::ROWS, 4000));
                o.put(us(tags::COLUMNS, 4000));
            }),
        ),
        (
            "DICOM: Rescale Slope 0",
            edit_dicom(&plain, |o| {
                o.put(ds(tags::RESCALE_SLOPE, "0"));
            }),
        ),
        (
            "DICOM: Rescale Slope NaN",
            edit_dicom(&plain, |o| {
                o.put(ds(tags::RESCALE_SLOPE, "NaN"));
            }),
        ),
        (
            "DICOM: Rescale Intercept inf",
            edit_dicom(&plain, |o| {
                o.put(ds(tags::RESCALE_INTERCEPT, "inf"));
            }),
        ),
        (
            "DICOM: VOI LUT declaring 65536 entries, holding 10",
            short_voi_lut(&plain),
        ),
        (
            "DICOM: all-zero pixel data",
            dicom_bytes(&vec![0; luma.len()], &DicomSpec::twelve_bit(size)),
        ),
        (
            "DICOM: PALETTE COLOR without a palette",
            dicom_bytes(
                &v8,
                &DicomSpec {
                    photometric: "PALETTE COLOR",
                    ..eight.clone()
                },
            ),
        ),
    ];
    cases.push((
        "DICOM: an element declaring 4 GB in a small file",
        four_gigabyte_element(&plain),
    ));
    cases.push((
        "DICOM: deflated data set inflating to 300 MB",
        deflated_bomb(300 << 20),
    ));
    cases
}
