//! Downloading a Kaggle dataset, or the FracAtlas release from figshare ([`fetch_fracatlas`]): the
//! only fracture crate that touches the network.
//!
//! [`fetch`] downloads `https://www.kaggle.com/api/v1/datasets/download/{owner}/{slug}` (the base URL
//! is overridable, see [`BASE_URL_ENV`]), anonymously first and then with the credentials Kaggle's own
//! tools use ([`CredentialLookup`]); resumes an interrupted download with HTTP ranges; retries server
//! errors and dropped connections with backoff; checks the checksums the server announces and every
//! zip entry's CRC; and extracts safely ([`extract_zip`]: no absolute paths, `..`, symlinks or zip
//! bombs) into a folder that appears only when complete. A second call finds the data and does
//! nothing. Progress goes to a callback; this crate never prints, and never logs a credential.
//!
//! The extraction step on its own (the download needs the network; its tests use a loopback stub):
//!
//! ```
//! use fracture_fetch::{ExtractLimits, extract_zip};
//!
//! let dir = std::env::temp_dir().join(format!("fracture-fetch-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let archive = dir.join("data.zip");
//! std::fs::write(&archive, fracture_testkit::zip_of(&[("train/fractured/a.png", b"png bytes")]))?;
//! let done = extract_zip(&archive, &dir.join("data"), &ExtractLimits::default())?;
//! assert_eq!(done.files, 1);
//! // An entry that climbs out of the destination is refused, and nothing is written.
//! std::fs::write(&archive, fracture_testkit::zip_of(&[("../evil.txt", b"x")]))?;
//! assert!(extract_zip(&archive, &dir.join("other"), &ExtractLimits::default()).is_err());
//! assert!(!dir.join("other").exists() && !dir.join("evil.txt").exists());
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod checksum;
mod credentials;
mod dataset;
mod error;
mod extract;
mod fetch;
mod fracatlas;
mod http;

pub use credentials::{Credential, CredentialLookup, Found};
pub use dataset::{DEFAULT_DATASET, DatasetRef};
pub use error::{Error, Result};
pub use extract::{ExtractLimits, Extracted, extract_zip};
pub use fetch::{
    BASE_URL_ENV, DEFAULT_BASE_URL, Event, FetchOptions, Fetched, MARKER_FILE, base_url_from_env, fetch,
};
pub use fracatlas::{
    CLASS_FOLDERS, DEFAULT_FIGSHARE_API, FIGSHARE_API_ENV, FRACATLAS_ARTICLE, FracAtlasFetched,
    FracAtlasOptions, META_COLUMNS, SPLITS, SplitPlan, fetch_fracatlas, figshare_api_from_env,
};
