//! Tensor operations the networks need, written so that their backward passes are right.

use candle_core::{Result, Tensor};
use rand::Rng;

/// 2×2 max pooling with stride 2 on `(B, C, H, W)`, giving `(B, C, H/2, W/2)`; an odd last row or
/// column is dropped (floor division, as in PyTorch and Keras).
///
/// Written as reshape + two `max` reductions rather than `Tensor::max_pool2d`, whose backward pass
/// on the CPU in candle 0.11 gives gradients 10-20× too small to the layers below it. On exact ties
/// the gradient goes to every maximal element.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    if h2 == 0 || w2 == 0 {
        candle_core::bail!("max_pool2x2: input {h}×{w} is smaller than the 2×2 window");
    }
    let mut x = x.clone();
    if h % 2 == 1 {
        x = x.narrow(2, 0, h2 * 2)?;
    }
    if w % 2 == 1 {
        x = x.narrow(3, 0, w2 * 2)?;
    }
    x.contiguous()?.reshape((b, c, h2, 2, w2, 2))?.max(5)?.max(3)
}

/// Inverted dropout with a caller-supplied generator: each element is zeroed with probability `p`
/// and the survivors are scaled by `1 / (1 - p)`. The mask is drawn on the host, so the same
/// generator state gives the same mask on every device. `p = 0` returns the input unchanged.
pub fn dropout(x: &Tensor, p: f32, rng: &mut impl Rng) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability has to be in [0, 1), got {p}")
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let threshold = (f64::from(p) * f64::from(u32::MAX)) as u32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_u32() >= threshold { scale } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn pool_takes_window_maxima_and_drops_odd_edges() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 35.0, &dev)
            .unwrap()
            .reshape((1, 1, 5, 7))
            .unwrap();
        let y = max_pool2x2(&x).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 3]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![8., 10., 12., 22., 24., 26.]
        );
        let reference = x
            .narrow(2, 0, 4)
            .unwrap()
            .narrow(3, 0, 6)
            .unwrap()
            .max_pool2d(2)
            .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            reference.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn pool_gradient_routes_to_the_maxima() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1f64, 5., 2., 0., 3., 4., 9., 8.], (1, 1, 2, 4), &dev).unwrap();
        let y = max_pool2x2(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(gx, vec![0., 1., 0., 0., 0., 0., 1., 0.]);
    }

    #[test]
    fn dropout_is_seeded_scaled_and_about_p() {
        let dev = Device::Cpu;
        let x = Tensor::ones(10_000, DType::F32, &dev).unwrap();
        let a = dropout(&x, 0.5, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = dropout(&x, 0.5, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
        let kept = a.iter().filter(|&&v| v > 0.0).count();
        assert!((4_700..5_300).contains(&kept), "{kept}");
        let same = dropout(&x, 0.0, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(same.iter().all(|&v| v == 1.0));
        assert!(dropout(&x, 1.0, &mut ChaCha8Rng::seed_from_u64(1)).is_err());
    }
}
