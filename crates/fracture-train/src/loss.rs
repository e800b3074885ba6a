//! Numerically stable binary cross-entropy on logits.

use candle_core::Tensor;

use crate::Result;

/// Mean binary cross-entropy of fracture logits `(B,)` against targets `(B,)` (1.0 = fractured),
/// computed without ever forming `sigmoid(x)` or `log(sigmoid(x))`:
///
/// `loss_i = (1 + (w − 1)·y) · softplus(x) − w·y·x`, with `softplus(x) = max(x, 0) + ln(1 + e^(−|x|))`
///
/// where `w` is the positive-class weight (1 when `None`), as in PyTorch's
/// `BCEWithLogitsLoss(pos_weight=w)`. For `w = 1` this is `max(x,0) − x·y + ln(1 + e^(−|x|))`. It is
/// finite for any finite logit (candle's `binary_cross_entropy_with_logit` overflows to NaN), and its
/// gradient is `(sigmoid(x)·(1 + (w − 1)·y) − w·y) / B`, exact also at `x = 0`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor, pos_weight: Option<f64>) -> Result<Tensor> {
    let softplus = softplus(logits)?;
    let loss = match pos_weight {
        None => (softplus - (logits * targets)?)?,
        Some(w) => {
            let scale = targets.affine(w - 1.0, 1.0)?;
            ((softplus * scale)? - (logits * targets)?.affine(w, 0.0)?)?
        }
    };
    Ok(loss.mean_all()?)
}

/// The localization loss of a map of logits `(B, H, W)` against box coverage `(B, H, W)` in [0, 1]
/// (the share of each cell inside an annotated box), as the mean of two terms:
///
/// - per-cell binary cross-entropy, averaged over cells and over the images with `cell_weight` 1
///   (fractured images with boxes, and not-fractured images, whose coverage is 0 everywhere);
/// - the cross-entropy of the map's spatial softmax against the coverage normalised to sum 1,
///   `−Σ_ij t_ij · log softmax(x)_ij`, over the images with `point_weight` 1 (fractured images whose
///   boxes are in view): it pulls the map's peak into the box.
///
/// `cell_weight` and `point_weight` are `(B,)` of 0 or 1; a term without images is 0. Every part is
/// finite for finite logits.
pub fn localization_loss(
    logits: &Tensor,
    coverage: &Tensor,
    cell_weight: &Tensor,
    point_weight: &Tensor,
) -> Result<Tensor> {
    let (b, h, w) = logits.dims3()?;
    let x = logits.reshape((b, h * w))?;
    let t = coverage.reshape((b, h * w))?;
    let per_cell = (softplus(&x)? - (&x * &t)?)?.mean(1)?;
    let cells = scalar(&cell_weight.sum_all()?)?;
    let cell_term = (per_cell * cell_weight)?
        .sum_all()?
        .affine(1.0 / cells.max(1.0), 0.0)?;
    // A tiny floor keeps images without coverage (weight 0) finite.
    let mass = t.sum_keepdim(1)?.affine(1.0, 1e-12)?;
    let target = t.broadcast_div(&mass)?;
    let per_image = (target * log_softmax(&x)?)?.neg()?.sum(1)?;
    let points = scalar(&point_weight.sum_all()?)?;
    let point_term = (per_image * point_weight)?
        .sum_all()?
        .affine(1.0 / points.max(1.0), 0.0)?;
    Ok(((cell_term + point_term)? * 0.5)?)
}

