//! Leakage and near-duplicate audit of a dataset: which images are copies of each other, within a
//! split and — what matters most — across splits, and which copies carry different labels.
//!
//! Each image gets a [`Signature`]: the SHA-256 of its bytes (exact copies) and a 63-bit perceptual
//! hash of its central view ([`signature`]), with probes that undo what augmentation and re-export
//! do (flips, quarter turns, rotations up to ±10° with their crop, crops up to a fifth; resizing,
//! JPEG re-encoding, brightness, contrast and gamma barely move the hash). Two images are near
//! duplicates when a probe of one lies within the threshold ([`DEFAULT_THRESHOLD`] bits) of the
//! other's fingerprint, found through a multi-index hash ([`FingerprintIndex`]) rather than by
//! comparing every pair, and the 255-bit detail hash of the matching view confirms it
//! ([`DETAIL_THRESHOLD`]). Confirmed pairs are kept ([`AuditReport::pairs`]) and gathered into
//! groups around the images with the most duplicates, so that a chain of look-alikes never
//! becomes one giant group.
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

use fracture_fs::AtPath;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use index::{FingerprintIndex, MAX_RADIUS, Match, candidates};
pub use signature::{
    DETAIL_BITS, Detail, HASH_BITS, Signature, THUMBNAIL_SIDE, detail_distance, hamming, signature,
    signature_of_image,
};

use crate::{DatasetLayout, DecodeLimits, Label, Skipped, Split, read_file_limited};

/// The default near-duplicate threshold: at most this many of the 63 hash bits differ. Measured on
/// FracAtlas radiographs with planted copies (README, "Auditing a dataset").
pub const DEFAULT_THRESHOLD: u32 = 5;

/// A match by the 63-bit hash is confirmed when the matching probe's 255-bit detail hash differs
/// from the other image's in at most this many bits. Distinct radiographs that pass the coarse test
/// differ in 38 or more; planted copies mostly in under 30.
pub const DETAIL_THRESHOLD: u32 = 36;

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
    /// Hash distance to the group's first member, its centre (0 for the centre itself; a member
    /// joined through another member can be further than the threshold).
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
    /// Every confirmed near-duplicate pair `(i, j, distance)`, `i < j`, sorted.
    pub pairs: Vec<(usize, usize, u32)>,
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
            .pairs
            .iter()
            .filter(|(i, j, _)| self.images[*i].split != self.images[*j].split)
            .flat_map(|&(i, j, _)| [i, j])
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
                .at(root)?
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

