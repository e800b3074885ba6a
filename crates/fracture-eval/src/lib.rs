#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod bootstrap;
mod calibration;
mod confusion;
mod error;
mod groups;
mod localization;
mod metrics;
mod pr;
mod report;
mod roc;
mod sweep;
mod threshold;

pub use bootstrap::{ConfidenceIntervals, Interval, bootstrap_ci, mean_ci};
pub use calibration::{
    CalibrationBin, Platt, brier_score, calibration_bins, cross_fitted_platt, expected_calibration_error,
    logit,
};
pub use confusion::ConfusionMatrix;
pub use error::{Error, Result};
pub use groups::{GroupReport, MIN_GROUP_CASES, group_report};
pub use localization::{LocalizationReport, Localized, PixelBox, iou, points_inside};
pub use metrics::BinaryMetrics;
pub use pr::{PrPoint, average_precision, pr_curve};
pub use report::{DEFAULT_RESAMPLES, ECE_BINS, EvalReport};
pub use roc::{RocPoint, roc_auc, roc_curve};
pub use threshold::{
    DEFAULT_THRESHOLD, StableThreshold, ThresholdRule, choose_stable_threshold, choose_threshold, decide,
    is_fractured,
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_metrics(pred: &[bool], actual: &[bool]) -> Result<(), TestCaseError> {
        let cm =
            ConfusionMatrix::from_labels(pred, actual).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(cm.total() as usize, pred.len());
        let m = BinaryMetrics::from_confusion(&cm);
        for v in [
            m.accuracy,
            m.precision,
            m.recall,
            m.specificity,
            m.npv,
            m.f1,
            m.balanced_accuracy,
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!((0.0..=1.0).contains(&v), "metric {}", v);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn counts_add_up_and_metrics_lie_in_unit_range(pairs in proptest::collection::vec((any::<bool>(), any::<bool>()), 0..200)) {
            let (pred, actual): (Vec<bool>, Vec<bool>) = pairs.into_iter().unzip();
            check_metrics(&pred, &actual)?;
        }

        #[test]
        fn perfect_predictions_score_one(actual in proptest::collection::vec(any::<bool>(), 1..100)) {
            let m = BinaryMetrics::from_confusion(&ConfusionMatrix::from_labels(&actual, &actual).unwrap());
            prop_assert_eq!(m.accuracy, Some(1.0));
            for v in [m.precision, m.recall, m.specificity, m.npv, m.f1].into_iter().flatten() {
                prop_assert_eq!(v, 1.0);
            }
        }

        #[test]
        fn recall_never_rises_with_the_threshold(
            scores in proptest::collection::vec(0.0f64..1.0, 1..100),
            seed: u64,
            t1 in 0.0f64..1.0,
            t2 in 0.0f64..1.0,
        ) {
            let actual: Vec<bool> = (0..scores.len()).map(|i| (seed >> (i % 64)) & 1 == 1).collect();
            let (lo, hi) = if t1 <= t2 { (t1, t2) } else { (t2, t1) };
            let r_lo = BinaryMetrics::from_confusion(&ConfusionMatrix::from_scores(&scores, &actual, lo).unwrap()).recall;
            let r_hi = BinaryMetrics::from_confusion(&ConfusionMatrix::from_scores(&scores, &actual, hi).unwrap()).recall;
            if let (Some(a), Some(b)) = (r_lo, r_hi) {
                prop_assert!(b <= a);
            }
        }
    }

    #[test]
    fn known_matrix_gives_known_metrics() {
        // 100 cases: 10 fractures of which 8 found, 5 false alarms among 90 intact bones.
        let m = BinaryMetrics::from_confusion(&ConfusionMatrix {
            tp: 8,
            fp: 5,
            tn: 85,
            fn_: 2,
        });
        assert_eq!(m.accuracy, Some(0.93));
        assert_eq!(m.recall, Some(0.8));
        assert_eq!(m.sensitivity(), Some(0.8));
        assert!((m.specificity.unwrap() - 85.0 / 90.0).abs() < 1e-12);
        assert!((m.precision.unwrap() - 8.0 / 13.0).abs() < 1e-12);
        assert!((m.npv.unwrap() - 85.0 / 87.0).abs() < 1e-12);
        assert!((m.f1.unwrap() - 16.0 / 23.0).abs() < 1e-12);
    }

    #[test]
    fn undefined_metrics_are_none_and_bad_inputs_are_errors() {
        let m = BinaryMetrics::from_confusion(&ConfusionMatrix {
            tp: 0,
            fp: 0,
            tn: 5,
            fn_: 0,
        });
        assert_eq!((m.recall, m.precision, m.f1), (None, None, None));
        assert_eq!(m.specificity, Some(1.0));
        assert_eq!(
            ConfusionMatrix::from_labels(&[true, false], &[true]),
            Err(Error::LengthMismatch {
                predictions: 2,
                labels: 1
            })
        );
        assert!(decide(&[0.2, f64::NAN], 0.5).is_err());
        assert!(decide(&[0.2], f64::NAN).is_err());
        assert_eq!(decide(&[0.2, 0.5, 0.9], 0.5).unwrap(), vec![false, true, true]);
    }
}
