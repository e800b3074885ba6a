//! Subgroup evaluation: the same metrics on each subset of the images (a body region, a view,
//! images with implants), so that a weak group is not hidden by the average.

use serde::{Deserialize, Serialize};

use crate::roc::check_scores;
use crate::{BinaryMetrics, ConfidenceIntervals, ConfusionMatrix, Error, Result, bootstrap_ci, roc_auc};

/// The fewest cases of a class for a group's metric to be reported: sensitivity needs this many
/// fractured images, specificity this many intact ones, ROC-AUC both. Below it a metric is `None`
/// and [`GroupReport::note`] says why, instead of printing an interval as wide as the unit range.
pub const MIN_GROUP_CASES: usize = 5;

/// A classifier's results on one subgroup of the images, at the operating threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupReport {
    /// The group's name (a column of the groups file, e.g. `hand`).
    pub name: String,
    /// Images in the group.
    pub n: usize,
    /// Fractured images in the group.
    pub positives: usize,
    /// Area under the ROC curve; `None` with fewer than [`MIN_GROUP_CASES`] of either class.
    pub roc_auc: Option<f64>,
    /// Sensitivity at the threshold; `None` with fewer than [`MIN_GROUP_CASES`] fractured images.
    pub sensitivity: Option<f64>,
    /// Specificity at the threshold; `None` with fewer than [`MIN_GROUP_CASES`] intact images.
    pub specificity: Option<f64>,
    /// 95% stratified-bootstrap intervals (only those of the reported metrics are kept).
    pub ci95: ConfidenceIntervals,
    /// Why a metric is missing, when one is.
    pub note: Option<String>,
}

/// The report of one group: `scores` and `actual` restricted to `members` (a mask over all
/// images, same length), at `threshold`, with `resamples` seeded bootstrap replicates.
///
/// ```
/// use fracture_eval::{MIN_GROUP_CASES, group_report};
/// let scores: Vec<f64> = (0..40).map(|i| f64::from(i) / 40.0).collect();
/// let actual: Vec<bool> = (0..40).map(|i| i % 2 == 1).collect();
/// let hands: Vec<bool> = (0..40).map(|i| i < 20).collect();
/// let g = group_report("hand", &scores, &actual, &hands, 0.5, 200, 1).unwrap();
/// assert_eq!((g.n, g.positives), (20, 10));
/// assert!(g.roc_auc.is_some() && g.note.is_none());
/// // Two images are too few: no metric, and a note.
/// let few: Vec<bool> = (0..40).map(|i| i < 2).collect();
/// let g = group_report("tiny", &scores, &actual, &few, 0.5, 200, 1).unwrap();
/// assert!(g.roc_auc.is_none() && g.note.unwrap().contains(&MIN_GROUP_CASES.to_string()));
/// ```
pub fn group_report(
    name: &str,
    scores: &[f64],
    actual: &[bool],
    members: &[bool],
    threshold: f64,
    resamples: usize,
    seed: u64,
) -> Result<GroupReport> {
    check_scores(scores, actual)?;
    if members.len() != scores.len() {
        return Err(Error::LengthMismatch {
            predictions: scores.len(),
            labels: members.len(),
        });
    }
    let (s, a): (Vec<f64>, Vec<bool>) = scores
        .iter()
        .zip(actual)
        .zip(members)
        .filter(|(_, m)| **m)
        .map(|((&s, &a), _)| (s, a))
        .unzip();
    let positives = a.iter().filter(|&&x| x).count();
    let negatives = a.len() - positives;
    let m = BinaryMetrics::from_confusion(&ConfusionMatrix::from_scores(&s, &a, threshold)?);
    let enough_pos = positives >= MIN_GROUP_CASES;
    let enough_neg = negatives >= MIN_GROUP_CASES;
    let mut ci = bootstrap_ci(&s, &a, threshold, resamples, seed)?;
    let keep = |ok: bool, v: Option<crate::Interval>| if ok { v } else { None };
    ci = ConfidenceIntervals {
        roc_auc: keep(enough_pos && enough_neg, ci.roc_auc),
        sensitivity: keep(enough_pos, ci.sensitivity),
        specificity: keep(enough_neg, ci.specificity),
        accuracy: keep(enough_pos && enough_neg, ci.accuracy),
        pr_auc: keep(enough_pos && enough_neg, ci.pr_auc),
        f1: keep(enough_pos && enough_neg, ci.f1),
    };
    let note = (!(enough_pos && enough_neg)).then(|| {
        format!(
            "too few cases: {positives} fractured and {negatives} intact ({MIN_GROUP_CASES} of a class needed; {})",
            match (enough_pos, enough_neg) {
                (false, false) => "no metric reported",
                (false, true) => "specificity only",
                _ => "sensitivity only",
            }
        )
    });
    Ok(GroupReport {
        name: name.to_string(),
        n: a.len(),
        positives,
        roc_auc: if enough_pos && enough_neg {
            roc_auc(&s, &a)?
        } else {
            None
        },
        sensitivity: if enough_pos { m.recall } else { None },
        specificity: if enough_neg { m.specificity } else { None },
        ci95: ci,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_matches_the_report_of_its_own_images() {
        let scores: Vec<f64> = (0..60).map(|i| f64::from((i * 37) % 60) / 60.0).collect();
        let actual: Vec<bool> = (0..60).map(|i| i % 3 == 0).collect();
        let members: Vec<bool> = (0..60).map(|i| i % 2 == 0).collect();
        let g = group_report("even", &scores, &actual, &members, 0.4, 300, 5).unwrap();
        let (s, a): (Vec<f64>, Vec<bool>) = (0..60)
            .filter(|i| i % 2 == 0)
            .map(|i| (scores[i], actual[i]))
            .unzip();
        let whole = crate::EvalReport::with_bootstrap(&s, &a, 0.4, 300, 5).unwrap();
        assert_eq!((g.n, g.positives), (whole.n, whole.positives));
        assert_eq!(g.roc_auc, whole.roc_auc);
        assert_eq!(g.sensitivity, whole.sensitivity);
        assert_eq!(g.specificity, whole.specificity);
        assert_eq!(g.ci95.roc_auc, whole.ci95.roc_auc);
        assert!(g.note.is_none());
    }

    #[test]
    fn a_group_with_few_fractures_reports_specificity_only() {
        let scores: Vec<f64> = (0..30).map(|i| f64::from(i) / 30.0).collect();
        let actual: Vec<bool> = (0..30).map(|i| i == 29 || i == 28).collect();
        let g = group_report("hip", &scores, &actual, &[true; 30], 0.5, 100, 0).unwrap();
        assert_eq!((g.roc_auc, g.sensitivity), (None, None));
        assert!(g.specificity.is_some() && g.ci95.specificity.is_some());
        assert!(g.ci95.roc_auc.is_none() && g.ci95.sensitivity.is_none());
        assert!(g.note.unwrap().contains("specificity only"));
        let empty = group_report("none", &scores, &actual, &[false; 30], 0.5, 100, 0).unwrap();
        assert_eq!((empty.n, empty.specificity), (0, None));
        assert!(group_report("x", &scores, &actual, &[true; 3], 0.5, 10, 0).is_err());
    }
}
