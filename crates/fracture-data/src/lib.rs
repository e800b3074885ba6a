#![doc = include_str!("../README.md")]
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
mod luma;
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
pub use decode::{decode_gray, read_file_limited};
pub use dicom::{DicomInfo, decode_dicom, is_dicom};
pub use discover::{
    DatasetLayout, IMAGE_EXTENSIONS, Item, Skipped, discover_class_folders, discover_labelled_images,
    has_image_extension, is_image_file, list_image_files,
};
pub use error::{Error, Result};
pub use fracture_fs::paths::{escape_controls, path_shown, path_text};
pub use label::Label;
pub use luma::{DecodeLimits, WINDOW_TAIL, window16};
pub use preprocess::{
    ContentBox, ImageFit, PreprocessConfig, ResizeMode, SIZE_RANGE, STANDARDIZE_MEAN_RANGE,
    STANDARDIZE_STD_RANGE, Standardize, to_unit,
};
pub use split::{Split, stratified_split};
pub use summary::{DatasetSummary, SplitCounts};

pub use image;
pub use ndarray;
