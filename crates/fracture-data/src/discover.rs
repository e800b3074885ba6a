//! Finding images in a folder tree: `<root>/<split>/<class>/<file>`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Label, Result, Split};

/// File extensions read as images, compared without regard to letter case.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

/// How deep below the given folder the dataset root is searched for (the Kaggle zip nests it twice).
const ROOT_SEARCH_DEPTH: usize = 4;
/// How deep image files are searched for below a class folder.
const CLASS_WALK_DEPTH: usize = 8;

/// One labelled image file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Item {
    /// The image file.
    pub path: PathBuf,
    /// Its class, from the name of the class folder it sits in.
    pub label: Label,
}

impl Item {
    /// A labelled file.
    pub fn new(path: impl Into<PathBuf>, label: Label) -> Self {
        Item {
            path: path.into(),
            label,
        }
    }
}

/// A file or folder that was passed over, and why. Shown in summaries; never fatal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The file or folder.
    pub path: PathBuf,
    /// Why it was skipped, in words.
    pub reason: String,
}

impl Skipped {
    pub(crate) fn new(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Skipped {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// Whether a path has one of the [`IMAGE_EXTENSIONS`], in any letter case.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The images of a dataset folder tree, per split, in a deterministic order.
///
/// Built by [`DatasetLayout::discover`]. Files are listed, not decoded: a corrupt image is found
/// when it is loaded (see [`FolderDataset::load`](crate::FolderDataset::load)). Zero-byte files
/// and files without an image extension are skipped here and listed in [`DatasetLayout::skipped`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetLayout {
    /// The folder that holds the split folders (may be below the folder that was given).
    pub root: PathBuf,
    /// The images of each split found, sorted by label, then path.
    pub splits: BTreeMap<Split, Vec<Item>>,
    /// Files and folders that were passed over.
    pub skipped: Vec<Skipped>,
}

impl DatasetLayout {
    /// Discovers `<root>/<split>/<class>/<file>`.
    ///
    /// Split folders are `train`, `val` and `test` (aliases in [`Split::from_dir_name`]); class folders
    /// are matched by [`Label::from_class_name`]; files may sit in sub-folders of a class folder. When
    /// `root` itself holds no split folder, the first folder below it (up to four levels, in name order)
    /// that does is used: given the folder of the Kaggle zip, this finds
    /// `Bone_Fracture_Binary_Classification/Bone_Fracture_Binary_Classification/`.
    ///
    /// Errors: the root is missing ([`Error::MissingRoot`]); no split folder anywhere
    /// ([`Error::Layout`]); a split folder without class folders ([`Error::NoClassFolders`]); a class
    /// without images in a split ([`Error::EmptyClass`]).
    pub fn discover(root: &Path) -> Result<DatasetLayout> {
        if !root.is_dir() {
            return Err(Error::MissingRoot {
                path: root.to_path_buf(),
            });
        }
        let Some(found) = find_split_root(root, ROOT_SEARCH_DEPTH)? else {
            if !class_dirs(root)?.0.is_empty() {
                return Err(Error::Layout(format!(
                    "{}: holds class folders but no split folders (train, val, test); \
                     put them under `train/` or read it as one folder of class folders",
                    root.display()
                )));
            }
            return Err(Error::Layout(format!(
                "{}: no split folder (train, val or test) found in it or up to {ROOT_SEARCH_DEPTH} levels below",
                root.display()
            )));
        };
        let mut splits: BTreeMap<Split, Vec<Item>> = BTreeMap::new();
        let mut skipped = Vec::new();
        for entry in sorted_entries(&found)? {
            let name = entry
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if !entry.is_dir() || is_hidden(&name) {
                continue;
            }
            match Split::from_dir_name(&name) {
                Some(split) => {
                    let (items, mut skip) = discover_class_folders(&entry)?;
                    splits.entry(split).or_default().extend(items);
                    skipped.append(&mut skip);
                }
                None => skipped.push(Skipped::new(&entry, "not a split folder (train, val or test)")),
            }
        }
        for items in splits.values_mut() {
            items.sort_by(|a, b| (a.label, &a.path).cmp(&(b.label, &b.path)));
        }
        Ok(DatasetLayout {
            root: found,
            splits,
            skipped,
        })
    }

    /// The images of one split, or `None` when the dataset has no such split.
    pub fn split(&self, split: Split) -> Option<&[Item]> {
        self.splits.get(&split).map(Vec::as_slice)
    }

    /// Counts of images per split and class, and the skipped entries, ready to print.
    pub fn summary(&self) -> crate::DatasetSummary {
        crate::DatasetSummary::from_layout(self)
    }
}

/// Discovers the images of one folder whose children are class folders (`<dir>/<class>/<file>`).
///
/// Returns the items sorted by label, then path, and the skipped entries. Both classes must be
/// present with at least one image each.
pub fn discover_class_folders(dir: &Path) -> Result<(Vec<Item>, Vec<Skipped>)> {
    if !dir.is_dir() {
        return Err(Error::MissingRoot {
            path: dir.to_path_buf(),
        });
    }
    let (classes, mut skipped) = class_dirs(dir)?;
    if classes.is_empty() {
        return Err(Error::NoClassFolders {
            path: dir.to_path_buf(),
        });
    }
    let mut items = Vec::new();
    for label in Label::ALL {
        let mut count = 0;
        for (l, class_dir) in &classes {
            if *l != label {
                continue;
            }
            let mut files = Vec::new();
            walk_files(class_dir, CLASS_WALK_DEPTH, &mut files, &mut skipped)?;
            for file in files {
                match check_file(&file) {
                    Ok(()) => {
                        items.push(Item::new(file, label));
                        count += 1;
                    }
                    Err(e) => skipped.push(Skipped::new(&file, short_reason(&e))),
                }
            }
        }
        if count == 0 {
            return Err(Error::EmptyClass {
                class: label.name(),
                path: dir.to_path_buf(),
            });
        }
    }
    items.sort_by(|a, b| (a.label, &a.path).cmp(&(b.label, &b.path)));
    Ok((items, skipped))
}

/// Lists the image files under `path`: the file itself, or every image file below a folder
/// (recursively, sorted, hidden entries left out). Files without an image extension are returned
/// in the second list.
pub fn list_image_files(path: &Path) -> Result<(Vec<PathBuf>, Vec<Skipped>)> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok((vec![path.to_path_buf()], Vec::new()));
    }
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    walk_files(path, CLASS_WALK_DEPTH, &mut files, &mut skipped)?;
    let (images, others): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| has_image_extension(f));
    skipped.extend(others.into_iter().map(|f| Skipped::new(f, "not an image file")));
    Ok((images, skipped))
}

