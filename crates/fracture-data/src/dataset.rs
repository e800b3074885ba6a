//! Loading a list of labelled files into memory, preprocessed, in parallel and through the cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use rand::RngCore;
use rayon::prelude::*;

use crate::cache::{CacheRead, DiskCache};
use crate::preprocess::to_unit;
use crate::{Augment, DecodeLimits, Error, Item, Label, PreprocessConfig, Result, Skipped};

/// One network-ready example.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image, `(size, size)` f32 (in [0, 1] unless standardized).
    pub image: Array2<f32>,
    /// Its class.
    pub label: Label,
}

/// A finite, indexable collection of samples.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The sample at `index` (unaugmented). An index out of range is an error, not a panic.
    fn get(&self, index: usize) -> Result<Sample>;
}

/// How [`FolderDataset::load`] reads files.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A folder for the on-disk cache of preprocessed images; `None` keeps the cache in memory only.
    pub disk_cache: Option<PathBuf>,
    /// Decoding limits.
    pub limits: DecodeLimits,
    /// An acquisition shift applied to every decoded image before preprocessing (the evaluation's
    /// shift suite); noise is seeded by the file's path. Shifted images bypass the disk cache.
    pub shift: Option<crate::Shift>,
}

/// What a load did and how long it took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadStats {
    /// Images decoded from their files.
    pub decoded: usize,
    /// Images read from the on-disk cache.
    pub from_disk_cache: usize,
    /// Files that could not be read (listed in [`FolderDataset::skipped`]).
    pub skipped: usize,
    /// Cache entries that could not be written (the images themselves loaded fine).
    pub cache_write_failures: usize,
    /// Cache entries whose checksum failed (changed on disk): rebuilt from their images.
    pub cache_corrupt: usize,
    /// Wall time of the load in seconds.
    pub seconds: f64,
}

impl LoadStats {
    /// Images per second over the whole load.
    pub fn images_per_second(&self) -> f64 {
        let n = (self.decoded + self.from_disk_cache + self.skipped) as f64;
        if self.seconds > 0.0 { n / self.seconds } else { 0.0 }
    }
}

/// The preprocessed images of a list of files, held in memory as 8-bit `size × size` images.
///
/// Every file is decoded once, on all cores (rayon's pool); epochs then only copy from memory. A
/// file that cannot be read is skipped and listed in [`FolderDataset::skipped`]; it never fails the
/// load. With [`LoadOptions::disk_cache`] a later load (another run) decodes nothing that is cached.
///
/// ```
/// # fn main() -> fracture_data::Result<()> {
/// use fracture_data::{Dataset, FolderDataset, Item, Label, LoadOptions, PreprocessConfig};
/// let dir = std::env::temp_dir().join(format!("fracture-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let good = dir.join("good.png");
/// image::GrayImage::from_fn(40, 30, |x, y| image::Luma([(x * 5 + y) as u8])).save(&good).unwrap();
/// let bad = dir.join("bad.png");
/// std::fs::write(&bad, b"not a png").unwrap();
/// let items = [Item::new(&good, Label::Fractured), Item::new(&bad, Label::NotFractured)];
/// let ds = FolderDataset::load(&items, &PreprocessConfig::with_size(16), &LoadOptions::default())?;
/// assert_eq!(ds.len(), 1);
/// assert_eq!(ds.skipped()[0].path, bad);
/// assert_eq!(ds.get(0)?.image.dim(), (16, 16));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FolderDataset {
    items: Vec<Item>,
    config: PreprocessConfig,
    pixels: Vec<u8>,
    skipped: Vec<Skipped>,
    stats: LoadStats,
}

enum Outcome {
    /// Decoded from its file; whether writing the cache entry failed, and whether the entry it
    /// replaces was corrupt.
    Decoded {
        cache_write_failed: bool,
        corrupt: bool,
    },
    Cached,
    Failed(Skipped),
}

impl FolderDataset {
    /// Loads and preprocesses `items`. Fails only on an invalid `config`.
    pub fn load(items: &[Item], config: &PreprocessConfig, options: &LoadOptions) -> Result<Self> {
        Self::load_with_progress(items, config, options, &|_, _| {})
    }

