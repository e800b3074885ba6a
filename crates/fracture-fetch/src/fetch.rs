//! Fetching a dataset: cache check, download (anonymous, then with credentials), checksum, safe
//! extraction, and a marker that makes the next call a no-op.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fracture_fs::AtPath;
use serde::{Deserialize, Serialize};

use crate::http::{Announced, Client, Failure};
use crate::{CredentialLookup, DatasetRef, Error, ExtractLimits, Result, checksum, extract_zip};

/// The Kaggle API that datasets are downloaded from.
pub const DEFAULT_BASE_URL: &str = "https://www.kaggle.com/api/v1";
/// The environment variable that overrides [`DEFAULT_BASE_URL`] (tests point it at a local server).
pub const BASE_URL_ENV: &str = "FRACTURE_KAGGLE_BASE_URL";
/// The marker file a completed download leaves in its folder.
pub const MARKER_FILE: &str = ".fracture-fetch.json";

/// The API base URL: `$FRACTURE_KAGGLE_BASE_URL`, or [`DEFAULT_BASE_URL`].
pub fn base_url_from_env() -> String {
    std::env::var(BASE_URL_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string())
}

/// What [`fetch`] reports while it works.
#[derive(Debug)]
pub enum Event<'a> {
    /// A step, in words.
    Status(&'a str),
    /// Bytes in the `.part` file so far, and the file's size when known.
    Progress {
        /// Bytes received (resumed bytes included).
        downloaded: u64,
        /// The whole file's size, when the server said.
        total: Option<u64>,
    },
    /// A failed attempt that will be retried after `wait`.
    Retry {
        /// The attempt that failed (1-based).
        attempt: u32,
        /// The pause before the next one.
        wait: Duration,
        /// What went wrong.
        reason: &'a str,
    },
}

/// How to fetch one dataset.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The dataset.
    pub dataset: DatasetRef,
    /// The folder the dataset is extracted into. The archive is downloaded beside it, as
    /// `<dest>.zip.part` and then `<dest>.zip`.
    pub dest: PathBuf,
    /// The API base URL (see [`base_url_from_env`]).
    pub base_url: String,
    /// Download and extract again even when `dest` holds a completed download.
    pub force: bool,
    /// Where credentials are looked for.
    pub credentials: CredentialLookup,
    /// Zip-bomb limits.
    pub limits: ExtractLimits,
    /// Retries after a server error or a dropped connection.
    pub retries: u32,
    /// The first pause between retries; it doubles each time (at most 30 s).
    pub backoff: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Keep `<dest>.zip` after extraction (it is removed by default).
    pub keep_archive: bool,
}

impl FetchOptions {
    /// Options for `dataset` into `dest` with the process's credentials and base URL, 5 retries from
    /// 1 s, a 10 s connect timeout and default extraction limits.
    pub fn new(dataset: DatasetRef, dest: PathBuf) -> Self {
        FetchOptions {
            dataset,
            dest,
            base_url: base_url_from_env(),
            force: false,
            credentials: CredentialLookup::from_process(),
            limits: ExtractLimits::default(),
            retries: 5,
            backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            keep_archive: false,
        }
    }
}

/// The result of a [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The extracted dataset's folder.
    pub root: PathBuf,
    /// Whether it was already there (nothing was downloaded or extracted).
    pub cached: bool,
    /// Size of the archive in bytes.
    pub archive_bytes: u64,
    /// Files extracted.
    pub files: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    dataset: String,
    archive_bytes: u64,
    files: usize,
    checksums: Vec<String>,
}

/// `dest` with `suffix` appended to its name: where its archive, `.part` file and staging folders lie.
pub(crate) fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("dataset");
    dest.with_file_name(format!("{name}{suffix}"))
}

/// Downloads and extracts a Kaggle dataset, or does nothing when `dest` already holds it.
///
/// The download is anonymous first (public datasets need no account); on HTTP 401/403 it is retried
/// with the first credential [`CredentialLookup::find`] finds. `Authorization` is sent only to the
/// API's origin, never to the storage host it redirects to. An interrupted download resumes from its
/// `.part` file; the announced MD5/CRC32C (when sent) and every entry's CRC-32 are checked; the archive
/// is extracted safely (see [`extract_zip`]) and the folder appears only when complete.
pub fn fetch(options: &FetchOptions, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Fetched> {
    let dest = &options.dest;
    let dataset = options.dataset.to_string();
    if dest.exists() {
        match (read_marker(dest), options.force) {
            (Some(m), false) if m.dataset == dataset => {
                on_event(Event::Status(&format!(
                    "{dataset} is already in {}",
                    dest.display()
                )));
                return Ok(Fetched {
                    root: dest.clone(),
                    cached: true,
                    archive_bytes: m.archive_bytes,
                    files: m.files,
                });
            }
            (_, false) => return Err(Error::DestinationExists { path: dest.clone() }),
            // With --force the folder is replaced once the new one is complete.
            (_, true) => {}
        }
    }
    let (archive, archive_bytes, checks) =
        archive_for(dest, options.force, on_event, &mut |part, on_event| {
            download(options, part, on_event)
        })?;
    let staging = sibling(dest, ".new");
    let extracted = extract_or_discard(&archive, &staging, &options.limits, on_event)?;
    let marker = Marker {
        dataset: dataset.clone(),
        archive_bytes,
        files: extracted.files,
        checksums: checks,
    };
    let json = serde_json::to_string_pretty(&marker).unwrap_or_default();
    install(&staging, dest, &json, &archive, options.keep_archive)?;
    Ok(Fetched {
        root: dest.clone(),
        cached: false,
        archive_bytes,
        files: extracted.files,
    })
}

fn read_marker(dest: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(dest.join(MARKER_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// A download into the `.part` file it is given, reporting to the callback; returns the checksums
/// it verified.
pub(crate) type DownloadInto<'a> = dyn FnMut(&Path, &mut dyn FnMut(Event<'_>)) -> Result<Vec<String>> + 'a;

/// One download attempt, reporting to the callback; returns the checksums to verify the file with.
pub(crate) type Attempt<'a> = dyn FnMut(&mut dyn FnMut(Event<'_>)) -> Result<Announced> + 'a;

