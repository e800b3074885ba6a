//! From `ndarray` batches to tensors on a device.

use candle_core::{Device, Tensor};
use fracture_data::Batch;

use crate::{Result, images_to_tensor};

/// The images of a batch as `(B, 1, H, W)` f32 and its targets as `(B,)` f32 (1.0 = fractured), on
/// `device`.
pub(crate) fn batch_to_tensors(batch: &Batch, device: &Device) -> Result<(Tensor, Tensor)> {
    let images = images_to_tensor(batch.images.view(), device)?;
    let targets = Tensor::from_vec(batch.targets(), batch.images.dim().0, device)?;
    Ok((images, targets))
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