    /// Like [`FolderDataset::load`], calling `progress(done, total)` after each file (from worker
    /// threads, so it must be cheap and thread-safe).
    pub fn load_with_progress(
        items: &[Item],
        config: &PreprocessConfig,
        options: &LoadOptions,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Self> {
        config.validate()?;
        let start = Instant::now();
        let side = config.size as usize;
        let px = side * side;
        let mut stats = LoadStats::default();
        let cache = match &options.disk_cache {
            Some(dir) => match DiskCache::new(dir) {
                Ok(c) => Some(c),
                Err(_) => {
                    stats.cache_write_failures += 1;
                    None
                }
            },
            None => None,
        };
        let preprocess_key = config.cache_key();
        let mut pixels = vec![0u8; items.len() * px];
        let done = AtomicUsize::new(0);
        let total = items.len();
        let outcomes: Vec<Outcome> = pixels
            .par_chunks_mut(px.max(1))
            .zip(items.par_iter())
            .map(|(dst, item)| {
                let outcome = load_one(item, config, options, cache.as_ref(), &preprocess_key, dst);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                outcome
            })
            .collect();
        // Compact: keep the readable images, in order.
        let mut kept = Vec::with_capacity(items.len());
        let mut skipped = Vec::new();
        let mut write = 0;
        for (i, (item, outcome)) in items.iter().zip(outcomes).enumerate() {
            match outcome {
                Outcome::Failed(s) => {
                    skipped.push(s);
                    continue;
                }
                Outcome::Cached => stats.from_disk_cache += 1,
                Outcome::Decoded {
                    cache_write_failed,
                    corrupt,
                } => {
                    stats.decoded += 1;
                    stats.cache_write_failures += usize::from(cache_write_failed);
                    stats.cache_corrupt += usize::from(corrupt);
                }
            }
            if write != i {
                pixels.copy_within(i * px..(i + 1) * px, write * px);
            }
            write += 1;
            kept.push(item.clone());
        }
        pixels.truncate(write * px);
        pixels.shrink_to_fit();
        stats.skipped = skipped.len();
        stats.seconds = start.elapsed().as_secs_f64();
        Ok(FolderDataset {
            items: kept,
            config: *config,
            pixels,
            skipped,
            stats,
        })
    }

    /// A dataset from images already in memory, each `(size, size)` u8 with `size = config.size`.
    pub fn from_images(items: Vec<Item>, images: &[Array2<u8>], config: &PreprocessConfig) -> Result<Self> {
        config.validate()?;
        let side = config.size as usize;
        if items.len() != images.len() {
            return Err(Error::Layout(format!(
                "{} items but {} images",
                items.len(),
                images.len()
            )));
        }
        let mut pixels = Vec::with_capacity(items.len() * side * side);
        for (item, image) in items.iter().zip(images) {
            if image.dim() != (side, side) {
                return Err(Error::Layout(format!(
                    "{}: image is {:?}, expected ({side}, {side})",
                    item.path.display(),
                    image.dim()
                )));
            }
            pixels.extend(image.iter());
        }
        Ok(FolderDataset {
            items,
            config: *config,
            pixels,
            skipped: Vec::new(),
            stats: LoadStats::default(),
        })
    }

    /// Number of readable images (the same as [`Dataset::len`]).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no image could be read.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The readable items, in load order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The path of sample `index`. Panics never: `None` out of range.
    pub fn path(&self, index: usize) -> Option<&Path> {
        self.items.get(index).map(|i| i.path.as_path())
    }

    /// The label of sample `index`, or `None` out of range.
    pub fn label(&self, index: usize) -> Option<Label> {
        self.items.get(index).map(|i| i.label)
    }

    /// Number of images per label, indexed by [`Label::index`].
    pub fn counts(&self) -> [usize; 2] {
        let mut counts = [0; 2];
        for item in &self.items {
            counts[item.label.index()] += 1;
        }
        counts
    }

    /// Files that could not be read.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Counts and timing of the load.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// The preprocessing the images went through.
    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// The cached 8-bit image of sample `index`, `(size, size)`, or `None` out of range.
    pub fn image_u8(&self, index: usize) -> Option<ArrayView2<'_, u8>> {
        let side = self.config.size as usize;
        let px = side * side;
        let slice = self.pixels.get(index * px..(index + 1) * px)?;
        ArrayView2::from_shape((side, side), slice).ok()
    }

