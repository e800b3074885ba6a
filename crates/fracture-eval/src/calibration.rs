//! Calibration: do predicted probabilities match observed frequencies?

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

fn check_probabilities(probs: &[f64], actual: &[bool]) -> Result<()> {
    if probs.len() != actual.len() {
        return Err(Error::LengthMismatch {
            predictions: probs.len(),
            labels: actual.len(),
        });
    }
    if let Some((i, &p)) = probs.iter().enumerate().find(|(_, p)| !(0.0..=1.0).contains(*p)) {
        return Err(Error::InvalidValue {
            what: format!("probability {i}"),
            value: p,
        });
    }
    Ok(())
}

/// Brier score: mean of `(p − y)²` with `y` = 1 for fractured. 0 is perfect; `None` for no cases.
///
/// ```
/// use fracture_eval::brier_score;
/// assert_eq!(brier_score(&[1.0, 0.0], &[true, false]).unwrap(), Some(0.0));
/// assert_eq!(brier_score(&[0.5, 0.5], &[true, false]).unwrap(), Some(0.25));
/// ```
pub fn brier_score(probs: &[f64], actual: &[bool]) -> Result<Option<f64>> {
    check_probabilities(probs, actual)?;
    if probs.is_empty() {
        return Ok(None);
    }
    let sum: f64 = probs
        .iter()
        .zip(actual)
        .map(|(&p, &a)| (p - f64::from(u8::from(a))).powi(2))
        .sum();
    Ok(Some(sum / probs.len() as f64))
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    /// Lower edge of the bin (inclusive) on P(fractured).
    pub lower: f64,
    /// Upper edge (exclusive, except 1.0 in the last bin).
    pub upper: f64,
    /// Cases whose probability falls in the bin.
    pub count: usize,
    /// Their mean predicted probability (`None` when empty).
    pub mean_predicted: Option<f64>,
    /// The share of them that are fractured (`None` when empty).
    pub observed: Option<f64>,
}

/// Reliability diagram with `bins` equal-width bins on [0, 1].
pub fn calibration_bins(probs: &[f64], actual: &[bool], bins: usize) -> Result<Vec<CalibrationBin>> {
    check_probabilities(probs, actual)?;
    let bins = bins.max(1);
    let mut count = vec![0usize; bins];
    let mut sum_p = vec![0.0; bins];
    let mut pos = vec![0usize; bins];
    for (&p, &a) in probs.iter().zip(actual) {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        count[b] += 1;
        sum_p[b] += p;
        pos[b] += usize::from(a);
    }
    Ok((0..bins)
        .map(|b| CalibrationBin {
            lower: b as f64 / bins as f64,
            upper: (b + 1) as f64 / bins as f64,
            count: count[b],
            mean_predicted: (count[b] > 0).then(|| sum_p[b] / count[b] as f64),
            observed: (count[b] > 0).then(|| pos[b] as f64 / count[b] as f64),
        })
        .collect())
}

/// Expected calibration error over `bins` equal-width bins: `Σ (nᵦ / n) · |observedᵦ − mean_predictedᵦ|`.
/// 0 is perfectly calibrated; `None` for no cases.
pub fn expected_calibration_error(probs: &[f64], actual: &[bool], bins: usize) -> Result<Option<f64>> {
    let table = calibration_bins(probs, actual, bins)?;
    if probs.is_empty() {
        return Ok(None);
    }
    let n = probs.len() as f64;
    Ok(Some(
        table
            .iter()
            .filter_map(|b| Some(b.count as f64 / n * (b.observed? - b.mean_predicted?).abs()))
            .sum(),
    ))
}

/// `ln(p / (1 − p))` with `p` clamped to `[1e-12, 1 − 1e-12]`, so 0 and 1 map to finite values.
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Platt scaling: a calibrated probability `sigmoid(a · z + b)` from a model's logit `z`.
///
/// A classifier trained with a class-weighted loss ranks well but reports inflated probabilities;
/// two numbers fitted on held-out images map its logits onto observed frequencies. With `a > 0` the
/// map is increasing, so rankings (ROC-AUC, PR-AUC) and decisions at a correspondingly mapped
/// threshold are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Platt {
    /// Slope on the logit (> 0); below 1 the model was over-confident.
    pub a: f64,
    /// Offset on the logit; negative when the model over-estimated P(fractured).
    pub b: f64,
}

impl Platt {
    /// The identity map (`a = 1`, `b = 0`).
    pub const IDENTITY: Platt = Platt { a: 1.0, b: 0.0 };