/// Signatures of `files`, in parallel, in the order given; an unreadable file becomes an error
/// entry naming it.
pub fn signatures<P: AsRef<Path> + Sync>(
    files: &[P],
    limits: &DecodeLimits,
) -> Vec<Result<Signature, Skipped>> {
    files
        .par_iter()
        .map(|file| {
            let path = file.as_ref();
            read_file_limited(path, limits)
                .and_then(|bytes| signature(&bytes, path, limits))
                .map_err(|e| Skipped {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// The readable ones among `items` with their signatures (in the order given), and the unreadable
/// files with the reason.
pub fn readable_signatures<T: AsRef<Path> + Clone + Sync>(
    items: &[T],
    limits: &DecodeLimits,
) -> (Vec<T>, Vec<Signature>, Vec<Skipped>) {
    let mut readable = Vec::with_capacity(items.len());
    let mut signed = Vec::with_capacity(items.len());
    let mut unreadable = Vec::new();
    for (item, sig) in items.iter().zip(signatures(items, limits)) {
        match sig {
            Ok(sig) => {
                readable.push(item.clone());
                signed.push(sig);
            }
            Err(skipped) => unreadable.push(skipped),
        }
    }
    (readable, signed, unreadable)
}

impl AsRef<Path> for AuditImage {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Audits `images`: signatures, exact and near duplicates, groups. Unreadable files are reported in
/// [`AuditReport::unreadable`], never fatal.
pub fn audit_images(images: Vec<AuditImage>, options: &AuditOptions) -> AuditReport {
    let (readable, signed, unreadable) = readable_signatures(&images, &options.limits);
    let mut report = group(readable, &signed, options.threshold);
    report.unreadable = unreadable;
    report
}

/// The confirmed near-duplicate pairs among `signatures`: `(i, j, distance)`, `i < j`, sorted; the
/// distance is the smaller 63-bit one of the two directions that confirmed the pair.
pub fn confirmed_pairs(signatures: &[Signature], threshold: u32) -> Vec<(usize, usize, u32)> {
    let fingerprints: Vec<u64> = signatures.iter().map(|s| s.fingerprint).collect();
    let probes: Vec<&[u64]> = signatures.iter().map(|s| s.probes.as_slice()).collect();
    let mut pairs: Vec<(usize, usize, u32)> = candidates(&fingerprints, &probes, threshold.min(MAX_RADIUS))
        .into_iter()
        .filter(|(i, m)| {
            let query = &signatures[*i as usize];
            detail_distance(
                &query.probe_detail(m.probe as usize),
                &signatures[m.target as usize].detail,
            ) <= DETAIL_THRESHOLD
        })
        .map(|(i, m)| {
            let (i, j) = (i as usize, m.target as usize);
            (i.min(j), i.max(j), m.distance)
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup_by(|later, earlier| {
        if (later.0, later.1) == (earlier.0, earlier.1) {
            earlier.2 = earlier.2.min(later.2);
            true
        } else {
            false
        }
    });
    pairs
}

/// Groups images by their signatures (`signatures[i]` belongs to `images[i]`): byte-identical files
/// and confirmed near-duplicate pairs. An image with the most duplicates not yet grouped becomes a
/// group's centre with its duplicates; an image left over whose duplicates are all grouped joins
/// the group of its nearest one.
pub fn group(images: Vec<AuditImage>, signatures: &[Signature], threshold: u32) -> AuditReport {
    let threshold = threshold.min(MAX_RADIUS);
    let n = images.len();
    let fingerprints: Vec<u64> = signatures.iter().map(|s| s.fingerprint).collect();
    let mut pairs = confirmed_pairs(signatures, threshold);
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
        for (k, &a) in members.iter().enumerate() {
            exact[a] = true;
            for &b in &members[k + 1..] {
                pairs.push((a.min(b), a.max(b), 0));
            }
        }
        exact_groups.push(members);
    }
    pairs.sort_unstable();
    pairs.dedup_by(|later, earlier| (later.0, later.1) == (earlier.0, earlier.1));
    let mut neighbours: Vec<Vec<(usize, u32)>> = vec![Vec::new(); n];
    for &(i, j, d) in &pairs {
        neighbours[i].push((j, d));
        neighbours[j].push((i, d));
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| !neighbours[i].is_empty()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(neighbours[i].len()), i));
    let mut group_of: Vec<Option<usize>> = vec![None; n];
    let mut members_of: Vec<Vec<(usize, u32)>> = Vec::new();
    for &centre in &order {
        if group_of[centre].is_some() {
            continue;
        }
        let free: Vec<(usize, u32)> = neighbours[centre]
            .iter()
            .copied()
            .filter(|(j, _)| group_of[*j].is_none())
            .collect();
        if free.is_empty() {
            continue;
        }
        let g = members_of.len();
        group_of[centre] = Some(g);
        let mut members = vec![(centre, 0)];
        for (j, d) in free {
            group_of[j] = Some(g);
            members.push((j, d));
        }
        members_of.push(members);
    }
    for &i in &order {
        if group_of[i].is_none()
            && let Some(&(j, d)) = neighbours[i].iter().min_by_key(|(j, d)| (*d, *j))
            && let Some(g) = group_of[j]
        {
            group_of[i] = Some(g);
            let via = members_of[g]
                .iter()
                .find(|(m, _)| *m == j)
                .map_or(0, |(_, dj)| *dj);
            members_of[g].push((i, via + d));
        }
    }
    let mut groups: Vec<DuplicateGroup> = members_of
        .into_iter()
        .map(|members| {
            let centre = members[0].0;
            let mut rest = members[1..].to_vec();
            rest.sort_by(|&(a, _), &(b, _)| {
                (&images[a].split, &images[a].path).cmp(&(&images[b].split, &images[b].path))
            });
            let members_out: Vec<GroupMember> = std::iter::once(members[0])
                .chain(rest)
                .map(|(m, distance)| GroupMember {
                    image: m,
                    distance: if m == centre { 0 } else { distance },
                    exact: exact[m],
                })
                .collect();
            let splits: BTreeSet<String> = members_out
                .iter()
                .map(|m| images[m.image].split.clone())
                .collect();
            let labels: BTreeSet<Label> = members_out.iter().map(|m| images[m.image].label).collect();
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
        pairs,
        groups,
        notes: Vec::new(),
    }
}

/// What a fingerprint file keeps of an image: its fingerprint and its detail hash.
pub type Known = (u64, Detail);

/// The magic line that opens a fingerprint file.
const FINGERPRINT_MAGIC: &[u8; 8] = b"FRFP2\n\0\0";
/// Bytes per entry: the fingerprint and the detail hash.
const ENTRY_BYTES: usize = 40;

/// A compact list of image fingerprints (a model's training images, say): 8 bytes of magic, then
/// per image its fingerprint and detail hash as five little-endian u64. No image and no path is
/// stored.
pub fn fingerprints_to_bytes(signatures: &[Known]) -> Vec<u8> {
    let mut out = FINGERPRINT_MAGIC.to_vec();
    for (f, d) in signatures {
        out.extend(f.to_le_bytes());
        for word in d {
            out.extend(word.to_le_bytes());
        }
    }
    out
}

/// Reads what [`fingerprints_to_bytes`] wrote; `origin` names the file in errors.
pub fn fingerprints_from_bytes(bytes: &[u8], origin: &Path) -> crate::Result<Vec<Known>> {
    let bad = |reason: &str| crate::Error::Layout(format!("{}: {reason}", origin.display()));
    let Some(body) = bytes.strip_prefix(FINGERPRINT_MAGIC.as_slice()) else {
        return Err(bad("not a fingerprint file (no FRFP2 magic)"));
    };
    if body.len() % ENTRY_BYTES != 0 {
        return Err(bad(
            "truncated fingerprint file (not a whole number of 40-byte entries)",
        ));
    }
    let word = |c: &[u8], k: usize| u64::from_le_bytes(c[8 * k..8 * k + 8].try_into().unwrap_or_default());
    Ok(body
        .chunks_exact(ENTRY_BYTES)
        .map(|c| (word(c, 0), [word(c, 1), word(c, 2), word(c, 3), word(c, 4)]))
        .collect())
}

/// For each of `signatures`, the smallest distance to one of `known` (fingerprints with their
/// detail hashes) within `threshold` and confirmed by the detail hash, or `None`: which images (of
/// a test set, say) have near duplicates among `known` (a model's training images).
pub fn matches_in(known: &[Known], signatures: &[Signature], threshold: u32) -> Vec<Option<u32>> {
    let fingerprints: Vec<u64> = known.iter().map(|k| k.0).collect();
    let index = FingerprintIndex::new(&fingerprints);
    signatures
        .par_iter()
        .map_init(Vec::new, |seen, s| {
            index
                .query(&s.probes, threshold, seen)
                .into_iter()
                .filter(|m| {
                    detail_distance(&s.probe_detail(m.probe as usize), &known[m.target as usize].1)
                        <= DETAIL_THRESHOLD
                })
                .map(|m| m.distance)
                .min()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_files_round_trip_and_refuse_other_bytes() {
        let f = vec![(1u64, [2, 3, 4, 5]), (u64::MAX, [0, 0, 0, u64::MAX])];
        let bytes = fingerprints_to_bytes(&f);
        assert_eq!(fingerprints_from_bytes(&bytes, Path::new("f")).unwrap(), f);
        let err = fingerprints_from_bytes(&bytes[..bytes.len() - 3], Path::new("run/f.bin")).unwrap_err();
        assert!(err.to_string().contains("run/f.bin") && err.to_string().contains("truncated"));
        assert!(fingerprints_from_bytes(b"hello", Path::new("f")).is_err());
    }

    #[test]
    fn groups_gather_around_centres_and_flag_splits_and_labels() {
        let sig = |f: u64| Signature {
            sha256: [0; 32],
            fingerprint: f,
            detail: [0; 4],
            probes: vec![f],
            view_details: vec![[0; 4]],
        };
        let images = vec![
            AuditImage::new("a", "train", Label::Fractured),
            AuditImage::new("b", "val", Label::NotFractured),
            AuditImage::new("c", "train", Label::Fractured),
            AuditImage::new("d", "train", Label::Fractured),
            AuditImage::new("e", "test", Label::Fractured),
        ];
        // A chain a – b – c – e (3 bits a step): b, with two duplicates, is a centre; e joins c's
        // group through c; d is far from all.
        let sigs = vec![
            sig(0),
            sig(0b111),
            sig(0b111_111),
            sig(u64::MAX),
            sig(0b111_111_111),
        ];
        let report = group(images, &sigs, 3);
        assert_eq!(report.pairs, vec![(0, 1, 3), (1, 2, 3), (2, 4, 3)]);
        assert_eq!(report.groups.len(), 1);
        let g = &report.groups[0];
        assert!(g.crosses_splits() && g.label_conflict);
        let ids: Vec<usize> = g.members.iter().map(|m| m.image).collect();
        assert_eq!(ids, vec![1, 4, 0, 2], "centre first, then by split and path");
        assert_eq!(g.members[1].distance, 6, "joined through a member");
        assert_eq!(report.leaked_from("val"), vec![1]);
        assert_eq!(report.leaked_from("train"), vec![0, 2]);
        assert_eq!(
            report.split_pairs(),
            vec![
                ("test".into(), "train".into(), 1),
                ("test".into(), "val".into(), 1),
                ("train".into(), "val".into(), 1)
            ]
        );
    }
}
