#![doc = include_str!("../README.md")]
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