/// `softplus(x) = max(x, 0) + ln(1 + e^(−|x|))`, finite for every finite `x`: both losses' one
/// stable `−ln sigmoid(−x)`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// `log softmax` over the last dimension of `(B, N)`, stable: `x − max − ln Σ exp(x − max)`.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    /// The textbook definition in f64, fine for moderate logits.
    fn reference(x: f64, y: f64, w: f64) -> f64 {
        let p = 1.0 / (1.0 + (-x).exp());
        -(w * y * p.ln() + (1.0 - y) * (1.0 - p).ln())
    }

    fn loss_of(x: f64, y: f64, w: Option<f64>) -> f64 {
        let dev = Device::Cpu;
        let xt = Tensor::new(&[x], &dev).unwrap();
        let yt = Tensor::new(&[y], &dev).unwrap();
        bce_with_logits(&xt, &yt, w).unwrap().to_scalar::<f64>().unwrap()
    }

    fn check_matches_reference(x: f64, y: f64, w: f64) -> Result<(), TestCaseError> {
        let got = loss_of(x, y, Some(w));
        let want = reference(x, y, w);
        prop_assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1.0),
            "x={} y={} w={}: {} vs {}",
            x,
            y,
            w,
            got,
            want
        );
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_the_f64_reference_for_moderate_logits(x in -10.0f64..10.0, y in prop_oneof![Just(0.0), Just(1.0)], w in 0.1f64..10.0) {
            check_matches_reference(x, y, w)?;
        }

        #[test]
        fn stays_finite_for_huge_logits(x in -1e4f64..1e4, y in prop_oneof![Just(0.0), Just(1.0)]) {
            let v = loss_of(x, y, None);
            prop_assert!(v.is_finite() && v >= 0.0);
            let f32_loss = bce_with_logits(
                &Tensor::new(&[x as f32], &Device::Cpu).unwrap(),
                &Tensor::new(&[y as f32], &Device::Cpu).unwrap(),
                None,
            ).unwrap().to_scalar::<f32>().unwrap();
            prop_assert!(f32_loss.is_finite());
        }
    }

    #[test]
    fn localization_loss_matches_its_definition_and_finite_differences() {
        let dev = Device::Cpu;
        let xs: Vec<f64> = (0..2 * 2 * 3)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.7)
            .collect();
        let ts = [
            0.0, 0.5, 0.0, 1.0, 0.0, 0.0, // image 0: a box over two cells
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, // image 1: not fractured
        ];
        let cell_w = [1.0, 1.0];
        let point_w = [1.0, 0.0];
        let reference = |x: &[f64]| -> f64 {
            let mut cell = 0.0;
            for i in 0..2 {
                let mut s = 0.0;
                for j in 0..6 {
                    let (v, t) = (x[i * 6 + j], ts[i * 6 + j]);
                    let p = 1.0 / (1.0 + (-v).exp());
                    s += -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
                }
                cell += cell_w[i] * s / 6.0;
            }
            cell /= 2.0;
            let z: f64 = x[..6].iter().map(|v| v.exp()).sum();
            let point: f64 = (0..6).map(|j| -(ts[j] / 1.5) * (x[j].exp() / z).ln()).sum();
            0.5 * (cell + point)
        };
        let x = Var::new(&xs[..], &dev).unwrap();
        let loss = localization_loss(
            &x.as_tensor().reshape((2, 2, 3)).unwrap(),
            &Tensor::new(&ts[..], &dev).unwrap().reshape((2, 2, 3)).unwrap(),
            &Tensor::new(&cell_w[..], &dev).unwrap(),
            &Tensor::new(&point_w[..], &dev).unwrap(),
        )
        .unwrap();
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - reference(&xs)).abs() < 1e-9, "{got} vs {}", reference(&xs));
        let g = loss
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in 0..xs.len() {
            let eps = 1e-6;
            let (mut up, mut down) = (xs.clone(), xs.clone());
            up[i] += eps;
            down[i] -= eps;
            let numeric = (reference(&up) - reference(&down)) / (2.0 * eps);
            assert!((g[i] - numeric).abs() < 1e-6, "cell {i}: {} vs {numeric}", g[i]);
        }
        // Huge logits stay finite.
        let big = Tensor::new(&[1e4f32, -1e4, 3e3, -2e3], &dev)
            .unwrap()
            .reshape((1, 2, 2))
            .unwrap();
        let t = Tensor::new(&[0f32, 1.0, 0.0, 0.0], &dev)
            .unwrap()
            .reshape((1, 2, 2))
            .unwrap();
        let one = Tensor::new(&[1f32], &dev).unwrap();
        let v = localization_loss(&big, &t, &one, &one)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(v.is_finite() && v > 0.0, "{v}");
    }

    #[test]
    fn extreme_values() {
        assert_eq!(loss_of(1e4, 1.0, None), 0.0);
        assert!((loss_of(-1e4, 1.0, None) - 1e4).abs() < 1e-6);
        assert!((loss_of(0.0, 1.0, None) - std::f64::consts::LN_2).abs() < 1e-15);
    }

    #[test]
    fn gradient_is_exact_including_at_zero() {
        let dev = Device::Cpu;
        for &w in &[1.0, 3.0] {
            let xs = [0.0f64, 0.7, -2.5, 30.0];
            let ys = [1.0f64, 0.0, 1.0, 0.0];
            let x = Var::new(&xs, &dev).unwrap();
            let y = Tensor::new(&ys, &dev).unwrap();
            let loss = bce_with_logits(x.as_tensor(), &y, Some(w)).unwrap();
            let g = loss
                .backward()
                .unwrap()
                .get(&x)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..4 {
                let s = 1.0 / (1.0 + (-xs[i]).exp());
                let want = (s * (1.0 + (w - 1.0) * ys[i]) - w * ys[i]) / 4.0;
                assert!(
                    (g[i] - want).abs() < 1e-12,
                    "w={w} x={}: {} vs {want}",
                    xs[i],
                    g[i]
                );
            }
        }
    }
}
