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
    let softplus = (logits.relu()? + logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    let loss = match pos_weight {
        None => (softplus - (logits * targets)?)?,
        Some(w) => {
            let scale = targets.affine(w - 1.0, 1.0)?;
            ((softplus * scale)? - (logits * targets)?.affine(w, 0.0)?)?
        }
    };
    Ok(loss.mean_all()?)
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