/// Checks that a listed file can be an image: an image extension and a non-zero size.
fn check_file(path: &Path) -> Result<()> {
    if !has_image_extension(path) {
        return Err(Error::NotAnImage {
            path: path.to_path_buf(),
        });
    }
    let len = fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// The reason part of an error, without the path (which the [`Skipped`] entry carries).
fn short_reason(e: &Error) -> String {
    match e {
        Error::NotAnImage { .. } => "not an image file".into(),
        Error::EmptyFile { .. } => "file is empty (0 bytes)".into(),
        other => other.to_string(),
    }
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name == "__MACOSX"
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

/// Class folders found in a folder, with their labels.
type ClassDirs = Vec<(Label, PathBuf)>;

/// The recognised class folders directly in `dir`, and its other sub-folders as skipped entries.
fn class_dirs(dir: &Path) -> Result<(ClassDirs, Vec<Skipped>)> {
    let mut classes = Vec::new();
    let mut skipped = Vec::new();
    for entry in sorted_entries(dir)? {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if is_hidden(name) {
            continue;
        }
        if entry.is_dir() {
            match Label::from_class_name(name) {
                Some(label) => classes.push((label, entry)),
                None => skipped.push(Skipped::new(&entry, "not a class folder")),
            }
        } else {
            skipped.push(Skipped::new(&entry, "file outside a class folder"));
        }
    }
    Ok((classes, skipped))
}

/// Whether `dir` directly holds a split folder that itself holds a class folder.
fn is_split_root(dir: &Path) -> Result<bool> {
    for entry in sorted_entries(dir)? {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if entry.is_dir() && Split::from_dir_name(name).is_some() && !class_dirs(&entry)?.0.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Breadth-first search (name order) for the shallowest folder that [`is_split_root`].
fn find_split_root(root: &Path, max_depth: usize) -> Result<Option<PathBuf>> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..=max_depth {
        let mut next = Vec::new();
        for dir in level {
            if is_split_root(&dir)? {
                return Ok(Some(dir));
            }
            for entry in sorted_entries(&dir)? {
                let hidden = entry.file_name().and_then(|n| n.to_str()).is_some_and(is_hidden);
                if entry.is_dir() && !hidden {
                    next.push(entry);
                }
            }
        }
        level = next;
    }
    Ok(None)
}

fn walk_files(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, skipped: &mut Vec<Skipped>) -> Result<()> {
    for entry in sorted_entries(dir)? {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if is_hidden(name) {
            continue;
        }
        if entry.is_dir() {
            if depth == 0 {
                skipped.push(Skipped::new(&entry, "folder nested too deep"));
            } else {
                walk_files(&entry, depth - 1, files, skipped)?;
            }
        } else if entry.is_file() {
            files.push(entry);
        }
    }
    Ok(())
}
