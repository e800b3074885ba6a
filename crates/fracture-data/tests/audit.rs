//! The leakage audit on real radiographs: copies planted across splits as augmentation and
//! re-export make them are found, and distinct radiographs (including each planted original's most
//! similar other radiograph, the hardest negative) are not joined.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fracture_data::audit::{AuditOptions, audit_images, collect_dataset};
use fracture_data::{DecodeLimits, Label, PreprocessConfig, decode_gray};
use fracture_testkit::copies::{CopyKind, png};

const SPLITS: [&str; 3] = ["train", "val", "test"];

/// Every 6th FracAtlas radiograph (train and val), with its label.
fn pool(root: &Path) -> Vec<(PathBuf, Label)> {
    let mut files = Vec::new();
    for split in ["train", "val"] {
        for (class, label) in [
            ("fractured", Label::Fractured),
            ("not fractured", Label::NotFractured),
        ] {
            for entry in std::fs::read_dir(root.join(split).join(class)).unwrap() {
                files.push((entry.unwrap().path(), label));
            }
        }
    }
    files.sort();
    files.into_iter().step_by(6).collect()
}

fn class_dir(label: Label) -> &'static str {
    match label {
        Label::Fractured => "fractured",
        Label::NotFractured => "not fractured",
    }
}

#[test]
#[ignore = "needs the FracAtlas radiographs at ../shared/data/fracatlas; `cargo test -- --include-ignored` runs it"]
fn planted_copies_are_found_and_distinct_radiographs_are_not_joined() {
    let root = fracture_testkit::fracatlas();
    let pool = pool(&root);
    let limits = DecodeLimits::default();
    let grays: Vec<image::GrayImage> = pool
        .iter()
        .map(|(p, _)| decode_gray(&std::fs::read(p).unwrap(), p, &limits).unwrap())
        .collect();
    let originals = 150;
    let planted = 36;
    // Each planted original's most similar other radiograph (32 × 32 thumbnails, squared
    // difference) among the rest of the pool: distinct, usually the same region and view.
    let thumbs: Vec<Vec<f32>> = grays
        .iter()
        .map(|g| {
            PreprocessConfig::with_size(32)
                .resize(g)
                .unwrap()
                .iter()
                .map(|&v| f32::from(v))
                .collect()
        })
        .collect();
    let nearest = |i: usize| -> usize {
        (originals..pool.len())
            .min_by(|&a, &b| {
                let d = |j: usize| {
                    thumbs[i]
                        .iter()
                        .zip(&thumbs[j])
                        .map(|(x, y)| (x - y) * (x - y))
                        .sum::<f32>()
                };
                d(a).total_cmp(&d(b))
            })
            .unwrap()
    };

    let dir = fracture_testkit::fresh_dir(&std::env::temp_dir().join("fracture-audit-test"), "planted");
    let write = |split: &str, label: Label, name: &str, bytes: &[u8]| -> PathBuf {
        let folder = dir.join(split).join(class_dir(label));
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.canonicalize().unwrap()
    };
    // Distinct radiographs: the originals, and the hard negatives of the planted ones.
    let mut distinct: Vec<PathBuf> = Vec::new();
    let mut copies: Vec<(PathBuf, PathBuf, String)> = Vec::new(); // (copy, original, kind)
    let mut hard_pairs: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut used_negatives = std::collections::HashSet::new();
    for i in 0..originals {
        let (source, label) = &pool[i];
        let name = source.file_name().unwrap().to_str().unwrap().to_string();
        let original = write(SPLITS[i % 3], *label, &name, &std::fs::read(source).unwrap());
        distinct.push(original.clone());
        if i >= planted {
            continue;
        }
        for kind in CopyKind::PLANTED {
            let ext = if matches!(kind, CopyKind::Jpeg(_)) {
                "jpg"
            } else {
                "png"
            };
            let copy_name = format!("{}-{}.{ext}", name.trim_end_matches(".jpg"), kind.name());
            let copy = write(SPLITS[(i + 1) % 3], *label, &copy_name, &kind.apply(&grays[i]));
            copies.push((copy, original.clone(), kind.name()));
        }
        let n = nearest(i);
        if used_negatives.insert(n) {
            let (source, label) = &pool[n];
            let negative = write(
                SPLITS[(i + 2) % 3],
                *label,
                &format!("hard-{}", source.file_name().unwrap().to_str().unwrap()),
                &png(&grays[n]),
            );
            distinct.push(negative.clone());
            hard_pairs.push((original, negative));
        }
    }

    let (images, skipped, notes) = collect_dataset(&dir).unwrap();
    assert!(skipped.is_empty() && notes.is_empty(), "{skipped:?} {notes:?}");
    let report = audit_images(images, &AuditOptions::default());
    assert!(report.unreadable.is_empty());
    let mut group_of: HashMap<PathBuf, usize> = HashMap::new();
    for (g, group) in report.groups.iter().enumerate() {
        for m in &group.members {
            group_of.insert(report.images[m.image].path.canonicalize().unwrap(), g);
        }
    }
    let together =
        |a: &Path, b: &Path| matches!((group_of.get(a), group_of.get(b)), (Some(x), Some(y)) if x == y);

    let mut per_kind: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (copy, original, kind) in &copies {
        let entry = per_kind.entry(kind.clone()).or_default();
        entry.1 += 1;
        if together(copy, original) {
            entry.0 += 1;
        }
    }
    let found: usize = per_kind.values().map(|v| v.0).sum();
    let recall = found as f64 / copies.len() as f64;
    let mut pairs = 0usize;
    let mut flagged = Vec::new();
    for (i, a) in distinct.iter().enumerate() {
        for b in &distinct[i + 1..] {
            pairs += 1;
            if together(a, b) {
                flagged.push((a.clone(), b.clone()));
            }
        }
    }
    let hard_flagged = hard_pairs.iter().filter(|(a, b)| together(a, b)).count();
    eprintln!(
        "planted copies found: {found} of {} ({:.1}%), per kind {per_kind:?}",
        copies.len(),
        recall * 100.0
    );
    eprintln!(
        "distinct pairs joined: {} of {pairs} ({:.3}%); hardest negatives joined: {hard_flagged} of {}; \
         threshold {} bits of 63",
        flagged.len(),
        flagged.len() as f64 * 100.0 / pairs as f64,
        hard_pairs.len(),
        report.threshold
    );
    for (a, b) in flagged.iter().take(10) {
        eprintln!("  joined: {} ~ {}", a.display(), b.display());
    }
    assert!(recall >= 0.95, "recall {recall:.3}");
    assert!(
        (flagged.len() as f64) <= 0.01 * pairs as f64,
        "{} of {pairs} distinct pairs joined",
        flagged.len()
    );
    assert!(report.cross_split_groups().count() >= planted * 9 / 10);
}

#[test]
fn one_split_and_an_empty_class_are_noted_not_fatal() {
    let dir = fracture_testkit::fresh_dir(&std::env::temp_dir().join("fracture-audit-test"), "one-split");
    let fractured = dir.join("train/fractured");
    std::fs::create_dir_all(&fractured).unwrap();
    std::fs::create_dir_all(dir.join("train/not fractured")).unwrap();
    let a = fracture_testkit::synthetic_xray(64, 64, true, 1);
    a.save(fractured.join("a.png")).unwrap();
    image::imageops::rotate90(&a)
        .save(fractured.join("a-turned.png"))
        .unwrap();
    fracture_testkit::synthetic_xray(64, 64, true, 2)
        .save(fractured.join("b.png"))
        .unwrap();
    let (images, _, notes) = collect_dataset(&dir).unwrap();
    assert_eq!(images.len(), 3);
    let text = notes.join("\n");
    assert!(text.contains("not fractured") || text.contains("empty"), "{text}");
    assert!(text.contains("only train split"), "{text}");
    let report = audit_images(images, &AuditOptions::default());
    assert_eq!(
        report.groups.len(),
        1,
        "the turned copy is found within the split"
    );
    assert_eq!(report.cross_split_groups().count(), 0);
}
