//! Leakage and near-duplicate audit of a dataset: which images are copies of each other, within a
//! split and — what matters most — across splits, and which copies carry different labels.
//!
//! Each image gets a [`Signature`]: the SHA-256 of its bytes (exact copies) and a 63-bit perceptual
//! hash of its central view ([`signature`]), with probes that undo what augmentation and re-export
//! do (flips, quarter turns, rotations up to ±10° with their crop, crops up to a fifth; resizing,
//! JPEG re-encoding, brightness, contrast and gamma barely move the hash). Two images are near
//! duplicates when a probe of one lies within the threshold ([`DEFAULT_THRESHOLD`] bits) of the
//! other's fingerprint, found through a multi-index hash ([`FingerprintIndex`]) rather than by
//! comparing every pair; near-duplicate pairs are joined into groups (connected components).
//!
//! ```
//! use fracture_data::audit::{AuditImage, AuditOptions, audit_images};
//! # let dir = tempfile_dir();
//! # fn tempfile_dir() -> std::path::PathBuf {
//! #     let d = std::env::temp_dir().join(format!("fracture-audit-doc-{}", std::process::id()));
//! #     std::fs::create_dir_all(&d).unwrap();
//! #     let img = image::GrayImage::from_fn(64, 64, |x, y| image::Luma([((x * x + 3 * y) % 256) as u8]));
//! #     img.save(d.join("a.png")).unwrap();
//! #     image::imageops::flip_horizontal(&img).save(d.join("b.png")).unwrap();
//! #     d
//! # }
//! let images = vec![
//!     AuditImage::new(dir.join("a.png"), "train", fracture_data::Label::Fractured),
//!     AuditImage::new(dir.join("b.png"), "val", fracture_data::Label::Fractured),
//! ];
//! let report = audit_images(images, &AuditOptions::default());
//! assert_eq!(report.cross_split_groups().count(), 1); // b.png is a's mirror image
//! ```

mod index;
mod signature;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use index::{FingerprintIndex, MAX_RADIUS, near_pairs};
pub use signature::{HASH_BITS, Signature, THUMBNAIL_SIDE, hamming, signature, signature_of_image};

use crate::{DatasetLayout, DecodeLimits, Label, Skipped, Split, read_file_limited};

/// The default near-duplicate threshold: at most this many of the 63 hash bits differ. Measured on
/// FracAtlas radiographs with planted copies (README, "Auditing a dataset").
pub const DEFAULT_THRESHOLD: u32 = 5;

/// One image to audit: its file, the split (or other set) it belongs to, and its label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditImage {
    /// The file.
    pub path: PathBuf,
    /// `train`, `val`, `test`, or another set name (an extra training folder).
    pub split: String,
    /// Its class.
    pub label: Label,
}

impl AuditImage {
    /// An image of `split` labelled `label`.
    pub fn new(path: impl Into<PathBuf>, split: impl Into<String>, label: Label) -> Self {
        AuditImage {
            path: path.into(),
            split: split.into(),
            label,
        }
    }
}

/// How an audit runs.
#[derive(Debug, Clone, Copy)]
pub struct AuditOptions {
    /// Near duplicates differ in at most this many hash bits (at most [`MAX_RADIUS`]).
    pub threshold: u32,
    /// Limits on the files read.
    pub limits: DecodeLimits,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            threshold: DEFAULT_THRESHOLD,
            limits: DecodeLimits::default(),
        }
    }
}

/// One member of a [`DuplicateGroup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// Position in [`AuditReport::images`].
    pub image: usize,
    /// Hash distance to the group's first member (0 for the first; a chain of near duplicates can
    /// put a member further than the threshold from the first).
    pub distance: u32,
    /// Whether its bytes equal another member's.
    pub exact: bool,
}

/// Images that are copies of each other (connected by near-duplicate pairs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateGroup {
    /// The members, sorted by split, then path.
    pub members: Vec<GroupMember>,
    /// The splits its members belong to, sorted.
    pub splits: Vec<String>,
    /// Whether members carry different labels.
    pub label_conflict: bool,
}

