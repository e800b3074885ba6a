//! Epoch order and batches of `(B, H, W)` f32 images.

use ndarray::Array3;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::sample_rng;
use crate::{Augment, Error, FolderDataset, Label, Result};

/// A batch of samples ready to become a tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Images, shape `(B, H, W)` f32 (in [0, 1] unless standardized).
    pub images: Array3<f32>,
    /// Labels, length `B`.
    pub labels: Vec<Label>,
    /// Dataset indices of the samples, length `B`.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Binary-cross-entropy targets, length `B`: 1.0 for fractured (see [`Label::target`]).
    pub fn targets(&self) -> Vec<f32> {
        self.labels.iter().map(|l| l.target()).collect()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// The sample order of one epoch: `0..n`, shuffled from `(seed, epoch)` when `shuffle` is set.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        order.shuffle(&mut rng);
    }
    order
}

/// How samples are augmented inside [`make_batch`]: each sample draws from
/// [`sample_rng`]`(seed, epoch, index)`, so the result is independent of thread count and order.
#[derive(Clone, Copy)]
pub struct BatchAugment<'a> {
    /// The augmentation.
    pub augment: &'a dyn Augment,
    /// The run's seed.
    pub seed: u64,
    /// The epoch number.
    pub epoch: u64,
}

impl std::fmt::Debug for BatchAugment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchAugment")
            .field("seed", &self.seed)
            .field("epoch", &self.epoch)
            .finish()
    }
}

/// Builds the batch of the given dataset indices (in parallel). An index past the dataset's end
/// is an error naming it (once silently left out, which shrank batches without a word).
pub fn make_batch(
    dataset: &FolderDataset,
    indices: &[usize],
    augment: Option<BatchAugment<'_>>,
) -> Result<Batch> {
    let side = dataset.config().size as usize;
    let len = dataset.items().len();
    if let Some(bad) = indices.iter().find(|&&i| i >= len) {
        return Err(Error::InvalidConfig {
            field: "batch index",
            reason: format!("{bad} is past the end of a dataset of {len} images"),
        });
    }
    let indices = indices.to_vec();
    let mut images = Array3::<f32>::zeros((indices.len(), side, side));
    if let Some(flat) = images.as_slice_mut() {
        flat.par_chunks_mut(side * side)
            .zip(indices.par_iter())
            .for_each(|(dst, &index)| {
                let input = match augment {
                    Some(a) => {
                        let mut rng = sample_rng(a.seed, a.epoch, index as u64);
                        dataset.input(index, Some((a.augment, &mut rng)))
                    }
                    None => dataset.input(index, None),
                };
                if let Some(input) = input {
                    for (d, s) in dst.iter_mut().zip(input.iter()) {
                        *d = *s;
                    }
                }
            });
    }
    let labels = indices.iter().filter_map(|&i| dataset.label(i)).collect();
    Ok(Batch {
        images,
        labels,
        indices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AugmentConfig, Augmenter, Item, PreprocessConfig};
    use ndarray::Array2;

    fn dataset(n: usize) -> FolderDataset {
        let items: Vec<Item> = (0..n)
            .map(|i| Item::new(format!("{i}.png"), Label::from_fractured(i % 3 == 0)))
            .collect();
        let images: Vec<Array2<u8>> = (0..n)
            .map(|i| Array2::from_shape_fn((8, 8), |(y, x)| (i * 10 + x + y) as u8))
            .collect();
        FolderDataset::from_images(items, &images, &PreprocessConfig::with_size(8)).unwrap()
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 3, 1, true);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 3, 1, true));
        assert_ne!(a, epoch_order(50, 3, 2, true));
        assert_eq!(epoch_order(5, 3, 1, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn batch_holds_the_requested_samples() {
        let ds = dataset(6);
        let err = make_batch(&ds, &[4, 1, 99], None).unwrap_err().to_string();
        assert!(err.contains("99") && err.contains("6 images"), "{err}");
        let batch = make_batch(&ds, &[4, 1], None).unwrap();
        assert_eq!(batch.images.dim(), (2, 8, 8));
        assert_eq!(batch.indices, vec![4, 1]);
        assert_eq!(batch.labels, vec![Label::NotFractured, Label::NotFractured]);
        assert!((batch.images[[0, 0, 0]] - 40.0 / 255.0).abs() < 1e-6);
        assert_eq!(batch.targets(), vec![0.0, 0.0]);
    }

    #[test]
    fn augmented_batches_do_not_depend_on_batch_composition() {
        let ds = dataset(6);
        let aug = Augmenter::new(AugmentConfig::default()).unwrap();
        let a = BatchAugment {
            augment: &aug,
            seed: 9,
            epoch: 2,
        };
        let one = make_batch(&ds, &[3], Some(a)).unwrap();
        let many = make_batch(&ds, &[0, 3, 5], Some(a)).unwrap();
        assert_eq!(
            one.images.index_axis(ndarray::Axis(0), 0),
            many.images.index_axis(ndarray::Axis(0), 1)
        );
        let other_epoch = make_batch(&ds, &[3], Some(BatchAugment { epoch: 3, ..a })).unwrap();
        assert_ne!(one.images, other_epoch.images);
    }
}