    /// Fits `a` and `b` by Newton's method on the log-loss of `logits` against `actual`, with
    /// Platt's smoothed targets (`(N₊ + 1) / (N₊ + 2)` and `1 / (N₋ + 2)`, which keep the fit finite on
    /// separable data). `None` when a class is absent or the fit is not increasing (`a ≤ 0`).
    ///
    /// ```
    /// use fracture_eval::Platt;
    /// // 20 levels u, 50 images each, of which round(50·sigmoid(u)) fractured; the model reports
    /// // 2u + 1 (over-confident and shifted): the fit undoes it, a ≈ 0.5 and b ≈ −0.5.
    /// let (mut z, mut truth) = (Vec::new(), Vec::new());
    /// for k in 0..20 {
    ///     let u = -3.0 + 6.0 * k as f64 / 19.0;
    ///     let pos = (50.0 / (1.0 + (-u as f64).exp())).round() as usize;
    ///     for i in 0..50 {
    ///         z.push(2.0 * u + 1.0);
    ///         truth.push(i < pos);
    ///     }
    /// }
    /// let p = Platt::fit(&z, &truth).unwrap().unwrap();
    /// assert!((p.a - 0.5).abs() < 0.05 && (p.b + 0.5).abs() < 0.1, "{p:?}");
    /// ```
    pub fn fit(logits: &[f64], actual: &[bool]) -> Result<Option<Platt>> {
        if logits.len() != actual.len() {
            return Err(Error::LengthMismatch {
                predictions: logits.len(),
                labels: actual.len(),
            });
        }
        if let Some((i, &z)) = logits.iter().enumerate().find(|(_, z)| !z.is_finite()) {
            return Err(Error::InvalidValue {
                what: format!("logit {i}"),
                value: z,
            });
        }
        let pos = actual.iter().filter(|&&a| a).count() as f64;
        let neg = actual.len() as f64 - pos;
        if pos == 0.0 || neg == 0.0 {
            return Ok(None);
        }
        let (hi, lo) = ((pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0));
        let target: Vec<f64> = actual.iter().map(|&a| if a { hi } else { lo }).collect();
        let loss = |a: f64, b: f64| -> f64 {
            logits
                .iter()
                .zip(&target)
                .map(|(&z, &t)| {
                    let f = a * z + b;
                    // −[t·log σ(f) + (1 − t)·log(1 − σ(f))] = softplus(f) − t·f, computed stably.
                    f.max(0.0) + (-f.abs()).exp().ln_1p() - t * f
                })
                .sum()
        };
        let (mut a, mut b) = (1.0, 0.0);
        let mut current = loss(a, b);
        for _ in 0..100 {
            let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for (&z, &t) in logits.iter().zip(&target) {
                let p = sigmoid(a * z + b);
                let (d, w) = (p - t, (p * (1.0 - p)).max(1e-12));
                ga += d * z;
                gb += d;
                haa += w * z * z;
                hab += w * z;
                hbb += w;
            }
            // A small ridge keeps the 2×2 system solvable when all logits are equal.
            let (haa, hbb) = (haa + 1e-9, hbb + 1e-9);
            let det = haa * hbb - hab * hab;
            if det.abs() < 1e-300 {
                break;
            }
            let da = (hbb * ga - hab * gb) / det;
            let db = (haa * gb - hab * ga) / det;
            // Backtracking: halve the Newton step until the loss does not rise.
            let mut step = 1.0;
            let mut moved = false;
            while step > 1e-10 {
                let (na, nb) = (a - step * da, b - step * db);
                let l = loss(na, nb);
                if l <= current {
                    let gain = current - l;
                    (a, b, current, moved) = (na, nb, l, true);
                    if gain < 1e-12 * (1.0 + current.abs()) {
                        step = 0.0;
                    }
                    break;
                }
                step *= 0.5;
            }
            if !moved || step == 0.0 {
                break;
            }
        }
        Ok((a > 0.0 && a.is_finite() && b.is_finite()).then_some(Platt { a, b }))
    }

    /// The calibrated probability of logit `z`.
    pub fn apply_logit(&self, z: f64) -> f64 {
        sigmoid(self.a * z + self.b)
    }

    /// The calibrated probability of an uncalibrated probability `p` (through its [`logit`]; used
    /// where probabilities were averaged, as in test-time augmentation).
    pub fn apply(&self, p: f64) -> f64 {
        if p.is_nan() {
            return p;
        }
        self.apply_logit(logit(p))
    }
}

