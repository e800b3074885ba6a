//! What an audit writes (`audit.json`, `duplicates.csv`, one contact sheet per cross-split group) and
//! what training does with it (`--exclude-leaks`, the training fingerprints kept with a run).

use std::path::{Path, PathBuf};

use fracture_data::audit::{AuditReport, DuplicateGroup, Known};
use fracture_data::{DecodeLimits, path_text};
use fracture_fs::AtPath;
use serde::Serialize;

use crate::outputs::spreadsheet_safe;
use crate::{Error, Result};

/// File name of the audit summary.
pub const AUDIT_JSON: &str = "audit.json";
/// File name of the duplicates table.
pub const DUPLICATES_CSV: &str = "duplicates.csv";
/// The file of an evaluation folder that lists every evaluated image with a near duplicate among
/// the model's training images ([`write_near_duplicates`]).
pub const NEAR_DUPLICATES_CSV: &str = "near-duplicates.csv";
pub use crate::layout::FINGERPRINTS_FILE;

/// The counts of an audit, as `audit.json` states them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditCounts {
    /// Images read.
    pub images: usize,
    /// Files that could not be read.
    pub unreadable: usize,
    /// Groups of byte-identical files.
    pub exact_groups: usize,
    /// Confirmed near-duplicate pairs (exact copies included).
    pub pairs: usize,
    /// Those whose images lie in different splits.
    pub cross_split_pairs: usize,
    /// Near-duplicate groups (exact copies included).
    pub groups: usize,
    /// Groups within one split.
    pub within_split_groups: usize,
    /// Groups spanning splits.
    pub cross_split_groups: usize,
    /// Groups whose members disagree on the label.
    pub label_conflicts: usize,
    /// Images that have a near duplicate in another split.
    pub images_in_cross_split_groups: usize,
}

impl AuditCounts {
    /// The counts of `report`.
    pub fn of(report: &AuditReport) -> Self {
        let cross: Vec<&DuplicateGroup> = report.cross_split_groups().collect();
        AuditCounts {
            images: report.images.len(),
            unreadable: report.unreadable.len(),
            exact_groups: report.exact_groups.len(),
            pairs: report.pairs.len(),
            cross_split_pairs: report
                .pairs
                .iter()
                .filter(|(i, j, _)| report.images[*i].split != report.images[*j].split)
                .count(),
            groups: report.groups.len(),
            within_split_groups: report.groups.len() - cross.len(),
            cross_split_groups: cross.len(),
            label_conflicts: report.label_conflicts().count(),
            images_in_cross_split_groups: cross.iter().map(|g| g.members.len()).sum(),
        }
    }
}

#[derive(Serialize)]
struct JsonMember {
    split: String,
    class: &'static str,
    path: String,
    distance: u32,
    exact: bool,
}

#[derive(Serialize)]
struct JsonGroup {
    group: usize,
    splits: Vec<String>,
    label_conflict: bool,
    members: Vec<JsonMember>,
}

#[derive(Serialize)]
struct AuditJson<'a> {
    threshold_bits: u32,
    hash_bits: u32,
    counts: AuditCounts,
    split_pairs: Vec<(String, String, usize)>,
    notes: &'a [String],
    unreadable: Vec<String>,
    groups: Vec<JsonGroup>,
}

fn members(report: &AuditReport, g: &DuplicateGroup) -> Vec<JsonMember> {
    g.members
        .iter()
        .map(|m| {
            let image = &report.images[m.image];
            JsonMember {
                split: image.split.clone(),
                class: image.label.name(),
                path: path_text(&image.path),
                distance: m.distance,
                exact: m.exact,
            }
        })
        .collect()
}

/// Writes `audit.json` (counts, split pairs, notes, unreadable files, every group),
/// `duplicates.csv` (`group,split,class,path,distance,exact`: one row per member of every group)
/// and, for the first `sheets` cross-split groups, `sheets/group-NNNN.png` (the members side by
/// side, in the CSV's order) into `dir`. Returns the files written.
pub fn write_audit(
    report: &AuditReport,
    dir: &Path,
    sheets: usize,
    limits: &DecodeLimits,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).at(dir)?;
    let write = |path: PathBuf, bytes: &[u8]| -> Result<PathBuf> {
        fracture_fs::write_atomic(&path, bytes).at(&path)?;
        Ok(path)
    };
    let groups: Vec<JsonGroup> = report
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| JsonGroup {
            group: i + 1,
            splits: g.splits.clone(),
            label_conflict: g.label_conflict,
            members: members(report, g),
        })
        .collect();
    let mut csv = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let bad = |e: csv::Error| Error::InvalidConfig(format!("cannot write the duplicates table: {e}"));
    csv.write_record(["group", "split", "class", "path", "distance", "exact"])
        .map_err(bad)?;
    for g in &groups {
        for m in &g.members {
            csv.write_record([
                g.group.to_string(),
                spreadsheet_safe(&m.split),
                m.class.to_string(),
                spreadsheet_safe(&m.path),
                m.distance.to_string(),
                m.exact.to_string(),
            ])
            .map_err(bad)?;
        }
    }
    let csv = csv
        .into_inner()
        .map_err(|e| Error::InvalidConfig(format!("cannot write the duplicates table: {e}")))?;
    let json = AuditJson {
        threshold_bits: report.threshold,
        hash_bits: fracture_data::audit::HASH_BITS,
        counts: AuditCounts::of(report),
        split_pairs: report.split_pairs(),
        notes: &report.notes,
        unreadable: report.unreadable.iter().map(|s| s.to_string()).collect(),
        groups,
    };
    let mut written = vec![
        write(
            dir.join(AUDIT_JSON),
            serde_json::to_string_pretty(&json)
                .map_err(|source| Error::Serialize {
                    what: "the audit",
                    source,
                })?
                .as_bytes(),
        )?,
        write(dir.join(DUPLICATES_CSV), &csv)?,
    ];
    let sheet_dir = dir.join("sheets");
    for (i, g) in report
        .groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.crosses_splits())
        .take(sheets)
    {
        // Each tile captioned with its split, class, hash distance to the group's first member
        // (d, in bits of the 63-bit signature; 0 = the same signature) and file name.
        let images: Vec<(fracture_data::image::GrayImage, String)> = g
            .members
            .iter()
            .filter_map(|m| {
                let image = &report.images[m.image];
                let bytes = fracture_data::read_file_limited(&image.path, limits).ok()?;
                let gray = fracture_data::decode_gray(&bytes, &image.path, limits).ok()?;
                let name = image
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let caption = format!(
                    "{} · {} · d={} · {name}",
                    image.split,
                    image.label.name(),
                    m.distance
                );
                Some((gray, caption))
            })
            .collect();
        let tiles: Vec<fracture_plot::SheetTile<'_>> = images
            .iter()
            .map(|(image, caption)| fracture_plot::SheetTile {
                image,
                truth: &[],
                evidence: None,
                peak: None,
                caption: Some(caption),
            })
            .collect();
        let png = fracture_plot::contact_sheet_png(&tiles, tiles.len().clamp(1, 6), 256)?;
        std::fs::create_dir_all(&sheet_dir).at(&sheet_dir)?;
        written.push(write(sheet_dir.join(format!("group-{:04}.png", i + 1)), &png)?);
    }
    Ok(written)
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The file name of an exported model's training fingerprints: `<stem>.fingerprints.bin` beside
/// `model` (a model file), so that two models in one folder keep their own.
pub fn fingerprints_file_for(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
    model.with_file_name(format!("{stem}.fingerprints.bin"))
}

