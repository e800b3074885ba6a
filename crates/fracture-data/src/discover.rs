//! Finding images in a folder tree: `<root>/<split>/<class>/<file>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use fracture_fs::AtPath;
use serde::{Deserialize, Serialize};

use crate::{Error, Label, Result, Split};

/// File extensions read as images, compared without regard to letter case.
pub const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "dcm", "dicom"];

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
        write!(f, "{}: {}", crate::path_shown(&self.path), self.reason)
    }
}

/// Whether a path has one of the [`IMAGE_EXTENSIONS`], in any letter case.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Whether a file is read as an image: an image extension ([`IMAGE_EXTENSIONS`]), or no extension
/// and the DICOM magic (`DICM` after a 128-byte preamble), as scanners and PACS exports often name
/// files.
pub fn is_image_file(path: &Path) -> bool {
    if has_image_extension(path) {
        return true;
    }
    if path.extension().is_some() {
        return false;
    }
    let mut head = [0u8; 132];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok_and(|()| crate::dicom::is_dicom(&head))
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
    /// Symbolic links that change what the dataset means: an image reached through a link that
    /// leaves the dataset root (kept, and listed here), one image in two classes or splits (kept
    /// where it was met first — splits in train, val, test order, classes fractured first — and
    /// dropped from the others), a folder link out of its class folder (not followed). Training
    /// refuses a layout with any unless told to accept them.
    #[serde(default)]
    pub link_problems: Vec<Skipped>,
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
        let mut tracker = Tracker::new(&found)?;
        let mut split_dirs = Vec::new();
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
                Some(split) => split_dirs.push((split, entry)),
                None => skipped.push(Skipped::new(&entry, "not a split folder (train, val or test)")),
            }
        }
        // Splits in train, val, test order, so an image linked into two splits stays in train.
        split_dirs.sort_by_key(|(split, _)| *split);
        for (split, dir) in split_dirs {
            let items = class_folder_items(&dir, Some(split), &mut tracker, &mut skipped, true)?;
            splits.entry(split).or_default().extend(items);
        }
        for items in splits.values_mut() {
            items.retain(|i| !tracker.removed.contains(&i.path));
        }
        for items in splits.values_mut() {
            items.sort_by(|a, b| (a.label, &a.path).cmp(&(b.label, &b.path)));
        }
        Ok(DatasetLayout {
            root: found,
            splits,
            skipped,
            link_problems: tracker.problems,
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
///
/// Files are counted once however many links reach them; the [`DatasetLayout::link_problems`]
/// of this folder are returned among the skipped entries.
pub fn discover_class_folders(dir: &Path) -> Result<(Vec<Item>, Vec<Skipped>)> {
    class_folders(dir, true)
}

/// Like [`discover_class_folders`], but one class suffices: an external test set often holds
/// only fractures. At least one image is still required.
pub fn discover_labelled_images(dir: &Path) -> Result<(Vec<Item>, Vec<Skipped>)> {
    let (items, skipped) = class_folders(dir, false)?;
    if items.is_empty() {
        return Err(Error::EmptyClass {
            class: "any",
            path: dir.to_path_buf(),
        });
    }
    Ok((items, skipped))
}

fn class_folders(dir: &Path, need_both: bool) -> Result<(Vec<Item>, Vec<Skipped>)> {
    if !dir.is_dir() {
        return Err(Error::MissingRoot {
            path: dir.to_path_buf(),
        });
    }
    let mut tracker = Tracker::new(dir)?;
    let mut skipped = Vec::new();
    let mut items = class_folder_items(dir, None, &mut tracker, &mut skipped, need_both)?;
    items.retain(|i| !tracker.removed.contains(&i.path));
    skipped.append(&mut tracker.problems);
    Ok((items, skipped))
}

/// What one discovery has met: the canonical dataset root, the owner of every canonical file,
/// and the link problems found.
struct Tracker {
    given: PathBuf,
    root: PathBuf,
    owners: HashMap<PathBuf, Owner>,
    /// Items taken back because the same image was later met where it really lives.
    removed: HashSet<PathBuf>,
    problems: Vec<Skipped>,
}

/// Where a file was first met, and whether that is where it really lives (no link on the way).
struct Owner {
    split: Option<Split>,
    label: Label,
    path: PathBuf,
    real: bool,
}

impl Tracker {
    fn new(root: &Path) -> Result<Self> {
        Ok(Tracker {
            given: root.to_path_buf(),
            root: fs::canonicalize(root).at(root)?,
            owners: HashMap::new(),
            removed: HashSet::new(),
            problems: Vec::new(),
        })
    }

    /// Whether `file` (found below the given root) is where its canonical path `id` says.
    fn is_real(&self, file: &Path, id: &Path) -> bool {
        file.strip_prefix(&self.given)
            .is_ok_and(|rel| self.root.join(rel) == id)
    }
}

/// Where a split and class live, in words: `train/fractured`, or `fractured` outside splits.
fn place(split: Option<Split>, label: Label) -> String {
    match split {
        Some(s) => format!("{}/{}", s.name(), label.name()),
        None => label.name().to_string(),
    }
}

/// The items of `<dir>/<class>/…`, each file once, with link problems recorded in `tracker`.
fn class_folder_items(
    dir: &Path,
    split: Option<Split>,
    tracker: &mut Tracker,
    skipped: &mut Vec<Skipped>,
    need_both: bool,
) -> Result<Vec<Item>> {
    let (classes, mut skip) = class_dirs(dir)?;
    skipped.append(&mut skip);
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
            let bound = fs::canonicalize(class_dir).at(class_dir)?;
            let mut walk = Walk {
                bound: Some(bound),
                visited: HashSet::new(),
                problems: &mut tracker.problems,
            };
            walk_files(class_dir, CLASS_WALK_DEPTH, &mut files, skipped, &mut walk)?;
            for file in files {
                if let Err(e) = check_file(&file) {
                    skipped.push(Skipped::new(&file, short_reason(&e)));
                    continue;
                }
                let id = fs::canonicalize(&file).at(&file)?;
                if !id.starts_with(&tracker.root) {
                    tracker.problems.push(Skipped::new(
                        &file,
                        format!(
                            "a symbolic link leaving the dataset root {} (to {})",
                            tracker.root.display(),
                            id.display()
                        ),
                    ));
                }
                let real = tracker.is_real(&file, &id);
                let owner = Owner {
                    split,
                    label,
                    path: file.clone(),
                    real,
                };
                match tracker.owners.get(&id) {
                    None => {
                        tracker.owners.insert(id, owner);
                        items.push(Item::new(file, label));
                        count += 1;
                    }
                    Some(first) if first.split == split && first.label == label => {
                        skipped.push(Skipped::new(
                            &file,
                            format!(
                                "the same file as {} (through a symbolic link): counted once",
                                first.path.display()
                            ),
                        ))
                    }
                    // The image really lives here: it moves here from where a link put it first.
                    Some(first) if real && !first.real => {
                        tracker.problems.push(Skipped::new(
                            &first.path,
                            format!(
                                "a symbolic link puts {} (in {}) into {} too; dropped from {}",
                                file.display(),
                                place(split, label),
                                place(first.split, first.label),
                                place(first.split, first.label)
                            ),
                        ));
                        tracker.removed.insert(first.path.clone());
                        tracker.owners.insert(id, owner);
                        items.push(Item::new(file, label));
                        count += 1;
                    }
                    Some(first) => tracker.problems.push(Skipped::new(
                        &file,
                        format!(
                            "the same image as {} in {}: a symbolic link puts it in {} too; dropped from {}",
                            first.path.display(),
                            place(first.split, first.label),
                            place(split, label),
                            place(split, label)
                        ),
                    )),
                }
            }
        }
        if count == 0 && need_both {
            return Err(Error::EmptyClass {
                class: label.name(),
                path: dir.to_path_buf(),
            });
        }
    }
    items.sort_by(|a, b| (a.label, &a.path).cmp(&(b.label, &b.path)));
    Ok(items)
}

