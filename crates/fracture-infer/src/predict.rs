//! Running a network over preprocessed images: the input tensor, P(fractured), test-time augmentation.

use candle_core::{Device, ModuleT, Tensor};
use fracture_data::ndarray::{Array3, ArrayView2, ArrayView3, Axis};
use fracture_data::{Batch, FolderDataset, make_batch};
use fracture_model::FractureNet;

use crate::Result;

/// Preprocessed images `(B, H, W)` as the network's input `(B, 1, H, W)` f32 on `device`: the one
/// place an array becomes an input tensor.
pub fn images_to_tensor(images: ArrayView3<'_, f32>, device: &Device) -> Result<Tensor> {
    let (b, h, w) = images.dim();
    let data: Vec<f32> = match images.as_slice() {
        Some(s) => s.to_vec(),
        None => images.iter().copied().collect(),
    };
    Ok(Tensor::from_vec(data, (b, 1, h, w), device)?)
}

/// One preprocessed image `(H, W)` as the network's input `(1, 1, H, W)` f32 on `device`.
pub fn image_to_tensor(image: ArrayView2<'_, f32>, device: &Device) -> Result<Tensor> {
    images_to_tensor(image.insert_axis(Axis(0)), device)
}

/// `sigmoid(logit)` in f64: P(fractured).
pub fn sigmoid(logit: f32) -> f64 {
    1.0 / (1.0 + (-f64::from(logit)).exp())
}

/// Test-time augmentation: which flipped copies of an image the prediction averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tta {
    /// The image alone.
    #[default]
    Off,
    /// The image and its left-right mirror (for models trained with horizontal flips only).
    Mirror,
    /// The image and its horizontal, vertical and double flips.
    Flips,
}

impl Tta {
    /// The views a model trained with `augment` has seen: all four flips when it was trained with
    /// vertical flips too, the mirror when only with horizontal ones, and the mirror as well when it
    /// saw no flips at all (left and right are equally plausible in a radiograph).
    pub fn for_training(augment: Option<&fracture_data::AugmentConfig>) -> Self {
        match augment {
            Some(a) if a.vertical_flip && a.horizontal_flip => Tta::Flips,
            _ => Tta::Mirror,
        }
    }

    /// How many views are averaged.
    pub fn views(self) -> usize {
        match self {
            Tta::Off => 1,
            Tta::Mirror => 2,
            Tta::Flips => 4,
        }
    }
}

/// P(fractured) for a batch of images `(B, H, W)`: the mean probability over the views `tta` names.
pub fn predict_images(
    net: &FractureNet,
    images: &Array3<f32>,
    tta: Tta,
    device: &Device,
) -> Result<Vec<f64>> {
    let run = |view: Array3<f32>| -> Result<Vec<f64>> {
        let x = crate::images_to_tensor(view.view(), device)?;
        Ok(net
            .forward_t(&x, false)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(sigmoid)
            .collect())
    };
    let mut probs = run(images.clone())?;
    let extra: Vec<Array3<f32>> = match tta {
        Tta::Off => Vec::new(),
        Tta::Mirror => flips(images).into_iter().take(1).collect(),
        Tta::Flips => flips(images).into(),
    };
    for v in extra {
        for (p, q) in probs.iter_mut().zip(run(v)?) {
            *p += q;
        }
    }
    let n = tta.views() as f64;
    probs.iter_mut().for_each(|p| *p /= n);
    Ok(probs)
}

/// The horizontal, vertical and double flips of a `(B, H, W)` batch.
fn flips(images: &Array3<f32>) -> [Array3<f32>; 3] {
    let flip = |axes: &[usize]| {
        let mut v = images.view();
        for &a in axes {
            v.invert_axis(Axis(a));
        }
        v.as_standard_layout().into_owned()
    };
    [flip(&[2]), flip(&[1]), flip(&[1, 2])]
}

/// P(fractured) of every image of `dataset`, in dataset order (see [`predict_images`]).
pub fn predict_dataset(
    net: &FractureNet,
    dataset: &FolderDataset,
    batch_size: usize,
    tta: Tta,
    device: &Device,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(dataset.len());
    let indices: Vec<usize> = (0..dataset.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let Batch { images, .. } = make_batch(dataset, chunk, None)?;
        out.extend(predict_images(net, &images, tta, device)?);
    }
    Ok(out)
}

/// Whether each image of the dataset is fractured, in dataset order.
pub fn truth(dataset: &FolderDataset) -> Vec<bool> {
    dataset.items().iter().map(|i| i.label.is_fractured()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_model::{Model, ModelConfig};

    #[test]
    fn tta_averages_the_four_flips() {
        let model = Model::new(&ModelConfig::seed(16), 3, &Device::Cpu).unwrap();
        let images = Array3::from_shape_fn((2, 16, 16), |(b, y, x)| ((b * 7 + y * 3 + x) % 11) as f32 / 10.0);
        let plain = predict_images(&model.net, &images, Tta::Off, &Device::Cpu).unwrap();
        let tta = predict_images(&model.net, &images, Tta::Flips, &Device::Cpu).unwrap();
        let mirror = predict_images(&model.net, &images, Tta::Mirror, &Device::Cpu).unwrap();
        let mut manual = plain.clone();
        let mut h = images.clone();
        h.invert_axis(Axis(2));
        let mut v = images.clone();
        v.invert_axis(Axis(1));
        let mut hv = h.clone();
        hv.invert_axis(Axis(1));
        assert_eq!(h[[1, 3, 0]], images[[1, 3, 15]]);
        let mirrored = predict_images(&model.net, &h, Tta::Off, &Device::Cpu).unwrap();
        for ((m, p), q) in mirror.iter().zip(&plain).zip(&mirrored) {
            assert!((m - (p + q) / 2.0).abs() < 1e-12);
        }
        for v in [h, v, hv] {
            for (m, q) in manual
                .iter_mut()
                .zip(predict_images(&model.net, &v, Tta::Off, &Device::Cpu).unwrap())
            {
                *m += q;
            }
        }
        for (t, m) in tta.iter().zip(&manual) {
            assert!((t - m / 4.0).abs() < 1e-12);
        }
        assert_ne!(plain, tta);
    }
}
