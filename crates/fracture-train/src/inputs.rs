//! What a run reads and where it writes: the run folder, the dataset (with extra training
//! folders and the link check), loaded and counted.

use std::path::{Path, PathBuf};

use fracture_data::{
    DatasetLayout, FolderDataset, Item, LoadOptions, PreprocessConfig, Split, SplitCounts, stratified_split,
};
use fracture_fs::AtPath;

use crate::checkpoint::DataCounts;
use crate::error::RunFolderProblem;
use crate::{Error, Event, Result, TrainSetup};

/// The loaded splits of a run.
pub(crate) struct Data {
    pub(crate) train: FolderDataset,
    pub(crate) val: FolderDataset,
    pub(crate) test: Option<FolderDataset>,
    pub(crate) counts: DataCounts,
    /// Fingerprints of the training images (see [`crate::audit::FINGERPRINTS_FILE`]).
    pub(crate) fingerprints: Vec<fracture_data::audit::Known>,
}

/// Checks that `out` can hold the run: a folder (created), writable, and holding a checkpoint
/// exactly when resuming.
pub(crate) fn prepare_out(out: &Path, checkpoint: &Path, resume: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::RunFolder {
            path: out.to_path_buf(),
            problem: RunFolderProblem::NotAFolder,
        });
    }
    let exists = checkpoint.is_file();
    if resume && !exists {
        return Err(Error::RunFolder {
            path: checkpoint.to_path_buf(),
            problem: RunFolderProblem::NothingToResume,
        });
    }
    if !resume && exists {
        return Err(Error::RunFolder {
            path: checkpoint.to_path_buf(),
            problem: RunFolderProblem::HoldsARun,
        });
    }
    let dir = checkpoint.parent().unwrap_or(out);
    std::fs::create_dir_all(dir).at(dir)?;
    // Fail now, not after the first epoch, if the folder cannot be written.
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"").at(out)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Refuses a layout with link problems unless [`TrainSetup::allow_link_problems`]; announces them
/// otherwise.
fn check_links(
    setup: &TrainSetup,
    layout: &DatasetLayout,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<()> {
    let problems = &layout.link_problems;
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = problems.iter().take(5).map(|p| format!("  {p}")).collect();
    let more = match problems.len() {
        n if n > 5 => format!("\n  … and {} more", n - 5),
        _ => String::new(),
    };
    if !setup.allow_link_problems {
        return Err(Error::LinkProblems {
            root: layout.root.clone(),
            count: problems.len(),
            listed: format!("{}{more}", shown.join("\n")),
        });
    }
    on_event(Event::Notice(&format!(
        "training despite {} symbolic link problem(s), as allowed:\n{}{more}",
        problems.len(),
        shown.join("\n")
    )));
    Ok(())
}

/// Discovers the dataset, checks its links, adds the extra training folders and loads every split
/// with `preprocess`; both classes must be readable in train and val.
pub(crate) fn load_data(
    setup: &TrainSetup,
    preprocess: &PreprocessConfig,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Data> {
    let layout = DatasetLayout::discover(&setup.data)?;
    check_links(setup, &layout, on_event)?;
    let Some(train_items) = layout.split(Split::Train) else {
        return Err(Error::Data(fracture_data::Error::Layout(format!(
            "{}: no train split (expected a `train` folder holding the class folders)",
            layout.root.display()
        ))));
    };
    let (mut train_items, val_items): (Vec<Item>, Vec<Item>) = match layout.split(Split::Val) {
        Some(val) => (train_items.to_vec(), val.to_vec()),
        None => {
            let (kept, held) = stratified_split(train_items, setup.train.val_fraction, setup.train.seed);
            on_event(Event::Notice(&format!(
                "no val split in {}: validating on a seeded stratified {:.0}% of train ({} images)",
                layout.root.display(),
                setup.train.val_fraction * 100.0,
                held.len()
            )));
            (kept, held)
        }
    };
    add_extra_train(setup, &layout, &val_items, &mut train_items, on_event)?;
    let fingerprints = screen_training(
        &mut train_items,
        &[
            ("val", &val_items),
            ("test", layout.split(Split::Test).unwrap_or(&[])),
        ],
        setup.exclude_leaks,
        &setup.limits,
        on_event,
    );
    let options = LoadOptions {
        disk_cache: setup.cache_dir.clone(),
        limits: setup.limits,
        shift: None,
    };
    let mut summary = layout.summary();
    let mut corrupt = 0;
    let mut load = |split: Split, items: &[Item]| -> Result<FolderDataset> {
        let ds = FolderDataset::load(items, preprocess, &options)?;
        corrupt += ds.stats().cache_corrupt;
        let [fractured, not_fractured] = ds.counts();
        summary.update(
            SplitCounts {
                split,
                fractured,
                not_fractured,
            },
            ds.skipped(),
        );
        Ok(ds)
    };
    let train = load(Split::Train, &train_items)?;
    let val = load(Split::Val, &val_items)?;
    let test = layout
        .split(Split::Test)
        .map(|items| load(Split::Test, items))
        .transpose()?;
    if corrupt > 0 {
        on_event(Event::Notice(&format!(
            "warning: {corrupt} preprocessing cache entries failed their checksum (changed on disk) \
             and were rebuilt from their images"
        )));
    }
    on_event(Event::Dataset(&summary));
    for (name, ds) in [("train", &train), ("val", &val)] {
        if ds.counts().contains(&0) {
            return Err(Error::Data(fracture_data::Error::Layout(format!(
                "the {name} split needs readable images of both classes, found {:?} (fractured, not fractured)",
                ds.counts()
            ))));
        }
    }
    let counts = DataCounts {
        train: train.counts(),
        val: val.counts(),
    };
    Ok(Data {
        train,
        val,
        test,
        counts,
        fingerprints,
    })
}

/// Appends the `train` split of every [`TrainSetup::extra_train`] root to `train`, refusing a root
/// without one and any file that is also one of `val`'s or the main dataset's test images.
fn add_extra_train(
    setup: &TrainSetup,
    layout: &DatasetLayout,
    val: &[Item],
    train: &mut Vec<Item>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<()> {
    if setup.extra_train.is_empty() {
        return Ok(());
    }
    let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let held: std::collections::HashSet<PathBuf> = val
        .iter()
        .chain(layout.split(Split::Test).unwrap_or(&[]))
        .map(|i| key(&i.path))
        .collect();
    for root in &setup.extra_train {
        let extra = DatasetLayout::discover(root)?;
        check_links(setup, &extra, on_event)?;

        let Some(items) = extra.split(Split::Train) else {
            return Err(Error::Data(fracture_data::Error::Layout(format!(
                "{}: extra training data needs a `train` folder holding the class folders",
                extra.root.display()
            ))));
        };
        if let Some(clash) = items.iter().find(|i| held.contains(&key(&i.path))) {
            return Err(Error::Data(fracture_data::Error::Layout(format!(
                "{}: an extra training image is also a validation or test image",
                clash.path.display()
            ))));
        }
        on_event(Event::Notice(&format!(
            "adding {} training images from {}",
            items.len(),
            extra.root.display()
        )));
        train.extend_from_slice(items);
    }
    Ok(())
}

/// The training images' fingerprints (unreadable files left out: loading reports them) and, with
/// `exclude_leaks`, the training images that have a near duplicate (within `threshold` bits) in
/// `held_out` (val and test) removed from `train`, with a notice naming how many and a few of them.
fn screen_training(
    train: &mut Vec<fracture_data::Item>,
    held_out: &[(&str, &[fracture_data::Item])],
    exclude_leaks: bool,
    limits: &fracture_data::DecodeLimits,
    on_event: &mut dyn FnMut(crate::Event<'_>),
) -> Vec<fracture_data::audit::Known> {
    use fracture_data::audit::{AuditImage, DEFAULT_THRESHOLD, group, readable_signatures};
    let mut images: Vec<AuditImage> = train
        .iter()
        .map(|i| AuditImage::new(i.path.clone(), "train", i.label))
        .collect();
    if exclude_leaks {
        for (split, items) in held_out {
            images.extend(
                items
                    .iter()
                    .map(|i| AuditImage::new(i.path.clone(), *split, i.label)),
            );
        }
    }
    let (readable, sigs, _) = readable_signatures(&images, limits);
    if !exclude_leaks {
        return sigs.iter().map(|s| (s.fingerprint, s.detail)).collect();
    }
    let report = group(readable, &sigs, DEFAULT_THRESHOLD);
    let leaked: std::collections::HashSet<&Path> = report
        .leaked_from("train")
        .into_iter()
        .map(|i| report.images[i].path.as_path())
        .collect();
    let before = train.len();
    let shown: Vec<String> = train
        .iter()
        .filter(|i| leaked.contains(i.path.as_path()))
        .take(5)
        .map(|i| format!("  {}", fracture_data::path_text(&i.path)))
        .collect();
    train.retain(|i| !leaked.contains(i.path.as_path()));
    on_event(crate::Event::Notice(&format!(
        "excluding leaks: {} of {before} training images have a near duplicate in val or test \
         (threshold {DEFAULT_THRESHOLD} bits) and are left out{}{}",
        before - train.len(),
        if shown.is_empty() { "" } else { ":\n" },
        shown.join("\n")
    )));
    report
        .images
        .iter()
        .zip(&sigs)
        .filter(|(image, _)| image.split == "train" && !leaked.contains(image.path.as_path()))
        .map(|(_, s)| (s.fingerprint, s.detail))
        .collect()
}
