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
}