/// Cross-fitted calibration: the images are split into `folds` stratified folds (seeded); each
/// fold's probabilities come from a [`Platt`] fit on the other folds. The result is what the
/// calibration would give on images it was not fitted on, so its ECE is an honest estimate.
/// `None` when a fold's complement lacks a class or its fit is not increasing.
///
/// ```
/// use fracture_eval::{cross_fitted_platt, expected_calibration_error};
/// let (mut z, mut truth) = (Vec::new(), Vec::new());
/// for k in 0..20 {
///     let u = -3.0 + 6.0 * k as f64 / 19.0;
///     let pos = (30.0 / (1.0 + (-u as f64).exp())).round() as usize;
///     for i in 0..30 {
///         z.push(3.0 * u + 2.0);
///         truth.push(i < pos);
///     }
/// }
/// let raw: Vec<f64> = z.iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
/// let cal = cross_fitted_platt(&z, &truth, 5, 0).unwrap().unwrap();
/// let before = expected_calibration_error(&raw, &truth, 10).unwrap().unwrap();
/// let after = expected_calibration_error(&cal, &truth, 10).unwrap().unwrap();
/// assert!(after < before / 2.0, "{after} vs {before}");
/// ```
pub fn cross_fitted_platt(
    logits: &[f64],
    actual: &[bool],
    folds: usize,
    seed: u64,
) -> Result<Option<Vec<f64>>> {
    if logits.len() != actual.len() {
        return Err(Error::LengthMismatch {
            predictions: logits.len(),
            labels: actual.len(),
        });
    }
    let folds = folds.max(2);
    // Stratified: each class shuffled (seeded), then dealt round-robin into the folds.
    let mut fold = vec![0usize; logits.len()];
    let mut rng = crate::bootstrap::SplitMix(seed ^ 0x706c_6174_7400_0000);
    for class in [true, false] {
        let mut idx: Vec<usize> = (0..actual.len()).filter(|&i| actual[i] == class).collect();
        for i in (1..idx.len()).rev() {
            idx.swap(i, rng.below(i + 1));
        }
        for (k, &i) in idx.iter().enumerate() {
            fold[i] = k % folds;
        }
    }
    let mut out = vec![0.0; logits.len()];
    for f in 0..folds {
        let (z, a): (Vec<f64>, Vec<bool>) = (0..logits.len())
            .filter(|&i| fold[i] != f)
            .map(|i| (logits[i], actual[i]))
            .unzip();
        let Some(platt) = Platt::fit(&z, &a)? else {
            return Ok(None);
        };
        for i in (0..logits.len()).filter(|&i| fold[i] == f) {
            out[i] = platt.apply_logit(logits[i]);
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfectly_calibrated_bins_have_zero_error() {
        // In the 0.2 bin one of five is fractured; in the 0.8 bin four of five.
        let mut probs = vec![0.2; 5];
        probs.extend([0.8; 5]);
        let actual = [true, false, false, false, false, true, true, true, true, false];
        let ece = expected_calibration_error(&probs, &actual, 10).unwrap().unwrap();
        assert!(ece.abs() < 1e-12, "{ece}");
        let bins = calibration_bins(&probs, &actual, 10).unwrap();
        assert_eq!(bins[2].count, 5);
        assert_eq!(bins[8].observed, Some(0.8));
        assert_eq!(bins[0].mean_predicted, None);
    }

    #[test]
    fn overconfidence_shows() {
        let probs = [0.99, 0.99, 0.99, 0.99];
        let actual = [true, false, true, false];
        let ece = expected_calibration_error(&probs, &actual, 10).unwrap().unwrap();
        assert!((ece - 0.49).abs() < 1e-12);
        assert!(brier_score(&[1.5], &[true]).is_err());
        assert_eq!(brier_score(&[], &[]).unwrap(), None);
    }

    #[test]
    fn platt_recovers_a_known_distortion() {
        // Truth drawn from sigmoid(z); the model reports 2.5·z + 1.5.
        let mut state = 17u64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let z: Vec<f64> = (0..4000).map(|i| (i as f64 / 4000.0) * 8.0 - 4.0).collect();
        let truth: Vec<bool> = z.iter().map(|&z| uniform() < sigmoid(z)).collect();
        let reported: Vec<f64> = z.iter().map(|z| 2.5 * z + 1.5).collect();
        let p = Platt::fit(&reported, &truth).unwrap().unwrap();
        // a·(2.5z + 1.5) + b ≈ z  ⇒  a ≈ 0.4, b ≈ −0.6.
        assert!((p.a - 0.4).abs() < 0.05 && (p.b + 0.6).abs() < 0.15, "{p:?}");
        assert!((p.apply(0.5) - p.apply_logit(0.0)).abs() < 1e-12);
        assert_eq!(Platt::fit(&[0.1, 0.2], &[true, true]).unwrap(), None);
        assert!(Platt::fit(&[f64::NAN], &[true]).is_err());
        // Anti-correlated scores give no increasing fit.
        let flipped: Vec<f64> = reported.iter().map(|z| -z).collect();
        assert_eq!(Platt::fit(&flipped, &truth).unwrap(), None);
    }
}