/// The archive of `dest` (`<dest>.zip`): the one already downloaded (unless `force`), or the file
/// `download` writes into `<dest>.zip.part`, renamed once complete. Returns it, its size in bytes
/// and the checksums `download` verified (none for an archive already there).
pub(crate) fn archive_for(
    dest: &Path,
    force: bool,
    on_event: &mut dyn FnMut(Event<'_>),
    download: &mut DownloadInto<'_>,
) -> Result<(PathBuf, u64, Vec<String>)> {
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    let archive = sibling(dest, ".zip");
    let part = sibling(dest, ".zip.part");
    if force {
        let _ = std::fs::remove_file(&archive);
    }
    let mut checks = Vec::new();
    if archive.is_file() {
        on_event(Event::Status(&format!(
            "using the archive already downloaded at {}",
            archive.display()
        )));
    } else {
        checks = download(&part, on_event)?;
        std::fs::rename(&part, &archive).at(&archive)?;
    }
    let bytes = std::fs::metadata(&archive).at(&archive)?.len();
    Ok((archive, bytes, checks))
}

/// Extracts `archive` into `to` (replacing a leftover `to`); a corrupt or unsafe archive is removed,
/// so that the next call downloads afresh.
pub(crate) fn extract_or_discard(
    archive: &Path,
    to: &Path,
    limits: &ExtractLimits,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<crate::Extracted> {
    on_event(Event::Status(&format!("extracting {}", archive.display())));
    let _ = std::fs::remove_dir_all(to);
    extract_zip(archive, to, limits).inspect_err(|_| {
        let _ = std::fs::remove_file(archive);
    })
}

/// Writes `marker` (JSON) as [`MARKER_FILE`] into `staging`, puts `staging` in place of `dest`, and
/// removes `archive` unless `keep_archive`.
pub(crate) fn install(
    staging: &Path,
    dest: &Path,
    marker: &str,
    archive: &Path,
    keep_archive: bool,
) -> Result<()> {
    let marker_path = staging.join(MARKER_FILE);
    std::fs::write(&marker_path, marker).at(&marker_path)?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).at(dest)?;
    }
    std::fs::rename(staging, dest).at(dest)?;
    if !keep_archive {
        let _ = std::fs::remove_file(archive);
    }
    Ok(())
}

/// Downloads into `part` with `attempt` and checks the file against the checksums `attempt` returns;
/// on a mismatch the file is removed and downloaded once more from scratch. Returns the checksums
/// verified.
pub(crate) fn download_verified(
    part: &Path,
    on_event: &mut dyn FnMut(Event<'_>),
    attempt: &mut Attempt<'_>,
) -> Result<Vec<String>> {
    let mut round = 0;
    loop {
        let announced = attempt(on_event)?;
        match checksum::verify(part, &announced) {
            Ok(checked) => return Ok(checked.into_iter().map(str::to_string).collect()),
            Err(e) => {
                let _ = std::fs::remove_file(part);
                if round == 1 {
                    return Err(e);
                }
                round += 1;
                on_event(Event::Status(&format!("{e}; downloading again")));
            }
        }
    }
}

/// Downloads into `part` and verifies it; returns the checksums verified.
fn download(options: &FetchOptions, part: &Path, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Vec<String>> {
    let client = Client::new(options.connect_timeout, options.retries, options.backoff);
    let url = options.dataset.download_url(&options.base_url);
    let dataset = options.dataset.to_string();
    on_event(Event::Status(&format!("downloading {dataset} from {url}")));
    let not_found = |e: Error| match e {
        Error::Http { status: 404, url } => Error::NotFound {
            dataset: dataset.clone(),
            url,
        },
        other => other,
    };
    // A checksum mismatch restarts the download once from scratch.
    download_verified(part, on_event, &mut |on_event| {
        Ok(match client.download(&url, None, part, on_event) {
            Ok(a) => a,
            Err(Failure::Other(e)) => return Err(not_found(e)),
            Err(Failure::Refused(status)) => {
                let found = options.credentials.find();
                let tried = found.tried.join(", ");
                let Some((source, credential)) = found.credential else {
                    return Err(Error::Forbidden {
                        dataset: dataset.clone(),
                        status,
                        tried: format!("{tried} (none found)"),
                    });
                };
                on_event(Event::Status(&format!(
                    "anonymous access refused (HTTP {status}); retrying with the credential from {source}"
                )));
                match client.download(&url, Some(&credential.header()), part, on_event) {
                    Ok(a) => a,
                    Err(Failure::Other(e)) => return Err(not_found(e)),
                    Err(Failure::Refused(status)) => {
                        return Err(Error::Forbidden {
                            dataset: dataset.clone(),
                            status,
                            tried: format!("{tried} (used {source})"),
                        });
                    }
                }
            }
        })
    })
}
