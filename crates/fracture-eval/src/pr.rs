//! Precision-recall: the curve and average precision.

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::roc::check_scores;
use crate::sweep::TieGroups;

/// One point of a precision-recall curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrPoint {
    /// Decisions are `score >= threshold`.
    pub threshold: f64,
    /// Recall (sensitivity) at this threshold.
    pub recall: f64,
    /// Precision (PPV) at this threshold.
    pub precision: f64,
}

/// The precision-recall curve: one point per distinct score, from the highest down (recall rising).
/// `None` when there is no fractured case.
pub fn pr_curve(scores: &[f64], actual: &[bool]) -> Result<Option<Vec<PrPoint>>> {
    check_scores(scores, actual)?;
    let n_pos = actual.iter().filter(|&&a| a).count() as f64;
    if n_pos == 0.0 {
        return Ok(None);
    }
    let mut points = Vec::new();
    TieGroups::new(scores).sweep(
        scores,
        actual,
        |_| 1.0,
        |s| {
            points.push(PrPoint {
                threshold: s.threshold,
                recall: s.tp / n_pos,
                precision: s.tp / (s.tp + s.fp),
            });
        },
    );
    Ok(Some(points))
}

/// Average precision: `Σ (Rₖ − Rₖ₋₁) · Pₖ` over the curve's points (the step-wise area under the
/// precision-recall curve, without interpolation, as scikit-learn computes it). `None` when there is
/// no fractured case.
///
/// ```
/// use fracture_eval::average_precision;
/// assert_eq!(average_precision(&[0.9, 0.8, 0.1], &[true, true, false]).unwrap(), Some(1.0));
/// // Positive ranked second of two: precision 1/2 at recall 1.
/// assert_eq!(average_precision(&[0.9, 0.8], &[false, true]).unwrap(), Some(0.5));
/// ```
pub fn average_precision(scores: &[f64], actual: &[bool]) -> Result<Option<f64>> {
    check_scores(scores, actual)?;
    let positives = actual.iter().filter(|&&a| a).count() as f64;
    if positives == 0.0 {
        return Ok(None);
    }
    Ok(Some(TieGroups::new(scores).average_precision(
        scores,
        actual,
        |_| 1.0,
        positives,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ap_lies_in_unit_range_and_perfect_ranking_scores_one(
            pairs in proptest::collection::vec((0.0f64..1.0, any::<bool>()), 1..80)
        ) {
            let scores: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let actual: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            if let Some(ap) = average_precision(&scores, &actual).unwrap() {
                prop_assert!((0.0..=1.0).contains(&ap));
            }
            let perfect: Vec<f64> = actual.iter().map(|&a| if a { 1.0 } else { 0.0 }).collect();
            if actual.iter().any(|&a| a) {
                prop_assert_eq!(average_precision(&perfect, &actual).unwrap(), Some(1.0));
            }
        }
    }

    #[test]
    fn known_curve() {
        // Scores 0.9(+) 0.8(−) 0.7(+) 0.1(−): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
        let scores = [0.9, 0.8, 0.7, 0.1];
        let actual = [true, false, true, false];
        let curve = pr_curve(&scores, &actual).unwrap().unwrap();
        assert_eq!(curve.len(), 4);
        assert_eq!((curve[0].recall, curve[0].precision), (0.5, 1.0));
        assert_eq!((curve[2].recall, curve[2].precision), (1.0, 2.0 / 3.0));
        let ap = average_precision(&scores, &actual).unwrap().unwrap();
        assert!((ap - (0.5 * 1.0 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
        assert_eq!(average_precision(&[0.3], &[false]).unwrap(), None);
    }
}
