//! The one error type of this crate. Every variant about a file carries its path.

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading or decoding images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error(transparent)]
    Io(#[from] fracture_fs::PathError),
    /// The bytes are not a readable image (corrupt, truncated, unsupported, or over a decoding limit).
    #[error("{}: cannot decode image: {source}", crate::path_shown(path))]
    Decode {
        /// The file (or upload name) that failed to decode.
        path: PathBuf,
        /// The decoder's own error.
        #[source]
        source: image::ImageError,
    },
    /// Only part of the image could be decoded (a truncated or damaged file): refused unless
    /// [`DecodeLimits::allow_partial`](crate::DecodeLimits::allow_partial).
    #[error(
        "{}: the image is truncated or damaged, only part of it decodes ({reason}); \
         such images are refused unless partial decoding is allowed",
        crate::path_shown(path)
    )]
    Partial {
        /// The file (or upload name).
        path: PathBuf,
        /// What the strict decoder found.
        reason: String,
    },
    /// A DICOM file that cannot be read as an image: the reason names the attribute, transfer
    /// syntax or limit.
    #[error("{}: DICOM: {reason}", crate::path_shown(path))]
    Dicom {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The image decodes to one gray level everywhere: it carries no information to classify
    /// (a blank, all-zero or wrongly scaled file), so it is refused rather than given a score.
    #[error(
        "{}: the image decodes to a constant image (every pixel is {value} of 255), nothing to classify",
        crate::path_shown(path)
    )]
    Constant {
        /// The file (or upload name).
        path: PathBuf,
        /// The one 8-bit level every pixel has.
        value: u8,
    },
    /// The file is empty.
    #[error("{}: file is empty (0 bytes)", crate::path_shown(path))]
    EmptyFile {
        /// The empty file.
        path: PathBuf,
    },
    /// The file is larger than [`DecodeLimits::max_file_bytes`](crate::DecodeLimits::max_file_bytes).
    #[error(
        "{}: file is {bytes} bytes, over the limit of {limit} bytes",
        crate::path_shown(path)
    )]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        bytes: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file inside a class folder whose extension is not one of [`IMAGE_EXTENSIONS`](crate::IMAGE_EXTENSIONS).
    #[error(
        "{}: not an image file (supported extensions: jpg, jpeg, png, bmp, tif, tiff, webp, dcm, dicom; or DICOM without extension)",
        crate::path_shown(path)
    )]
    NotAnImage {
        /// The file.
        path: PathBuf,
    },
    /// The dataset root does not exist or is not a folder.
    #[error("{}: dataset folder not found", crate::path_shown(path))]
    MissingRoot {
        /// The path that was given.
        path: PathBuf,
    },
    /// A split folder (or a flat class-folder root) holds no recognised class folder.
    #[error(
        "{}: no class folders found (expected `fractured` and `not fractured`, or an alias such as `positive`/`negative`)",
        crate::path_shown(path)
    )]
    NoClassFolders {
        /// The folder that should hold the class folders.
        path: PathBuf,
    },
    /// A class has no usable image in a split.
    #[error("{}: class `{class}` has no images", crate::path_shown(path))]
    EmptyClass {
        /// The class name, `fractured` or `not fractured`.
        class: &'static str,
        /// The split folder (or class folder) that was searched.
        path: PathBuf,
    },
    /// The folder tree does not have the expected shape.
    #[error("{0}")]
    Layout(String),
    /// A configuration value is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The field name, e.g. `preprocess.size`.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