    /// Sample `index` as network input, augmented when `augment` is given (augmentation runs on the
    /// [0, 1] image, before standardization). `None` out of range.
    pub fn input(
        &self,
        index: usize,
        augment: Option<(&dyn Augment, &mut dyn RngCore)>,
    ) -> Option<Array2<f32>> {
        let mut image = to_unit(self.image_u8(index)?);
        if let Some((aug, rng)) = augment {
            aug.apply(&mut image, rng);
        }
        self.config.standardize_in_place(&mut image);
        Some(image)
    }
}

impl Dataset for FolderDataset {
    fn len(&self) -> usize {
        FolderDataset::len(self)
    }

    fn get(&self, index: usize) -> Result<Sample> {
        match (self.input(index, None), self.label(index)) {
            (Some(image), Some(label)) => Ok(Sample { image, label }),
            _ => Err(Error::Layout(format!(
                "sample {index} is out of range (len {})",
                self.items.len()
            ))),
        }
    }
}

fn load_one(
    item: &Item,
    config: &PreprocessConfig,
    options: &LoadOptions,
    cache: Option<&DiskCache>,
    preprocess_key: &str,
    dst: &mut [u8],
) -> Outcome {
    let side = config.size as usize;
    if let Some(shift) = options.shift {
        return match load_shifted(item, config, options, shift) {
            Ok(image) => {
                for (d, s) in dst.iter_mut().zip(image.iter()) {
                    *d = *s;
                }
                Outcome::Decoded {
                    cache_write_failed: false,
                    corrupt: false,
                }
            }
            Err(e) => Outcome::Failed(Skipped::new(&item.path, skip_reason(&e))),
        };
    }
    let key = cache.and_then(|_| DiskCache::key(&item.path, preprocess_key));
    let mut corrupt = false;
    if let (Some(cache), Some(key)) = (cache, &key) {
        match cache.read(key, side) {
            CacheRead::Hit(pixels) => {
                dst.copy_from_slice(&pixels);
                return Outcome::Cached;
            }
            CacheRead::Corrupt => corrupt = true,
            CacheRead::Miss => {}
        }
    }
    match config.load_file(&item.path, &options.limits) {
        Ok(image) => {
            if let Some(slice) = image.as_slice() {
                dst.copy_from_slice(slice);
            } else {
                for (d, s) in dst.iter_mut().zip(image.iter()) {
                    *d = *s;
                }
            }
            let cache_write_failed = match (cache, &key) {
                (Some(cache), Some(key)) => cache.write(key, side, dst).is_err(),
                _ => false,
            };
            Outcome::Decoded {
                cache_write_failed,
                corrupt,
            }
        }
        Err(e) => Outcome::Failed(Skipped::new(&item.path, skip_reason(&e))),
    }
}

/// Decodes `item`, applies `shift` with a seed derived from its path, and resizes.
fn load_shifted(
    item: &Item,
    config: &PreprocessConfig,
    options: &LoadOptions,
    shift: crate::Shift,
) -> Result<Array2<u8>> {
    let bytes = crate::read_file_limited(&item.path, &options.limits)?;
    let gray = crate::decode_gray(&bytes, &item.path, &options.limits)?;
    // FNV-1a of the path: a per-image noise seed that does not depend on load order.
    let seed = crate::path_text(&item.path)
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    config.resize(&shift.apply(&gray, seed)?)
}

/// The error text without the leading path (the [`Skipped`] entry carries it).
fn skip_reason(e: &Error) -> String {
    match e {
        Error::Decode { source, .. } => format!("cannot decode image: {source}"),
        Error::EmptyFile { .. } => "file is empty (0 bytes)".into(),
        Error::FileTooLarge { bytes, limit, .. } => {
            format!("file is {bytes} bytes, over the limit of {limit}")
        }
        Error::Io(e) => e.source.to_string(),
        other => other.to_string(),
    }
}
