//! Everything worth knowing about a classifier on one set of images, in one serialisable value.

use serde::{Deserialize, Serialize};

use crate::{
    BinaryMetrics, ConfidenceIntervals, ConfusionMatrix, Result, average_precision, bootstrap_ci,
    brier_score, expected_calibration_error, roc_auc,
};

/// Bootstrap replicates used by [`EvalReport::new`].
pub const DEFAULT_RESAMPLES: usize = 1000;
/// Bins of the expected calibration error in [`EvalReport::new`].
pub const ECE_BINS: usize = 10;

/// The report of P(fractured) predictions against the truth at one operating threshold.
/// Positive = fractured. Serialises to the keys of `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Number of images.
    pub n: usize,
    /// Number of fractured images.
    pub positives: usize,
    /// The operating threshold on P(fractured): decisions are `p >= threshold`.
    pub threshold: f64,
    /// (TP + TN) / n.
    pub accuracy: Option<f64>,
    /// Positive predictive value, TP / (TP + FP).
    pub precision: Option<f64>,
    /// TP / (TP + FN); the same as `sensitivity`.
    pub recall: Option<f64>,
    /// TP / (TP + FN): the share of fractures found.
    pub sensitivity: Option<f64>,
    /// TN / (TN + FP): the share of intact bones called intact.
    pub specificity: Option<f64>,
    /// Negative predictive value, TN / (TN + FN).
    pub npv: Option<f64>,
    /// 2·TP / (2·TP + FP + FN).
    pub f1: Option<f64>,
    /// (sensitivity + specificity) / 2.
    pub balanced_accuracy: Option<f64>,
    /// Area under the ROC curve (threshold-free).
    pub roc_auc: Option<f64>,
    /// Average precision, the area under the precision-recall curve (threshold-free).
    pub pr_auc: Option<f64>,
    /// Mean squared error of the probabilities (0 is perfect).
    pub brier: Option<f64>,
    /// Expected calibration error over 10 equal-width bins (0 is perfect).
    pub ece: Option<f64>,
    /// The counts behind the threshold metrics.
    pub confusion: ConfusionMatrix,
    /// 95% stratified-bootstrap intervals of ROC-AUC, sensitivity, specificity and accuracy.
    pub ci95: ConfidenceIntervals,
}

impl EvalReport {
    /// The report with [`DEFAULT_RESAMPLES`] bootstrap replicates from seed 0.
    ///
    /// ```
    /// use fracture_eval::EvalReport;
    /// let r = EvalReport::new(&[0.9, 0.7, 0.4, 0.2], &[true, false, true, false], 0.5).unwrap();
    /// assert_eq!((r.n, r.positives), (4, 2));
    /// assert_eq!(r.sensitivity, Some(0.5));
    /// assert_eq!(r.roc_auc, Some(0.75));
    /// ```
    pub fn new(probabilities: &[f64], actual: &[bool], threshold: f64) -> Result<Self> {
        Self::with_bootstrap(probabilities, actual, threshold, DEFAULT_RESAMPLES, 0)
    }

    /// The report with a chosen number of bootstrap replicates and seed.
    pub fn with_bootstrap(
        probabilities: &[f64],
        actual: &[bool],
        threshold: f64,
        resamples: usize,
        seed: u64,
    ) -> Result<Self> {
        let confusion = ConfusionMatrix::from_scores(probabilities, actual, threshold)?;
        let m = BinaryMetrics::from_confusion(&confusion);
        Ok(EvalReport {
            n: actual.len(),
            positives: actual.iter().filter(|&&a| a).count(),
            threshold,
            accuracy: m.accuracy,
            precision: m.precision,
            recall: m.recall,
            sensitivity: m.recall,
            specificity: m.specificity,
            npv: m.npv,
            f1: m.f1,
            balanced_accuracy: m.balanced_accuracy,
            roc_auc: roc_auc(probabilities, actual)?,
            pr_auc: average_precision(probabilities, actual)?,
            brier: brier_score(probabilities, actual)?,
            ece: expected_calibration_error(probabilities, actual, ECE_BINS)?,
            confusion,
            ci95: bootstrap_ci(probabilities, actual, threshold, resamples, seed)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_report(pairs: &[(f64, bool)], threshold: f64) -> Result<(), TestCaseError> {
        let probs: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        let actual: Vec<bool> = pairs.iter().map(|p| p.1).collect();
        let r = EvalReport::with_bootstrap(&probs, &actual, threshold, 50, 1)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let c = r.confusion;
        prop_assert_eq!((c.tp + c.fp + c.tn + c.fn_) as usize, r.n);
        prop_assert_eq!((c.tp + c.fn_) as usize, r.positives);
        let values = [
            r.accuracy,
            r.precision,
            r.recall,
            r.sensitivity,
            r.specificity,
            r.npv,
            r.f1,
            r.balanced_accuracy,
            r.roc_auc,
            r.pr_auc,
            r.brier,
            r.ece,
        ];
        for v in values.into_iter().flatten() {
            prop_assert!((0.0..=1.0).contains(&v), "metric {} outside [0, 1]", v);
        }
        for i in [
            r.ci95.roc_auc,
            r.ci95.sensitivity,
            r.ci95.specificity,
            r.ci95.accuracy,
            r.ci95.pr_auc,
            r.ci95.f1,
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(0.0 <= i.lower && i.lower <= i.upper && i.upper <= 1.0);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn counts_add_up_and_every_metric_lies_in_unit_range(
            pairs in proptest::collection::vec((0.0f64..=1.0, any::<bool>()), 0..120),
            threshold in 0.0f64..=1.0,
        ) {
            check_report(&pairs, threshold)?;
        }
    }

    #[test]
    fn keys_are_the_documented_ones() {
        let r = EvalReport::new(&[0.9, 0.2], &[true, false], 0.5).unwrap();
        let json = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "accuracy",
                "balanced_accuracy",
                "brier",
                "ci95",
                "confusion",
                "ece",
                "f1",
                "n",
                "npv",
                "positives",
                "pr_auc",
                "precision",
                "recall",
                "roc_auc",
                "sensitivity",
                "specificity",
                "threshold"
            ]
        );
        let confusion: Vec<&str> = json["confusion"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(confusion.len(), 4);
        for k in ["tp", "fp", "tn", "fn"] {
            assert!(confusion.contains(&k), "{k}");
        }
    }
}
