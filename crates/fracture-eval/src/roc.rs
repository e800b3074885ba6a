//! Ranking quality: the ROC curve and the area under it.

use serde::{Deserialize, Serialize};

use crate::sweep::TieGroups;
use crate::{Error, Result};

/// Checks lengths and that no score is NaN.
pub(crate) fn check_scores(scores: &[f64], actual: &[bool]) -> Result<()> {
    if scores.len() != actual.len() {
        return Err(Error::LengthMismatch {
            predictions: scores.len(),
            labels: actual.len(),
        });
    }
    if let Some((i, &s)) = scores.iter().enumerate().find(|(_, s)| s.is_nan()) {
        return Err(Error::InvalidValue {
            what: format!("score {i}"),
            value: s,
        });
    }
    Ok(())
}

/// Area under the ROC curve of `scores` (higher = more likely fractured) against `actual`
/// (`true` = fractured), computed exactly as the Mann-Whitney statistic with average ranks for ties:
/// the probability that a random fractured case scores above a random intact one, ties counting
/// one half. `None` when either class is absent.
///
/// ```
/// use fracture_eval::roc_auc;
/// assert_eq!(roc_auc(&[0.9, 0.8, 0.3, 0.1], &[true, true, false, false]).unwrap(), Some(1.0));
/// assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]).unwrap(), Some(0.5));
/// assert_eq!(roc_auc(&[0.5, 0.7], &[true, true]).unwrap(), None);
/// ```
pub fn roc_auc(scores: &[f64], actual: &[bool]) -> Result<Option<f64>> {
    check_scores(scores, actual)?;
    let n_pos = actual.iter().filter(|&&a| a).count();
    let n_neg = actual.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return Ok(None);
    }
    let (p, n) = (n_pos as f64, n_neg as f64);
    Ok(Some(TieGroups::new(scores).auc(scores, actual, |_| 1.0, p, n)))
}

/// One point of a ROC curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RocPoint {
    /// Decisions are `score >= threshold`.
    pub threshold: f64,
    /// False-positive rate, 1 − specificity.
    pub fpr: f64,
    /// True-positive rate, sensitivity.
    pub tpr: f64,
}

/// The ROC curve: one point per distinct score (from the highest down), after a first point at
/// `threshold = +∞` (nothing called fractured). `None` when either class is absent.
pub fn roc_curve(scores: &[f64], actual: &[bool]) -> Result<Option<Vec<RocPoint>>> {
    check_scores(scores, actual)?;
    let n_pos = actual.iter().filter(|&&a| a).count() as f64;
    let n_neg = actual.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return Ok(None);
    }
    let mut points = vec![RocPoint {
        threshold: f64::INFINITY,
        fpr: 0.0,
        tpr: 0.0,
    }];
    TieGroups::new(scores).sweep(
        scores,
        actual,
        |_| 1.0,
        |s| {
            points.push(RocPoint {
                threshold: s.threshold,
                fpr: s.fp / n_neg,
                tpr: s.tp / n_pos,
            });
        },
    );
    Ok(Some(points))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition: the share of (positive, negative) pairs ordered correctly, ties one half.
    fn naive_auc(scores: &[f64], actual: &[bool]) -> Option<f64> {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, &ai) in actual.iter().enumerate() {
            for (j, &aj) in actual.iter().enumerate() {
                if ai && !aj {
                    pairs += 1.0;
                    if scores[i] > scores[j] {
                        wins += 1.0;
                    } else if scores[i] == scores[j] {
                        wins += 0.5;
                    }
                }
            }
        }
        (pairs > 0.0).then(|| wins / pairs)
    }

    fn trapezoid(points: &[RocPoint]) -> f64 {
        points
            .windows(2)
            .map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0)
            .sum()
    }

    proptest! {
        #[test]
        fn auc_equals_the_naive_mann_whitney_statistic(
            pairs in proptest::collection::vec((0u8..8, any::<bool>()), 0..60)
        ) {
            // Few distinct scores, so ties are common.
            let scores: Vec<f64> = pairs.iter().map(|p| f64::from(p.0) / 8.0).collect();
            let actual: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            let fast = roc_auc(&scores, &actual).unwrap();
            let slow = naive_auc(&scores, &actual);
            prop_assert_eq!(fast.is_some(), slow.is_some());
            if let (Some(a), Some(b)) = (fast, slow) {
                prop_assert!((a - b).abs() < 1e-12, "{} vs {}", a, b);
                let curve = roc_curve(&scores, &actual).unwrap().unwrap();
                prop_assert!((trapezoid(&curve) - a).abs() < 1e-12);
            }
        }

        #[test]
        fn a_perfect_ranking_has_auc_one(pairs in proptest::collection::vec((0.0f64..1.0, any::<bool>()), 2..60)) {
            let actual: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            // Every fractured case scores above every intact one.
            let scores: Vec<f64> = pairs.iter().map(|&(u, a)| if a { 1.0 + u } else { u }).collect();
            let auc = roc_auc(&scores, &actual).unwrap();
            if actual.iter().any(|&a| a) && actual.iter().any(|&a| !a) {
                prop_assert_eq!(auc, Some(1.0));
            } else {
                prop_assert_eq!(auc, None);
            }
        }

        #[test]
        fn auc_is_invariant_under_monotone_transforms(
            pairs in proptest::collection::vec((0.0f64..1.0, any::<bool>()), 2..60)
        ) {
            let scores: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let actual: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            let logit: Vec<f64> = scores.iter().map(|p| (p / (1.0 - p)).ln() * 3.0 + 1.0).collect();
            prop_assert_eq!(roc_auc(&scores, &actual).unwrap(), roc_auc(&logit, &actual).unwrap());
        }
    }

    #[test]
    fn perfect_reversed_and_constant_rankings() {
        let actual = [true, true, false, false, false];
        assert_eq!(roc_auc(&[5.0, 4.0, 3.0, 2.0, 1.0], &actual).unwrap(), Some(1.0));
        assert_eq!(roc_auc(&[1.0, 2.0, 3.0, 4.0, 5.0], &actual).unwrap(), Some(0.0));
        assert_eq!(roc_auc(&[0.3; 5], &actual).unwrap(), Some(0.5));
        assert!(roc_auc(&[0.1, f64::NAN], &[true, false]).is_err());
        assert!(roc_auc(&[0.1], &[true, false]).is_err());
    }
}