impl DuplicateGroup {
    /// Whether the group spans more than one split: a leak.
    pub fn crosses_splits(&self) -> bool {
        self.splits.len() > 1
    }
}

/// What an audit found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditReport {
    /// Every image that was read, in the order given (less the unreadable ones).
    pub images: Vec<AuditImage>,
    /// Each readable image's fingerprint, by position.
    pub fingerprints: Vec<u64>,
    /// Files that could not be read or decoded, and why.
    pub unreadable: Vec<Skipped>,
    /// The threshold used.
    pub threshold: u32,
    /// Groups of byte-identical files (positions), each sorted.
    pub exact_groups: Vec<Vec<usize>>,
    /// Near-duplicate groups, cross-split groups first, then by size.
    pub groups: Vec<DuplicateGroup>,
    /// Things the caller should know (one split only, an empty class, …).
    pub notes: Vec<String>,
}

impl AuditReport {
    /// The groups that span splits.
    pub fn cross_split_groups(&self) -> impl Iterator<Item = &DuplicateGroup> {
        self.groups.iter().filter(|g| g.crosses_splits())
    }

    /// The groups whose members disagree on the label.
    pub fn label_conflicts(&self) -> impl Iterator<Item = &DuplicateGroup> {
        self.groups.iter().filter(|g| g.label_conflict)
    }

