//! The compressed pixel encodings a scanner writes, encoded here for the tests: lossless JPEG,
//! RLE lossless (PackBits) and baseline JPEG.

/// A lossless JPEG (ITU T.81 process 14: SOF3, one component, predictor 1, point transform 0) of
/// `samples` (row-major, `precision` bits each), with one Huffman table giving every difference
/// category 0..=16 a 5-bit code.
pub fn jpeg_lossless(samples: &[u32], width: u32, height: u32, precision: u8) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut out = vec![0xFF, 0xD8];
    // SOF3: precision, lines, samples per line, one component (id 1, 1×1 sampling, table 0).
    out.extend([0xFF, 0xC3, 0, 11, precision]);
    out.extend((height as u16).to_be_bytes());
    out.extend((width as u16).to_be_bytes());
    out.extend([1, 1, 0x11, 0]);
    // DHT: a DC table, 17 symbols of length 5.
    let mut counts = [0u8; 16];
    counts[4] = 17;
    out.extend([0xFF, 0xC4, 0, (2 + 1 + 16 + 17) as u8, 0x00]);
    out.extend(counts);
    out.extend(0..=16u8);
    // SOS: one component with table 0; Ss = predictor 1, Se = 0, Ah/Al = 0.
    out.extend([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0]);
    let mut bits = BitWriter::default();
    let modulus = 1i64 << 16;
    for y in 0..h {
        for x in 0..w {
            let v = i64::from(samples[y * w + x]);
            let prediction = match (x, y) {
                (0, 0) => 1i64 << (precision - 1),
                (0, _) => i64::from(samples[(y - 1) * w]),
                _ => i64::from(samples[y * w + x - 1]),
            };
            // The difference modulo 2^16, read as a signed 16-bit value.
            let mut diff = (v - prediction).rem_euclid(modulus);
            if diff >= 1 << 15 {
                diff -= modulus;
            }
            let category = if diff == 0 {
                0
            } else {
                64 - diff.unsigned_abs().leading_zeros()
            };
            bits.put(category, 5);
            if (1..16).contains(&category) {
                let extra = if diff > 0 { diff } else { diff - 1 };
                bits.put((extra & ((1 << category) - 1)) as u32, category);
            }
        }
    }
    out.extend(bits.finish());
    out.extend([0xFF, 0xD9]);
    out
}

/// One frame as DICOM RLE Lossless (PS3.5 annex G): a 64-byte header (segment count and offsets),
/// then one PackBits segment per byte plane, most significant plane first, each of even length.
/// `frame` holds the samples as stored (little endian when `bits_allocated` is 16).
pub fn rle_lossless(frame: &[u8], bits_allocated: u16) -> Vec<u8> {
    let planes = usize::from(bits_allocated / 8);
    let segments: Vec<Vec<u8>> = (0..planes)
        .rev()
        .map(|plane| {
            let bytes: Vec<u8> = frame.iter().skip(plane).step_by(planes).copied().collect();
            let mut segment = packbits(&bytes);
            if segment.len() % 2 == 1 {
                segment.push(0x80); // a no-op code pads the segment to an even length
            }
            segment
        })
        .collect();
    let mut header = [0u32; 16];
    header[0] = segments.len() as u32;
    let mut offset = 64u32;
    for (i, segment) in segments.iter().enumerate() {
        header[i + 1] = offset;
        offset += segment.len() as u32;
    }
    let mut out: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    for segment in segments {
        out.extend(segment);
    }
    out
}

/// PackBits: runs of 3 to 128 equal bytes as `(1 - n, byte)`, everything else as literal blocks of at
/// most 128 bytes, `(n - 1, bytes…)`.
pub(super) fn packbits(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut literal: Vec<u8> = Vec::new();
    let flush = |out: &mut Vec<u8>, literal: &mut Vec<u8>| {
        for chunk in literal.chunks(128) {
            out.push((chunk.len() - 1) as u8);
            out.extend_from_slice(chunk);
        }
        literal.clear();
    };
    let mut i = 0;
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .take(128)
            .take_while(|&&b| b == bytes[i])
            .count();
        if run >= 3 {
            flush(&mut out, &mut literal);
            out.push((1 - run as i32) as i8 as u8);
            out.push(bytes[i]);
            i += run;
        } else {
            literal.push(bytes[i]);
            i += 1;
        }
    }
    flush(&mut out, &mut literal);
    out
}

/// One 8-bit frame as a baseline JPEG (quality 95, one gray component), as JPEG Baseline DICOM
/// files carry it.
pub fn jpeg_baseline(frame: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode(frame, width, height, image::ExtendedColorType::L8)
        .expect("an 8-bit frame of the stated size encodes as JPEG");
    out
}

/// Entropy-coded bits, MSB first, with 0xFF bytes stuffed.
#[derive(Default)]
pub(super) struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, value: u32, count: u32) {
        if count == 0 {
            return;
        }
        self.acc = (self.acc << count) | u64::from(value & ((1u32 << count) - 1));
        self.n += count;
        while self.n >= 8 {
            self.n -= 8;
            let byte = (self.acc >> self.n) as u8;
            self.bytes.push(byte);
            if byte == 0xFF {
                self.bytes.push(0);
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            // Pad with ones.
            let pad = 8 - self.n;
            self.put((1 << pad) - 1, pad);
        }
        self.bytes
    }
}
