#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};

pub mod paths;

/// An I/O error with the file or folder it concerns: what every fracture crate's `Error::Io`
/// holds. Shown as `PATH: what the operating system said`, the path as [`paths::path_shown`]
/// renders it (control characters escaped).
#[derive(Debug)]
pub struct PathError {
    /// The file or folder.
    pub path: PathBuf,
    /// What the operating system said.
    pub source: std::io::Error,
}

impl PathError {
    /// The error `source` met at `path`.
    pub fn new(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PathError {
            path: path.into(),
            source,
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", paths::path_shown(&self.path), self.source)
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Names the path an I/O result concerns: `std::fs::read(&p).at(&p)?`.
///
/// ```
/// use fracture_fs::AtPath;
///
/// let missing = std::path::Path::new("no/such/file.txt");
/// let err = std::fs::read(missing).at(missing).unwrap_err();
/// assert_eq!(err.path, missing);
/// assert!(err.to_string().starts_with("no/such/file.txt: "));
/// ```
pub trait AtPath<T> {
    /// The result, its error tied to `path` (copied only on an error).
    fn at(self, path: impl AsRef<Path>) -> Result<T, PathError>;
}

impl<T> AtPath<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T, PathError> {
        self.map_err(|e| PathError::new(path.as_ref(), e))
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same folder, fsync,
/// rename, then a best-effort fsync of the folder. Readers see the old file or the new one, never
/// a torn one, and after a crash the new one is on disk.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_via_temporary(path, bytes, true)
}

/// [`write_atomic`] without the fsyncs: still never torn, but a crash may lose the file. For caches,
/// whose entries can always be made again and are written by the thousand.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_via_temporary(path, bytes, false)
}

fn write_via_temporary(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&tmp, path)?;
        if durable && let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether process `pid` is running. On Linux, whether `/proc/<pid>` exists; elsewhere every
/// other process is assumed to be running (a lock or temporary is then never taken as stale).
pub fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// The process id in the name of a temporary [`write_atomic`] writes (`.NAME.tmp-PID`).
fn temporary_owner(name: &str) -> Option<u32> {
    let (_, pid) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    pid.parse().ok()
}

/// Removes from `dir` the temporaries [`write_atomic`] left behind (`.NAME.tmp-PID`) when their
/// process ended mid-write (killed, or stopped by a file-size limit), and returns them. A
/// temporary of a running process is kept; a missing folder has none.
pub fn remove_stale_temporaries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else {
            continue;
        };
        if !process_alive(pid) && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// File name of a folder's lock (see [`FolderLock`]).
pub const LOCK_FILE: &str = ".lock";

/// An advisory lock on a folder, so that two processes never write one run folder at once:
/// `<dir>/.lock`, created exclusively, holding the owner's process id. A lock whose process is no
/// longer running is taken over. Removed when dropped.
#[derive(Debug)]
pub struct FolderLock {
    path: PathBuf,
}

/// Why a [`FolderLock`] could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another running process holds the lock.
    Held {
        /// Its process id.
        pid: u32,
        /// The lock file.
        path: PathBuf,
    },
    /// The lock file could not be created or read.
    Io(std::io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held { pid, path } => write!(
                f,
                "the folder is in use by process {pid} (lock file {}); wait for it to end, or remove the \
                 lock file if that process is not a fracture run",
                path.display()
            ),
            LockError::Io(e) => write!(f, "cannot take the folder's lock: {e}"),
        }
    }
}

impl std::error::Error for LockError {}

impl FolderLock {
    /// Takes the lock of `dir` (which must exist).
    pub fn acquire(dir: &Path) -> Result<FolderLock, LockError> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(std::process::id().to_string().as_bytes())
                        .map_err(LockError::Io)?;
                    return Ok(FolderLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    match text.trim().parse::<u32>() {
                        Ok(pid) if process_alive(pid) => return Err(LockError::Held { pid, path }),
                        // A lock of a process that ended without removing it (killed): stale.
                        _ => match std::fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(LockError::Io(e)),
                        },
                    }
                }
                Err(e) => return Err(LockError::Io(e)),
            }
        }
        Err(LockError::Io(std::io::Error::other(
            "the lock file keeps reappearing (another process is taking it)",
        )))
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty folder for one test, under the system's temporary folder.
    fn fresh(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fracture-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = fresh("test");
        let file = dir.join("a.txt");
        write_atomic(&file, b"old").unwrap();
        write_atomic_unsynced(&file, b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        // A folder in the way of the rename: the write fails, the folder and no temporary remain.
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_atomic(&blocked, b"x").is_err());
        assert!(blocked.join("inside").is_dir());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temporaries_go_and_live_ones_stay() {
        let dir = fresh("stale");
        // No process has id 4294967295 (above Linux's pid_max).
        let dead = dir.join(".last.safetensors.tmp-4294967295");
        let live = dir.join(format!(".last.safetensors.tmp-{}", std::process::id()));
        let other = dir.join("last.safetensors");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        let removed = remove_stale_temporaries(&dir).unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(removed, vec![dead.clone()]);
            assert!(!dead.exists());
        }
        assert!(live.exists() && other.exists());
        assert!(remove_stale_temporaries(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_lock_is_exclusive_while_held_and_taken_over_when_stale() {
        let dir = fresh("lock");
        let lock = FolderLock::acquire(&dir).unwrap();
        let held = FolderLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            held.contains(&format!("in use by process {}", std::process::id())),
            "{held}"
        );
        drop(lock);
        assert!(!dir.join(LOCK_FILE).exists());
        if cfg!(target_os = "linux") {
            std::fs::write(dir.join(LOCK_FILE), b"4294967295").unwrap();
            let taken = FolderLock::acquire(&dir).unwrap();
            drop(taken);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
