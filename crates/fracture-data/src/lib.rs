//! Finding, decoding, preprocessing, caching, augmenting and batching bone X-ray images.
//!
//! The pipeline is: [`DatasetLayout::discover`] lists `<root>/<split>/<class>/<file>`;
//! [`FolderDataset::load`] decodes every file once, in parallel, to a `size × size` 8-bit luma image
//! ([`PreprocessConfig::load_bytes`], the one preprocessing function that training, evaluation and
//! serving share) and keeps it in memory (and optionally on disk); [`make_batch`] turns indices into
//! `(B, H, W)` f32 batches, applying seeded [`Augment`]ations.
//!
//! This crate knows nothing of tensors or models: it yields `ndarray` arrays and [`Label`]s. It never
//! panics on a bad file: an unreadable image is skipped and reported with its path.
#![warn(missing_docs)]

mod augment;
mod batch;
mod cache;
mod dataset;
mod decode;
mod discover;
mod error;
mod label;
mod paths;
mod preprocess;
mod split;
mod summary;

pub use augment::{Augment, AugmentConfig, Augmenter, FillMode, flip_horizontal, flip_vertical, sample_rng};
pub use batch::{Batch, BatchAugment, epoch_order, make_batch};
pub use dataset::{Dataset, FolderDataset, LoadOptions, LoadStats, Sample};
pub use decode::{DecodeLimits, WINDOW_TAIL, decode_gray, read_file_limited, window16};
pub use discover::{
    DatasetLayout, IMAGE_EXTENSIONS, Item, Skipped, discover_class_folders, discover_labelled_images,
    has_image_extension, list_image_files,
};
pub use error::{Error, Result};
pub use label::Label;
pub use paths::path_text;
pub use preprocess::{ContentBox, ImageFit, PreprocessConfig, ResizeMode, SIZE_RANGE, Standardize, to_unit};
pub use split::{Split, stratified_split};
pub use summary::{DatasetSummary, SplitCounts};

pub use image;
pub use ndarray;
