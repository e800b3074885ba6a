//! Whole-file checksums, compared with what the server announced.

use std::io::Read;
use std::path::Path;

use base64::Engine;
use fracture_fs::AtPath;
use md5::{Digest, Md5};

use crate::http::Announced;
use crate::{Error, Result};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
pub(crate) struct Crc32c {
    table: [u32; 256],
    value: u32,
}

impl Crc32c {
    pub(crate) fn new() -> Self {
        let mut table = [0u32; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        Crc32c { table, value: !0 }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.value = self.table[((self.value ^ u32::from(b)) & 0xff) as usize] ^ (self.value >> 8);
        }
    }

    pub(crate) fn finish(&self) -> u32 {
        !self.value
    }
}

/// Checks `path` against every checksum in `announced`; returns which were checked.
pub(crate) fn verify(path: &Path, announced: &Announced) -> Result<Vec<&'static str>> {
    if announced.md5.is_none() && announced.crc32c.is_none() {
        return Ok(Vec::new());
    }
    let mut file = std::fs::File::open(path).at(path)?;
    let mut md5 = Md5::new();
    let mut crc = Crc32c::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        crc.update(&buf[..n]);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut checked = Vec::new();
    if let Some(expected) = &announced.md5 {
        let actual = b64.encode(md5.finalize());
        if &actual != expected {
            return Err(Error::Checksum {
                path: path.to_path_buf(),
                algorithm: "md5",
                expected: expected.clone(),
                actual,
            });
        }
        checked.push("md5");
    }
    if let Some(expected) = &announced.crc32c {
        let actual = b64.encode(crc.finish().to_be_bytes());
        if &actual != expected {
            return Err(Error::Checksum {
                path: path.to_path_buf(),
                algorithm: "crc32c",
                expected: expected.clone(),
                actual,
            });
        }
        checked.push("crc32c");
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        let mut c = Crc32c::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xE306_9283);
    }

    #[test]
    fn verify_accepts_matching_and_rejects_other_checksums() {
        let path = std::env::temp_dir().join(format!("fracture-checksum-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let good = Announced {
            md5: Some(b64.encode(Md5::digest(b"hello"))),
            crc32c: None,
        };
        assert_eq!(verify(&path, &good).unwrap(), vec!["md5"]);
        let mut crc = Crc32c::new();
        crc.update(b"hello");
        let both = Announced {
            crc32c: Some(b64.encode(crc.finish().to_be_bytes())),
            ..good
        };
        assert_eq!(verify(&path, &both).unwrap(), vec!["md5", "crc32c"]);
        let bad = Announced {
            md5: Some(b64.encode(Md5::digest(b"other"))),
            crc32c: None,
        };
        assert!(matches!(
            verify(&path, &bad),
            Err(Error::Checksum { algorithm: "md5", .. })
        ));
        assert!(verify(&path, &Announced::default()).unwrap().is_empty());
        std::fs::remove_file(&path).unwrap();
    }
}
