//! The 2 × 2 confusion matrix with "fractured" as the positive class.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Counts of a binary decision against the truth. Positive = fractured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Fractured, called fractured.
    pub tp: u64,
    /// Not fractured, called fractured (a false alarm).
    pub fp: u64,
    /// Not fractured, called not fractured.
    pub tn: u64,
    /// Fractured, called not fractured (a missed fracture, the costliest error).
    #[serde(rename = "fn")]
    pub fn_: u64,
}

impl ConfusionMatrix {
    /// Counts decisions against the truth; `true` means fractured in both slices.
    ///
    /// ```
    /// use fracture_eval::ConfusionMatrix;
    /// let cm = ConfusionMatrix::from_labels(&[true, true, false, false], &[true, false, false, true]).unwrap();
    /// assert_eq!((cm.tp, cm.fp, cm.tn, cm.fn_), (1, 1, 1, 1));
    /// assert!(ConfusionMatrix::from_labels(&[true], &[]).is_err());
    /// ```
    pub fn from_labels(predicted: &[bool], actual: &[bool]) -> Result<Self> {
        if predicted.len() != actual.len() {
            return Err(Error::LengthMismatch {
                predictions: predicted.len(),
                labels: actual.len(),
            });
        }
        let mut cm = ConfusionMatrix::default();
        for (&p, &a) in predicted.iter().zip(actual) {
            match (p, a) {
                (true, true) => cm.tp += 1,
                (true, false) => cm.fp += 1,
                (false, false) => cm.tn += 1,
                (false, true) => cm.fn_ += 1,
            }
        }
        Ok(cm)
    }

    /// Counts the decisions `score >= threshold` against the truth.
    pub fn from_scores(scores: &[f64], actual: &[bool], threshold: f64) -> Result<Self> {
        let predicted = crate::decide(scores, threshold)?;
        Self::from_labels(&predicted, actual)
    }

    /// All cases.
    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.tn + self.fn_
    }

    /// Fractured cases (TP + FN).
    pub fn positives(&self) -> u64 {
        self.tp + self.fn_
    }

    /// Not-fractured cases (TN + FP).
    pub fn negatives(&self) -> u64 {
        self.tn + self.fp
    }
}
