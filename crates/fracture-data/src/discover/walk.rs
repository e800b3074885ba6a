//! The folder walk: every file under a folder, links followed only inside the class folder they
//! started in, loops and link problems reported.

use super::*;
use fracture_fs::AtPath;

/// The state of one folder walk: the canonical folder it must stay in (a class folder, so that a
/// link cannot relabel images), the canonical folders already walked, and where link problems go.
pub(super) struct Walk<'a> {
    pub(super) bound: Option<PathBuf>,
    pub(super) visited: HashSet<PathBuf>,
    pub(super) problems: &'a mut Vec<Skipped>,
}

pub(super) fn walk_files(
    dir: &Path,
    depth: usize,
    files: &mut Vec<PathBuf>,
    skipped: &mut Vec<Skipped>,
    walk: &mut Walk<'_>,
) -> Result<()> {
    let id = fs::canonicalize(dir).at(dir)?;
    if let Some(bound) = &walk.bound
        && !id.starts_with(bound)
    {
        walk.problems.push(Skipped::new(
            dir,
            format!(
                "a symbolic link out of its class folder {} (to {}): not followed",
                bound.display(),
                id.display()
            ),
        ));
        return Ok(());
    }
    if !walk.visited.insert(id) {
        skipped.push(Skipped::new(
            dir,
            "a folder already walked (a symbolic link back to it): not followed again",
        ));
        return Ok(());
    }
    for entry in sorted_entries(dir)? {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if is_hidden(name) {
            continue;
        }
        if entry.is_dir() {
            if depth == 0 {
                skipped.push(Skipped::new(
                    &entry,
                    format!(
                        "folder nested too deep: images are searched at most {CLASS_WALK_DEPTH} folders below a class folder or a given folder"
                    ),
                ));
            } else {
                walk_files(&entry, depth - 1, files, skipped, walk)?;
            }
        } else if entry.is_file() {
            files.push(entry);
        }
    }
    Ok(())
}
