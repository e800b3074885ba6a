//! Threshold metrics derived from a confusion matrix. Undefined ratios (0/0) are `None`, never NaN.

use serde::{Deserialize, Serialize};

use crate::ConfusionMatrix;

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// The clinical metrics of one operating point. Positive = fractured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    /// (TP + TN) / n.
    pub accuracy: Option<f64>,
    /// Positive predictive value, TP / (TP + FP).
    pub precision: Option<f64>,
    /// Sensitivity, TP / (TP + FN): the share of fractures found.
    pub recall: Option<f64>,
    /// TN / (TN + FP): the share of intact bones called intact.
    pub specificity: Option<f64>,
    /// Negative predictive value, TN / (TN + FN).
    pub npv: Option<f64>,
    /// Harmonic mean of precision and recall, 2·TP / (2·TP + FP + FN).
    pub f1: Option<f64>,
    /// Mean of sensitivity and specificity (defined when both are).
    pub balanced_accuracy: Option<f64>,
}

impl BinaryMetrics {
    /// The metrics of a confusion matrix.
    ///
    /// ```
    /// use fracture_eval::{BinaryMetrics, ConfusionMatrix};
    /// let m = BinaryMetrics::from_confusion(&ConfusionMatrix { tp: 8, fp: 2, tn: 88, fn_: 2 });
    /// assert_eq!(m.recall, Some(0.8));
    /// assert_eq!(BinaryMetrics::from_confusion(&ConfusionMatrix::default()).accuracy, None);
    /// ```
    pub fn from_confusion(cm: &ConfusionMatrix) -> Self {
        let recall = ratio(cm.tp, cm.tp + cm.fn_);
        let specificity = ratio(cm.tn, cm.tn + cm.fp);
        BinaryMetrics {
            accuracy: ratio(cm.tp + cm.tn, cm.total()),
            precision: ratio(cm.tp, cm.tp + cm.fp),
            recall,
            specificity,
            npv: ratio(cm.tn, cm.tn + cm.fn_),
            f1: ratio(2 * cm.tp, 2 * cm.tp + cm.fp + cm.fn_),
            balanced_accuracy: recall.zip(specificity).map(|(r, s)| (r + s) / 2.0),
        }
    }

    /// Sensitivity, the clinical name of [`BinaryMetrics::recall`].
    pub fn sensitivity(&self) -> Option<f64> {
        self.recall
    }
}
