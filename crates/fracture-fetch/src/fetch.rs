//! Fetching a dataset: cache check, download (anonymous, then with credentials), checksum, safe
//! extraction, and a marker that makes the next call a no-op.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http::{Client, Failure};
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

fn sibling(dest: &Path, suffix: &str) -> PathBuf {
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
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let archive = sibling(dest, ".zip");
    let part = sibling(dest, ".zip.part");
    if options.force {
        let _ = std::fs::remove_file(&archive);
    }
    let mut checks = Vec::new();
    if !archive.is_file() {
        checks = download(options, &part, on_event)?;
        std::fs::rename(&part, &archive).map_err(|e| Error::io(&archive, e))?;
    } else {
        on_event(Event::Status(&format!(
            "using the archive already downloaded at {}",
            archive.display()
        )));
    }
    let archive_bytes = std::fs::metadata(&archive)
        .map_err(|e| Error::io(&archive, e))?
        .len();

    on_event(Event::Status(&format!("extracting {}", archive.display())));
    let staging = sibling(dest, ".new");
    let _ = std::fs::remove_dir_all(&staging);
    let extracted = match extract_zip(&archive, &staging, &options.limits) {
        Ok(x) => x,
        Err(e) => {
            // A corrupt or unsafe archive is not kept: the next call downloads afresh.
            let _ = std::fs::remove_file(&archive);
            return Err(e);
        }
    };
    let marker = Marker {
        dataset: dataset.clone(),
        archive_bytes,
        files: extracted.files,
        checksums: checks,
    };
    let json = serde_json::to_string_pretty(&marker).unwrap_or_default();
    let marker_path = staging.join(MARKER_FILE);
    std::fs::write(&marker_path, json).map_err(|e| Error::io(&marker_path, e))?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    }
    std::fs::rename(&staging, dest).map_err(|e| Error::io(dest, e))?;
    if !options.keep_archive {
        let _ = std::fs::remove_file(&archive);
    }
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
    for round in 0..2 {
        let announced = match client.download(&url, None, part, on_event) {
            Ok(a) => a,
            Err(Failure::Other(e)) => return Err(not_found(e)),
            Err(Failure::Refused(status)) => {
                let found = options.credentials.find();
                let tried = found.tried.join(", ");
                let Some((source, credential)) = found.credential else {
                    return Err(Error::Forbidden {
                        dataset,
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
                            dataset,
                            status,
                            tried: format!("{tried} (used {source})"),
                        });
                    }
                }
            }
        };
        match checksum::verify(part, &announced) {
            Ok(checked) => return Ok(checked.into_iter().map(str::to_string).collect()),
            Err(e) => {
                let _ = std::fs::remove_file(part);
                if round == 1 {
                    return Err(e);
                }
                on_event(Event::Status(&format!("{e}; downloading again")));
            }
        }
    }
    Err(Error::GaveUp {
        url,
        attempts: 2,
        reason: "checksum mismatch".into(),
    })
}