/// The training fingerprints file of a model and its bytes: `<stem>.fingerprints.bin` beside a
/// model file, or `training-fingerprints.bin` in a run folder (or beside the model file).
/// `recorded` is the SHA-256 the model's metadata records for them
/// ([`crate::bundle::ModelMeta::training_fingerprints`]): when given, only a file with exactly that digest
/// is taken, and a candidate with another digest is an error (fingerprints of another model would
/// make a leak check report no leak). Without a recorded digest (a model from before), the first
/// candidate is taken. `Ok(None)` when there is no candidate.
pub fn training_fingerprints_file(
    model: &Path,
    recorded: Option<&str>,
) -> Result<Option<(PathBuf, Vec<u8>)>> {
    let candidates = if model.is_dir() {
        vec![model.join(FINGERPRINTS_FILE)]
    } else {
        let dir = model.parent().unwrap_or(Path::new("."));
        vec![fingerprints_file_for(model), dir.join(FINGERPRINTS_FILE)]
    };
    let mut mismatched = None;
    for path in candidates {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Io(fracture_fs::PathError::new(&path, e))),
        };
        if let Some(expected) = recorded
            && !sha256_hex(&bytes).eq_ignore_ascii_case(expected)
        {
            mismatched.get_or_insert(path);
            continue;
        }
        return Ok(Some((path, bytes)));
    }
    match mismatched {
        Some(path) => Err(Error::InvalidConfig(format!(
            "{}: these training fingerprints belong to another model (their SHA-256 is not the one {} records)",
            path.display(),
            model.display()
        ))),
        None => Ok(None),
    }
}

/// The training fingerprints of a model, parsed: see [`training_fingerprints_file`].
pub fn training_fingerprints(model: &Path, recorded: Option<&str>) -> Result<Option<(PathBuf, Vec<Known>)>> {
    match training_fingerprints_file(model, recorded)? {
        Some((path, bytes)) => {
            let fingerprints = fracture_data::audit::fingerprints_from_bytes(&bytes, &path)?;
            Ok(Some((path, fingerprints)))
        }
        None => Ok(None),
    }
}

/// Writes [`NEAR_DUPLICATES_CSV`] into `dir` (atomically): `path,distance` for each of `near` (as
/// [`near_training_images`] returns them), paths spreadsheet-safe, in the CSV dialect of
/// `duplicates.csv`. Writes nothing and returns `None` when `near` is empty.
pub fn write_near_duplicates(dir: &Path, near: &[(PathBuf, u32)]) -> Result<Option<PathBuf>> {
    if near.is_empty() {
        return Ok(None);
    }
    let bad = |e: csv::Error| Error::InvalidConfig(format!("cannot write the near-duplicates table: {e}"));
    let mut csv = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    csv.write_record(["path", "distance"]).map_err(bad)?;
    for (path, d) in near {
        csv.write_record([spreadsheet_safe(&path_text(path)), d.to_string()])
            .map_err(bad)?;
    }
    let bytes = csv.into_inner().map_err(|e| bad(e.into_error().into()))?;
    let file = dir.join(NEAR_DUPLICATES_CSV);
    fracture_fs::write_atomic(&file, &bytes).at(&file)?;
    Ok(Some(file))
}

/// Which of `files` have a near duplicate (within the default threshold) among `known` training
/// fingerprints: `(file, distance)` for each, in the order given. Unreadable files are left out.
pub fn near_training_images(
    known: &[Known],
    files: &[PathBuf],
    limits: &DecodeLimits,
) -> Vec<(PathBuf, u32)> {
    use fracture_data::audit::{DEFAULT_THRESHOLD, matches_in, readable_signatures};
    let (paths, sigs, _) = readable_signatures(files, limits);
    paths
        .into_iter()
        .zip(matches_in(known, &sigs, DEFAULT_THRESHOLD))
        .filter_map(|(p, d)| Some((p, d?)))
        .collect()
}
