//! Safe extraction of a zip archive: every entry is checked before anything is written, and the
//! result appears at its destination only when complete (extracted into a temporary folder, then
//! renamed).

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};
use fracture_fs::AtPath;

/// Bounds that stop a zip bomb before it fills the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Largest total uncompressed size, in bytes.
    pub max_total_bytes: u64,
    /// Largest uncompressed size of one entry, in bytes.
    pub max_entry_bytes: u64,
    /// Largest uncompressed / compressed ratio of an entry larger than 1 MiB.
    pub max_ratio: u64,
    /// Largest number of entries.
    pub max_entries: usize,
}

impl Default for ExtractLimits {
    /// 32 GiB in total, 1 GiB per entry, ratio 100, 1,000,000 entries: far above any radiograph set.
    fn default() -> Self {
        ExtractLimits {
            max_total_bytes: 32 << 30,
            max_entry_bytes: 1 << 30,
            max_ratio: 100,
            max_entries: 1_000_000,
        }
    }
}

/// What an extraction produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
}

/// The relative path an entry may be written to, or why it may not.
fn safe_path(name: &str) -> std::result::Result<PathBuf, String> {
    if name.is_empty() || name.contains('\0') {
        return Err("an empty or NUL-containing name".into());
    }
    let normalised = name.replace('\\', "/");
    if normalised.starts_with('/') || normalised.chars().nth(1) == Some(':') {
        return Err("an absolute path".into());
    }
    let mut out = PathBuf::new();
    for part in Path::new(&normalised).components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("a `..` component (zip slip)".into()),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path".into()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("an empty path".into());
    }
    Ok(out)
}

/// Extracts `archive` into `dest` (which must not exist). Refuses, before writing anything: entries
/// with absolute paths or `..` components, symbolic links, and sizes or ratios over `limits`. The
/// CRC-32 of every entry is checked as it is read, and an entry that inflates to more than its
/// declared size is an error. On any error nothing is left at `dest`.
pub fn extract_zip(archive: &Path, dest: &Path, limits: &ExtractLimits) -> Result<Extracted> {
    let bad = |reason: String| Error::Archive {
        path: archive.to_path_buf(),
        reason,
    };
    let file = File::open(archive).at(archive)?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a readable zip archive ({e})")))?;
    if zip.len() > limits.max_entries {
        return Err(bad(format!(
            "{} entries, over the limit of {}",
            zip.len(),
            limits.max_entries
        )));
    }
    // First pass: check every entry.
    let mut plan = Vec::with_capacity(zip.len());
    let mut total = 0u64;
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| bad(format!("entry {i} is unreadable ({e})")))?;
        let name = entry
            .name()
            .map_err(|e| bad(format!("entry {i} has an unreadable name ({e})")))?
            .to_string();
        let path = safe_path(&name).map_err(|why| bad(format!("refused entry `{name}`: {why}")))?;
        if entry.is_symlink() {
            return Err(bad(format!("refused entry `{name}`: a symbolic link")));
        }
        let size = entry.size();
        if size > limits.max_entry_bytes {
            return Err(bad(format!(
                "refused entry `{name}`: {size} bytes, over the per-entry limit of {}",
                limits.max_entry_bytes
            )));
        }
        let compressed = entry.compressed_size().max(1);
        if size > (1 << 20) && size / compressed > limits.max_ratio {
            return Err(bad(format!(
                "refused entry `{name}`: compression ratio {} over the limit of {} (a zip bomb?)",
                size / compressed,
                limits.max_ratio
            )));
        }
        total = total.saturating_add(size);
        if total > limits.max_total_bytes {
            return Err(bad(format!(
                "the archive inflates to more than {} bytes",
                limits.max_total_bytes
            )));
        }
        plan.push((i, path, entry.is_dir(), size));
    }
    // Second pass: write into a temporary sibling, then rename.
    let tmp = dest.with_file_name(format!(
        ".{}.extracting-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("dataset"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<Extracted> {
        std::fs::create_dir_all(&tmp).at(&tmp)?;
        let mut stats = Extracted { files: 0, bytes: 0 };
        for (i, rel, is_dir, size) in plan {
            let target = tmp.join(&rel);
            if is_dir {
                std::fs::create_dir_all(&target).at(&target)?;
                continue;
            }
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).at(parent)?;
            }
            let entry = zip
                .by_index(i)
                .map_err(|e| bad(format!("entry `{}` is unreadable ({e})", rel.display())))?;
            let mut out = File::create(&target).at(&target)?;
            // One byte more than declared is allowed through so that a lying size is detected.
            let written = std::io::copy(&mut entry.take(size + 1), &mut out)
                .map_err(|e| bad(format!("entry `{}` is corrupt ({e})", rel.display())))?;
            if written != size {
                return Err(bad(format!(
                    "entry `{}` inflates to {written} bytes, not the declared {size}",
                    rel.display()
                )));
            }
            stats.files += 1;
            stats.bytes += written;
        }
        Ok(stats)
    })();
    match result {
        Ok(stats) => {
            std::fs::rename(&tmp, dest).at(dest)?;
            Ok(stats)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused() {
        assert_eq!(safe_path("a/b/c.jpg").unwrap(), PathBuf::from("a/b/c.jpg"));
        assert_eq!(safe_path("./a/./b.jpg").unwrap(), PathBuf::from("a/b.jpg"));
        for bad in [
            "../x",
            "a/../../x",
            "a/../b",
            "/etc/passwd",
            "\\\\server\\x",
            "C:\\x",
            "C:/x",
            "",
            "a\0b",
        ] {
            assert!(safe_path(bad).is_err(), "{bad:?}");
        }
    }
}
