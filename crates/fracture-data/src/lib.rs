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
//!
//! A dataset folder in, augmented batches out:
//!
//! ```
//! use fracture_data::{DatasetLayout, FolderDataset, LoadOptions, PreprocessConfig, Split, make_batch};
//!
//! let root = std::env::temp_dir().join(format!("fracture-data-doc-{}", std::process::id()));
//! // <root>/{train,val}/{fractured,not fractured}/*.png: here 3 + 3 and 1 + 1 gray gradients.
//! for (split, n) in [("train", 3), ("val", 1)] {
//!     for class in ["fractured", "not fractured"] {
//!         let dir = root.join(split).join(class);
//!         std::fs::create_dir_all(&dir)?;
//!         for i in 0..n {
//!             let img = fracture_data::image::GrayImage::from_fn(48, 40, |x, y| {
//!                 fracture_data::image::Luma([(x * 4 + y * 2 + i * 9) as u8])
//!             });
//!             img.save(dir.join(format!("{i}.png"))).expect("a PNG");
//!         }
//!     }
//! }
//! let layout = DatasetLayout::discover(&root)?;
//! let train = layout.split(Split::Train).expect("a train split");
//! let data = FolderDataset::load(train, &PreprocessConfig::with_size(32), &LoadOptions::default())?;
//! assert_eq!(data.counts(), [3, 3]); // fractured, not fractured
//! let batch = make_batch(&data, &[0, 4], None)?;
//! assert_eq!(batch.images.dim(), (2, 32, 32)); // (B, H, W) f32 in [0, 1]
//! # std::fs::remove_dir_all(&root).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod acquisition;
pub mod audit;
mod augment;
mod batch;
mod cache;
mod dataset;
mod decode;
pub mod dicom;
mod discover;
mod error;
mod label;
mod paths;
mod preprocess;
mod split;
mod summary;

pub use acquisition::Shift;
pub use augment::{
    Augment, AugmentConfig, AugmentDraw, Augmenter, FillMode, WarpDraw, flip_horizontal, flip_vertical,
    sample_rng,
};
pub use batch::{Batch, BatchAugment, epoch_order, make_batch};
pub use dataset::{Dataset, FolderDataset, LoadOptions, LoadStats, Sample};
pub use decode::{DecodeLimits, WINDOW_TAIL, decode_gray, read_file_limited, window16};
pub use dicom::{DicomInfo, decode_dicom, is_dicom};
pub use discover::{
    DatasetLayout, IMAGE_EXTENSIONS, Item, Skipped, discover_class_folders, discover_labelled_images,
    has_image_extension, is_image_file, list_image_files,
};
pub use error::{Error, Result};
pub use label::Label;
pub use paths::{escape_controls, path_shown, path_text};
pub use preprocess::{
    ContentBox, ImageFit, PreprocessConfig, ResizeMode, SIZE_RANGE, STANDARDIZE_MEAN_RANGE,
    STANDARDIZE_STD_RANGE, Standardize, to_unit,
};
pub use split::{Split, stratified_split};
pub use summary::{DatasetSummary, SplitCounts};

pub use image;
pub use ndarray;