    /// Images of `split` that have a near duplicate in another split (positions, sorted).
    pub fn leaked_from(&self, split: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .cross_split_groups()
            .flat_map(|g| g.members.iter().map(|m| m.image))
            .filter(|&i| self.images[i].split == split)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Per pair of splits (`a ↔ b`, names sorted), how many cross-split groups join them.
    pub fn split_pairs(&self) -> Vec<(String, String, usize)> {
        let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for g in self.cross_split_groups() {
            for (i, a) in g.splits.iter().enumerate() {
                for b in &g.splits[i + 1..] {
                    *counts.entry((a.clone(), b.clone())).or_default() += 1;
                }
            }
        }
        counts.into_iter().map(|((a, b), n)| (a, b, n)).collect()
    }
}

/// The images of a dataset folder for an audit: `<root>/<split>/<class>/*` as
/// [`DatasetLayout::discover`] finds them; where that refuses the tree (a split without one of the
/// classes, say), every split folder that holds images is taken as it is, and the reason becomes a
/// note. The second value lists the skipped entries, the third the notes.
pub fn collect_dataset(root: &Path) -> crate::Result<(Vec<AuditImage>, Vec<Skipped>, Vec<String>)> {
    let mut notes = Vec::new();
    let (splits, skipped) = match DatasetLayout::discover(root) {
        Ok(layout) => {
            let splits: Vec<(String, Vec<crate::Item>)> = layout
                .splits
                .iter()
                .map(|(s, items)| (s.name().to_string(), items.clone()))
                .collect();
            (splits, layout.skipped)
        }
        Err(e @ (crate::Error::EmptyClass { .. } | crate::Error::NoClassFolders { .. })) => {
            notes.push(format!("{e}; auditing the split folders as they are"));
            let mut splits = Vec::new();
            let mut skipped = Vec::new();
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
                .map_err(|source| crate::Error::Io {
                    path: root.to_path_buf(),
                    source,
                })?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for dir in dirs {
                let Some(split) = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(Split::from_dir_name)
                else {
                    continue;
                };
                match crate::discover_labelled_images(&dir) {
                    Ok((items, s)) => {
                        splits.push((split.name().to_string(), items));
                        skipped.extend(s);
                    }
                    Err(e) => notes.push(e.to_string()),
                }
            }
            (splits, skipped)
        }
        Err(e) => return Err(e),
    };
    if splits.len() < 2 {
        notes.push(format!(
            "{}: only {} split: duplicates within it are reported, leaks between splits cannot be",
            root.display(),
            splits.first().map_or("no", |(s, _)| s.as_str())
        ));
    }
    let images = splits
        .into_iter()
        .flat_map(|(split, items)| {
            items
                .into_iter()
                .map(move |item| AuditImage::new(item.path, split.clone(), item.label))
        })
        .collect();
    Ok((images, skipped, notes))
}

/// Signatures of `images`, in parallel; an unreadable file becomes an error entry naming it.
pub fn signatures(images: &[AuditImage], limits: &DecodeLimits) -> Vec<Result<Signature, Skipped>> {
    images
        .par_iter()
        .map(|image| {
            read_file_limited(&image.path, limits)
                .and_then(|bytes| signature(&bytes, &image.path, limits))
                .map_err(|e| Skipped {
                    path: image.path.clone(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// Audits `images`: signatures, exact and near duplicates, groups. Unreadable files are reported in
/// [`AuditReport::unreadable`], never fatal.
pub fn audit_images(images: Vec<AuditImage>, options: &AuditOptions) -> AuditReport {
    let mut readable = Vec::with_capacity(images.len());
    let mut signatures_ok = Vec::with_capacity(images.len());
    let mut unreadable = Vec::new();
    for (image, sig) in images.iter().zip(signatures(&images, &options.limits)) {
        match sig {
            Ok(sig) => {
                readable.push(image.clone());
                signatures_ok.push(sig);
            }
            Err(skipped) => unreadable.push(skipped),
        }
    }
    let mut report = group(readable, &signatures_ok, options.threshold);
    report.unreadable = unreadable;
    report
}

/// Groups images by their signatures (`signatures[i]` belongs to `images[i]`).
pub fn group(images: Vec<AuditImage>, signatures: &[Signature], threshold: u32) -> AuditReport {
    let threshold = threshold.min(MAX_RADIUS);
    let n = images.len();
    let fingerprints: Vec<u64> = signatures.iter().map(|s| s.fingerprint).collect();
    let probes: Vec<Vec<u64>> = signatures.iter().map(|s| s.probes.clone()).collect();
    let mut sets = DisjointSets::new(n);
    for (i, j, _) in near_pairs(&fingerprints, &probes, threshold) {
        sets.join(i as usize, j as usize);
    }
    // Exact copies: equal SHA-256 (a zero hash means none was taken).
    let mut by_hash: Vec<(usize, [u8; 32])> = signatures
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sha256 != [0; 32])
        .map(|(i, s)| (i, s.sha256))
        .collect();
    by_hash.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut exact_groups = Vec::new();
    let mut exact = vec![false; n];
    for run in by_hash.chunk_by(|a, b| a.1 == b.1).filter(|r| r.len() > 1) {
        let members: Vec<usize> = run.iter().map(|(i, _)| *i).collect();
        for w in members.windows(2) {
            sets.join(w[0], w[1]);
        }
        for &m in &members {
            exact[m] = true;
        }
        exact_groups.push(members);
    }
    let mut components: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for i in 0..n {
        components.entry(sets.root(i)).or_default().push(i);
    }
    let mut groups: Vec<DuplicateGroup> = components
        .into_values()
        .filter(|members| members.len() > 1)
        .map(|mut members| {
            members.sort_by(|&a, &b| {
                (&images[a].split, &images[a].path).cmp(&(&images[b].split, &images[b].path))
            });
            let first = &signatures[members[0]];
            let members_out = members
                .iter()
                .map(|&m| {
                    let other = &signatures[m];
                    let forward = first.probes.iter().map(|&p| hamming(p, other.fingerprint)).min();
                    let backward = other.probes.iter().map(|&p| hamming(p, first.fingerprint)).min();
                    GroupMember {
                        image: m,
                        distance: forward.into_iter().chain(backward).min().unwrap_or(0),
                        exact: exact[m],
                    }
                })
                .collect();
            let splits: BTreeSet<String> = members.iter().map(|&m| images[m].split.clone()).collect();
            let labels: BTreeSet<Label> = members.iter().map(|&m| images[m].label).collect();
            DuplicateGroup {
                members: members_out,
                splits: splits.into_iter().collect(),
                label_conflict: labels.len() > 1,
            }
        })
        .collect();
    groups.sort_by_key(|g| (!g.crosses_splits(), std::cmp::Reverse(g.members.len())));
    AuditReport {
        images,
        fingerprints,
        unreadable: Vec::new(),
        threshold,
        exact_groups,
        groups,
        notes: Vec::new(),
    }
}

/// Union-find with path halving.
struct DisjointSets(Vec<usize>);

impl DisjointSets {
    fn new(n: usize) -> Self {
        DisjointSets((0..n).collect())
    }

    fn root(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }

    fn join(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra != rb {
            self.0[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// The magic line that opens a fingerprint file.
const FINGERPRINT_MAGIC: &[u8; 8] = b"FRFP1\n\0\0";

/// A compact list of fingerprints (a model's training images, say): 8 bytes of magic, then each
/// fingerprint as 8 little-endian bytes. No image and no path is stored.
pub fn fingerprints_to_bytes(fingerprints: &[u64]) -> Vec<u8> {
    let mut out = FINGERPRINT_MAGIC.to_vec();
    for f in fingerprints {
        out.extend(f.to_le_bytes());
    }
    out
}

/// Reads what [`fingerprints_to_bytes`] wrote; `origin` names the file in errors.
pub fn fingerprints_from_bytes(bytes: &[u8], origin: &Path) -> crate::Result<Vec<u64>> {
    let bad = |reason: &str| crate::Error::Layout(format!("{}: {reason}", origin.display()));
    let Some(body) = bytes.strip_prefix(FINGERPRINT_MAGIC.as_slice()) else {
        return Err(bad("not a fingerprint file (no FRFP1 magic)"));
    };
    if body.len() % 8 != 0 {
        return Err(bad(
            "truncated fingerprint file (not a whole number of 8-byte entries)",
        ));
    }
    Ok(body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// For each of `signatures`, the smallest distance to any of `known` within `threshold`, or `None`:
/// which images (of a test set, say) have near duplicates among `known` (a model's training images).
pub fn matches_in(known: &[u64], signatures: &[Signature], threshold: u32) -> Vec<Option<u32>> {
    let index = FingerprintIndex::new(known);
    signatures
        .par_iter()
        .map_init(Vec::new, |seen, s| {
            index
                .query(&s.probes, threshold, seen)
                .into_iter()
                .map(|(_, d)| d)
                .min()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_files_round_trip_and_refuse_other_bytes() {
        let f = vec![1u64, u64::MAX, 0x1234_5678_9abc];
        let bytes = fingerprints_to_bytes(&f);
        assert_eq!(fingerprints_from_bytes(&bytes, Path::new("f")).unwrap(), f);
        let err = fingerprints_from_bytes(&bytes[..bytes.len() - 3], Path::new("run/f.bin")).unwrap_err();
        assert!(err.to_string().contains("run/f.bin") && err.to_string().contains("truncated"));
        assert!(fingerprints_from_bytes(b"hello", Path::new("f")).is_err());
    }

    #[test]
    fn groups_join_chains_and_flag_splits_and_labels() {
        let sig = |f: u64| Signature {
            sha256: [0; 32],
            fingerprint: f,
            probes: vec![f],
        };
        let images = vec![
            AuditImage::new("a", "train", Label::Fractured),
            AuditImage::new("b", "val", Label::NotFractured),
            AuditImage::new("c", "train", Label::Fractured),
            AuditImage::new("d", "train", Label::Fractured),
        ];
        // a–b 3 bits apart, b–c 3 more: one group by the chain; d far from all.
        let sigs = vec![sig(0), sig(0b111), sig(0b111_111), sig(u64::MAX)];
        let report = group(images, &sigs, 3);
        assert_eq!(report.groups.len(), 1);
        let g = &report.groups[0];
        assert!(g.crosses_splits() && g.label_conflict);
        assert_eq!(
            g.members.iter().map(|m| m.image).collect::<Vec<_>>(),
            vec![0, 2, 1]
        );
        assert_eq!(
            g.members[1].distance, 6,
            "a chain member is further than the threshold"
        );
        assert_eq!(report.leaked_from("val"), vec![1]);
        assert_eq!(report.split_pairs(), vec![("train".into(), "val".into(), 1)]);
    }
}
