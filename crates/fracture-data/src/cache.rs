//! The on-disk cache of preprocessed 8-bit images.
//!
//! One small file per image, named by a hash of its key and holding the key itself, so a hash
//! collision or a stale entry reads as a miss. The key combines the canonical path, the file's size
//! and modification time, and [`PreprocessConfig::cache_key`](crate::PreprocessConfig::cache_key).
//! Entries are written to a temporary file and renamed, so a crash never leaves a torn entry.
//! Each entry ends with a SHA-256 of everything before it: an entry whose pixels were changed on
//! disk (zeroed, bit rot) is [`CacheRead::Corrupt`], rebuilt from its image and counted, never
//! trained on.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

const MAGIC: &[u8; 16] = b"FRACTURE-CACHE2\n";
/// Bytes of the trailing SHA-256.
const CHECKSUM_BYTES: usize = 32;

/// What reading one entry found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CacheRead {
    /// The entry, checksum verified.
    Hit(Vec<u8>),
    /// No entry for this key (absent, another key, another size, an older format).
    Miss,
    /// An entry for this key whose checksum does not match its contents.
    Corrupt,
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_BYTES] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

#[derive(Debug, Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    pub(crate) fn new(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(DiskCache {
            dir: dir.to_path_buf(),
        })
    }

    /// The key of a file under a preprocessing key, or `None` when the file cannot be stat'ed.
    pub(crate) fn key(path: &Path, preprocess_key: &str) -> Option<String> {
        let canonical = fs::canonicalize(path).ok()?;
        let meta = fs::metadata(&canonical).ok()?;
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
        Some(format!(
            "{}|{}|{}|{}",
            canonical.display(),
            meta.len(),
            mtime,
            preprocess_key
        ))
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{:016x}.fcache", fnv1a64(key.as_bytes())))
    }

    /// The cached `side × side` pixels for `key`: a hit, a miss on any mismatch or read error, or
    /// corrupt when the entry is this key's but its checksum fails.
    pub(crate) fn read(&self, key: &str, side: usize) -> CacheRead {
        let Ok(bytes) = fs::read(self.entry_path(key)) else {
            return CacheRead::Miss;
        };
        let parsed = (|| {
            let rest = bytes.strip_prefix(MAGIC.as_slice())?;
            let (len, rest) = split_u32(rest)?;
            let (stored_key, rest) = rest.split_at_checked(len as usize)?;
            (stored_key == key.as_bytes()).then_some(rest)
        })();
        let Some(rest) = parsed else {
            return CacheRead::Miss;
        };
        let body = bytes.len().saturating_sub(CHECKSUM_BYTES);
        if bytes.len() < CHECKSUM_BYTES || checksum(&bytes[..body]) != bytes[body..] {
            return CacheRead::Corrupt;
        }
        let rest = &rest[..rest.len() - CHECKSUM_BYTES];
        let sized = (|| {
            let (w, rest) = split_u32(rest)?;
            let (h, rest) = split_u32(rest)?;
            (w as usize == side && h as usize == side && rest.len() == side * side).then_some(rest)
        })();
        match sized {
            Some(pixels) => CacheRead::Hit(pixels.to_vec()),
            None => CacheRead::Miss,
        }
    }

    /// Stores `pixels` (`side × side`) under `key`, atomically.
    pub(crate) fn write(&self, key: &str, side: usize, pixels: &[u8]) -> std::io::Result<()> {
        let path = self.entry_path(key);
        let side32 = u32::try_from(side).map_err(std::io::Error::other)?;
        let key_len = u32::try_from(key.len()).map_err(std::io::Error::other)?;
        let mut buf = Vec::with_capacity(MAGIC.len() + 12 + key.len() + pixels.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&key_len.to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&side32.to_le_bytes());
        buf.extend_from_slice(&side32.to_le_bytes());
        buf.extend_from_slice(pixels);
        let sum = checksum(&buf);
        buf.extend_from_slice(&sum);
        fracture_fs::write_atomic_unsynced(&path, &buf)
    }
}

fn split_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = bytes.split_at_checked(4)?;
    Some((u32::from_le_bytes(head.try_into().ok()?), rest))
}

/// 64-bit FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fracture-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn round_trip_and_mismatches_are_misses() {
        let dir = temp_dir("rt");
        let cache = DiskCache::new(&dir).unwrap();
        let pixels: Vec<u8> = (0..16).collect();
        cache.write("k1", 4, &pixels).unwrap();
        assert_eq!(cache.read("k1", 4), CacheRead::Hit(pixels.clone()));
        assert_eq!(cache.read("k1", 3), CacheRead::Miss, "wrong side");
        assert_eq!(cache.read("k2", 4), CacheRead::Miss, "other key");
        // Pixels zeroed on disk, header intact: corrupt, not a hit of black pixels.
        let path = cache.entry_path("k1");
        let mut bytes = fs::read(&path).unwrap();
        let start = bytes.len() - CHECKSUM_BYTES - 16;
        bytes[start..start + 16].fill(0);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.read("k1", 4), CacheRead::Corrupt);
        // A torn or foreign file is a miss, not an error.
        fs::write(cache.entry_path("k1"), b"garbage").unwrap();
        assert_eq!(cache.read("k1", 4), CacheRead::Miss);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_changes_with_the_file_and_the_settings() {
        let dir = temp_dir("key");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.png");
        fs::write(&file, b"one").unwrap();
        let k1 = DiskCache::key(&file, "size=64").unwrap();
        assert_ne!(k1, DiskCache::key(&file, "size=128").unwrap());
        fs::write(&file, b"longer").unwrap();
        assert_ne!(k1, DiskCache::key(&file, "size=64").unwrap());
        assert_eq!(DiskCache::key(&dir.join("missing.png"), "x"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fnv_is_stable() {
        // Reference values of 64-bit FNV-1a from the algorithm's specification.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
