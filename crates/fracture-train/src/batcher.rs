//! From `ndarray` batches to tensors on a device.

use candle_core::{Device, Tensor};
use fracture_data::Batch;
use fracture_data::ndarray::{ArrayView2, ArrayView3, Axis};

use crate::Result;

/// The images of a batch as `(B, 1, H, W)` f32 and its targets as `(B,)` f32 (1.0 = fractured), on
/// `device`.
pub(crate) fn batch_to_tensors(batch: &Batch, device: &Device) -> Result<(Tensor, Tensor)> {
    let images = images_to_tensor(batch.images.view(), device)?;
    let targets = Tensor::from_vec(batch.targets(), batch.images.dim().0, device)?;
    Ok((images, targets))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_data::Label;
    use fracture_data::ndarray::Array3;

    #[test]
    fn shapes_and_targets() {
        let batch = Batch {
            images: Array3::from_shape_fn((3, 4, 5), |(b, y, x)| (b * 100 + y * 10 + x) as f32),
            labels: vec![Label::Fractured, Label::NotFractured, Label::Fractured],
            indices: vec![0, 1, 2],
        };
        let (x, y) = batch_to_tensors(&batch, &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[3, 1, 4, 5]);
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()[20 + 2 * 5 + 3],
            123.0
        );
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![1.0, 0.0, 1.0]);
    }
}