/// Lists the image files under `path`: the file itself, or every image file below a folder
/// (recursively, sorted, hidden entries left out). Files without an image extension are returned
/// in the second list. Symbolic links are followed, but every folder is walked once (a link back
/// to a folder above is passed over) and every file is listed once however many links reach it.
pub fn list_image_files(path: &Path) -> Result<(Vec<PathBuf>, Vec<Skipped>)> {
    let meta = fs::metadata(path).at(path)?;
    if meta.is_file() {
        return Ok((vec![path.to_path_buf()], Vec::new()));
    }
    if !meta.is_dir() {
        return Err(Error::Io(fracture_fs::PathError::new(
            path,
            std::io::Error::other(format!(
                "{}, neither an image file nor a folder: skipped",
                special_file_kind(&meta)
            )),
        )));
    }
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut problems = Vec::new();
    let mut walk = Walk {
        bound: None,
        visited: HashSet::new(),
        problems: &mut problems,
    };
    walk_files(path, CLASS_WALK_DEPTH, &mut files, &mut skipped, &mut walk)?;
    let mut seen = HashMap::new();
    let mut unique = Vec::with_capacity(files.len());
    for f in files {
        let id = fs::canonicalize(&f).unwrap_or_else(|_| f.clone());
        match seen.get(&id) {
            None => {
                seen.insert(id, f.clone());
                unique.push(f);
            }
            Some(first) => skipped.push(Skipped::new(
                &f,
                format!(
                    "the same file as {} (through a symbolic link): listed once",
                    Path::display(first)
                ),
            )),
        }
    }
    let (images, others): (Vec<_>, Vec<_>) = unique.into_iter().partition(|f| is_image_file(f));
    skipped.extend(others.into_iter().map(|f| Skipped::new(f, "not an image file")));
    Ok((images, skipped))
}

/// What a path that is neither a regular file nor a folder is, in words.
fn special_file_kind(meta: &fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    let _ = meta;
    "a special file"
}

/// Checks that a listed file can be an image: an image extension and a non-zero size.
fn check_file(path: &Path) -> Result<()> {
    if !is_image_file(path) {
        return Err(Error::NotAnImage {
            path: path.to_path_buf(),
        });
    }
    let len = fs::metadata(path).at(path)?.len();
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
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
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

mod walk;
use walk::*;
