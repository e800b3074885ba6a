//! `fracture audit`: exact and near duplicates within and across splits, before a dataset is trusted.

use std::path::PathBuf;

use anyhow::Context;
use fracture_infer::audit::{AuditCounts, write_audit};
use fracture_infer::data::audit::{
    AuditImage, AuditOptions, DEFAULT_THRESHOLD, MAX_RADIUS, audit_images, collect_dataset,
};
use fracture_infer::data::{DecodeLimits, path_text};

/// Arguments of `fracture audit`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Dataset folder: `<DATA>/<split>/<class>/<image>`. A split that lacks a class is audited as it is.
    #[arg(long)]
    data: PathBuf,
    /// Further training folders (`<DIR>/train/<class>/<image>`), audited as the set `extra:<DIR>`;
    /// repeatable.
    #[arg(long = "extra-train", value_name = "DIR")]
    extra_train: Vec<PathBuf>,
    /// Where `audit.json`, `duplicates.csv` and the contact sheets go.
    #[arg(long, default_value = "audit")]
    out: PathBuf,
    /// Near duplicates differ in at most this many of the 63 hash bits (0 to 7), and a finer
    /// 255-bit hash confirms each match. The README gives the rates measured at the default.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RADIUS)))]
    threshold: u32,
    /// Contact sheets for at most this many cross-split groups.
    #[arg(long, default_value_t = 50)]
    sheets: usize,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // The output folder is checked before the audit runs, not after.
    if args.out.exists() && !args.out.is_dir() {
        anyhow::bail!(
            "--out {}: exists and is not a folder (the audit writes a folder of files)",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    let (mut images, skipped, mut notes) = collect_dataset(&args.data)
        .with_context(|| format!("cannot read the dataset {}", args.data.display()))?;
    for dir in &args.extra_train {
        let split = format!("extra:{}", path_text(dir));
        let train = dir.join("train");
        let folder = if train.is_dir() { train } else { dir.clone() };
        match fracture_infer::data::discover_labelled_images(&folder) {
            Ok((items, more)) => {
                for s in more {
                    eprintln!("warning: skipped {s}");
                }
                images.extend(
                    items
                        .into_iter()
                        .map(|i| AuditImage::new(i.path, split.clone(), i.label)),
                );
            }
            Err(e) => notes.push(format!("{}: {e}", dir.display())),
        }
    }
    for s in &skipped {
        eprintln!("warning: skipped {s}");
    }
    let options = AuditOptions {
        threshold: args.threshold,
        limits: DecodeLimits::default(),
    };
    let mut report = audit_images(images, &options);
    report.notes.extend(notes);
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    for s in &report.unreadable {
        eprintln!("warning: unreadable, left out: {s}");
    }
    // The files first: printing may end early (a closed pipe) and must not lose them.
    let written = write_audit(&report, &args.out, args.sheets, &options.limits)?;
    let counts = AuditCounts::of(&report);
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{} images audited in {seconds:.1} s ({:.0} images/s), {} unreadable; threshold {} of 63 bits",
        counts.images,
        counts.images as f64 / seconds.max(1e-9),
        counts.unreadable,
        report.threshold
    );
    println!("exact duplicate groups (same bytes):   {}", counts.exact_groups);
    println!(
        "near-duplicate pairs:                  {} ({} across splits)",
        counts.pairs, counts.cross_split_pairs
    );
    println!(
        "near-duplicate groups within a split:  {}",
        counts.within_split_groups
    );
    println!(
        "groups across splits (leaks):         {} ({} images)",
        counts.cross_split_groups, counts.images_in_cross_split_groups
    );
    for (a, b, n) in report.split_pairs() {
        println!("  {a} ↔ {b}: {n}");
    }
    println!("groups whose labels disagree:         {}", counts.label_conflicts);
    if report.groups.iter().any(|g| g.crosses_splits()) {
        println!(
            "(d = how many of the {} bits of its perceptual signature differ from the group's first image's: \
             0 = the same signature, small = the same radiograph resized, re-encoded or slightly shifted)",
            fracture_infer::data::audit::HASH_BITS
        );
    }
    for (i, g) in report
        .groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.crosses_splits())
        .take(10)
    {
        println!(
            "group {}{}:",
            i + 1,
            if g.label_conflict {
                " (labels disagree)"
            } else {
                ""
            }
        );
        for m in &g.members {
            let image = &report.images[m.image];
            println!(
                "  {:<6} {:<13} d={:<2}{} {}",
                image.split,
                image.label.name(),
                m.distance,
                if m.exact { " exact" } else { "" },
                fracture_infer::data::path_shown(&image.path)
            );
        }
    }
    println!(
        "wrote {} files to {} ({}, {}, sheets/)",
        written.len(),
        args.out.display(),
        fracture_infer::audit::AUDIT_JSON,
        fracture_infer::audit::DUPLICATES_CSV
    );
    Ok(())
}
