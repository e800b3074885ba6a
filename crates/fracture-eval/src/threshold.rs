//! Turning P(fractured) into decisions, and choosing where to cut.

use serde::{Deserialize, Serialize};

use crate::roc::{check_scores, roc_curve};
use crate::{Error, Result};

/// The default operating threshold on P(fractured).
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// The decision rule, written once: a score at or above the threshold is called fractured.
/// Every decision in the workspace (metrics, curves, the CLI, the page) goes through it.
#[inline]
pub fn is_fractured(score: f64, threshold: f64) -> bool {
    score >= threshold
}

/// Decides `score >= threshold` for each score (`true` = fractured). Scores must not be NaN; the
/// threshold must be finite or ±infinity.
pub fn decide(scores: &[f64], threshold: f64) -> Result<Vec<bool>> {
    if threshold.is_nan() {
        return Err(Error::InvalidValue {
            what: "threshold".into(),
            value: threshold,
        });
    }
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if s.is_nan() {
                Err(Error::InvalidValue {
                    what: format!("score {i}"),
                    value: s,
                })
            } else {
                Ok(is_fractured(s, threshold))
            }
        })
        .collect()
}

/// How to choose an operating threshold from validation scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ThresholdRule {
    /// The highest threshold whose sensitivity reaches `target` (so specificity is as high as that
    /// sensitivity allows). Clinical default: a target of 0.90.
    #[cfg_attr(feature = "clap", value(skip))]
    TargetSensitivity {
        /// Required sensitivity in (0, 1].
        target: f64,
    },
    /// The threshold maximising Youden's J = sensitivity + specificity − 1.
    Youden,
    /// The threshold maximising F1.
    BestF1,
}

/// Picks a threshold among the observed scores by `rule` (decisions are `score >= threshold`).
/// `None` when either class is absent.
///
/// ```
/// use fracture_eval::{ThresholdRule, choose_threshold};
/// let scores = [0.9, 0.7, 0.6, 0.4, 0.2];
/// let actual = [true, true, false, true, false];
/// let t = choose_threshold(&scores, &actual, ThresholdRule::TargetSensitivity { target: 1.0 }).unwrap();
/// assert_eq!(t, Some(0.4)); // the highest cut that still finds all three fractures
/// ```
pub fn choose_threshold(scores: &[f64], actual: &[bool], rule: ThresholdRule) -> Result<Option<f64>> {
    check_scores(scores, actual)?;
    let Some(curve) = roc_curve(scores, actual)? else {
        return Ok(None);
    };
    let n_pos = actual.iter().filter(|&&a| a).count() as f64;
    let n_neg = actual.len() as f64 - n_pos;
    // Skip the +∞ point: it calls nothing fractured.
    let points = &curve[1..];
    let chosen = match rule {
        ThresholdRule::TargetSensitivity { target } => {
            if !(target > 0.0 && target <= 1.0) {
                return Err(Error::InvalidValue {
                    what: "target sensitivity".into(),
                    value: target,
                });
            }
            // Points run from the highest threshold down, sensitivity rising: the first one reaching the
            // target is the highest such threshold. A tiny tolerance absorbs rounding of k / n.
            points
                .iter()
                .find(|p| p.tpr >= target - 1e-12)
                .map(|p| p.threshold)
        }
        ThresholdRule::Youden => points
            .iter()
            .max_by(|a, b| {
                (a.tpr - a.fpr)
                    .total_cmp(&(b.tpr - b.fpr))
                    .then(b.threshold.total_cmp(&a.threshold))
            })
            .map(|p| p.threshold),
        ThresholdRule::BestF1 => points
            .iter()
            .max_by(|a, b| {
                let f1 = |p: &crate::RocPoint| {
                    let tp = p.tpr * n_pos;
                    let fp = p.fpr * n_neg;
                    let fn_ = n_pos - tp;
                    2.0 * tp / (2.0 * tp + fp + fn_)
                };
                f1(a).total_cmp(&f1(b)).then(b.threshold.total_cmp(&a.threshold))
            })
            .map(|p| p.threshold),
    };
    Ok(chosen)
}

/// An operating threshold for a target sensitivity that does not sit on one image's score, with
/// its uncertainty (see [`choose_stable_threshold`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StableThreshold {
    /// The threshold to store: midway (on the logit scale) between the lowest score the target
    /// needs and the next lower score, so that a small change of any score (half precision, another
    /// machine's summation order) cannot move an image across it.
    pub threshold: f64,
    /// The highest threshold that reaches the target on these images ([`choose_threshold`]).
    pub point: f64,
    /// The required sensitivity.
    pub target: f64,
    /// 2.5th to 97.5th percentile of the thresholds the rule picks on stratified bootstrap
    /// replicates of the images: how far the cut moves when the 88 or so fractures change.
    pub interval: Option<crate::Interval>,
    /// The share of replicates in which [`StableThreshold::threshold`] reaches the target
    /// sensitivity (about one half means the target holds on the average case, not with margin).
    pub holds_in: f64,
    /// Bootstrap replicates drawn.
    pub resamples: usize,
}

fn logit_clamped(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

/// Chooses the threshold for `target` sensitivity as [`StableThreshold`] describes, with
/// `resamples` seeded stratified bootstrap replicates for its interval. `None` when a class is
/// absent. Scores are probabilities in [0, 1].
///
/// ```
/// use fracture_eval::choose_stable_threshold;
/// let scores = [0.9, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1];
/// let actual = [true, true, false, true, false, false, false];
/// let t = choose_stable_threshold(&scores, &actual, 1.0, 200, 0).unwrap().unwrap();
/// assert_eq!(t.point, 0.5);
/// // Between 0.5 and the next score, 0.3, on the logit scale: every fracture is still found.
/// assert!(0.3 < t.threshold && t.threshold < 0.5);
/// ```
pub fn choose_stable_threshold(
    scores: &[f64],
    actual: &[bool],
    target: f64,
    resamples: usize,
    seed: u64,
) -> Result<Option<StableThreshold>> {
    let rule = ThresholdRule::TargetSensitivity { target };
    let Some(point) = choose_threshold(scores, actual, rule)? else {
        return Ok(None);
    };
    if let Some((i, &s)) = scores.iter().enumerate().find(|(_, s)| !(0.0..=1.0).contains(*s)) {
        return Err(Error::InvalidValue {
            what: format!("probability {i}"),
            value: s,
        });
    }
    let below = scores
        .iter()
        .copied()
        .filter(|&s| s < point)
        .max_by(f64::total_cmp);
    let threshold = match below {
        Some(b) => {
            let mid = 0.5 * (logit_clamped(point) + logit_clamped(b));
            (1.0 / (1.0 + (-mid).exp())).clamp(b, point)
        }
        None => point,
    };
    let pos: Vec<usize> = (0..actual.len()).filter(|&i| actual[i]).collect();
    let neg: Vec<usize> = (0..actual.len()).filter(|&i| !actual[i]).collect();
    let mut rng = crate::bootstrap::SplitMix(seed ^ 0x7468_7265_7368_0000);
    let (mut picked, mut holds) = (Vec::with_capacity(resamples), 0usize);
    let (mut s, mut a) = (Vec::new(), Vec::new());
    for _ in 0..resamples {
        s.clear();
        a.clear();
        for class in [&pos, &neg] {
            for _ in 0..class.len() {
                let i = class[rng.below(class.len())];
                s.push(scores[i]);
                a.push(actual[i]);
            }
        }
        if let Some(t) = choose_threshold(&s, &a, rule)? {
            picked.push(t);
        }
        let found = s
            .iter()
            .zip(&a)
            .filter(|(v, a)| **a && is_fractured(**v, threshold))
            .count();
        if found as f64 >= target * pos.len() as f64 - 1e-9 {
            holds += 1;
        }
    }
    Ok(Some(StableThreshold {
        threshold,
        point,
        target,
        interval: crate::bootstrap::interval(picked),
        holds_in: if resamples > 0 {
            holds as f64 / resamples as f64
        } else {
            0.0
        },
        resamples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BinaryMetrics, ConfusionMatrix};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn target_sensitivity_is_reached_by_the_highest_threshold(
            pairs in proptest::collection::vec((0u8..20, any::<bool>()), 2..80),
            target in 0.05f64..1.0,
        ) {
            let scores: Vec<f64> = pairs.iter().map(|p| f64::from(p.0) / 20.0).collect();
            let actual: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            if let Some(t) = choose_threshold(&scores, &actual, ThresholdRule::TargetSensitivity { target }).unwrap() {
                let sens = |t: f64| BinaryMetrics::from_confusion(&ConfusionMatrix::from_scores(&scores, &actual, t).unwrap()).recall.unwrap();
                prop_assert!(sens(t) >= target - 1e-12);
                // Any higher observed score misses the target.
                for &s in scores.iter().filter(|&&s| s > t) {
                    prop_assert!(sens(s) < target - 1e-12);
                }
            }
        }
    }

    #[test]
    fn youden_and_f1_pick_the_separating_cut() {
        let scores = [0.95, 0.9, 0.8, 0.3, 0.2, 0.1];
        let actual = [true, true, true, false, false, false];
        assert_eq!(
            choose_threshold(&scores, &actual, ThresholdRule::Youden).unwrap(),
            Some(0.8)
        );
        assert_eq!(
            choose_threshold(&scores, &actual, ThresholdRule::BestF1).unwrap(),
            Some(0.8)
        );
        assert_eq!(
            choose_threshold(&scores, &[true; 6], ThresholdRule::Youden).unwrap(),
            None
        );
        let bad = choose_threshold(&scores, &actual, ThresholdRule::TargetSensitivity { target: 1.5 });
        assert!(bad.is_err());
    }

    #[test]
    fn the_stable_threshold_keeps_the_target_and_reports_its_spread() {
        let scores: Vec<f64> = (0..200).map(|i| f64::from((i * 61) % 200) / 200.0).collect();
        let actual: Vec<bool> = (0..200).map(|i| (i * 61) % 200 > 60 && i % 3 != 0).collect();
        let t = choose_stable_threshold(&scores, &actual, 0.9, 300, 4)
            .unwrap()
            .unwrap();
        let sens = |th: f64| {
            BinaryMetrics::from_confusion(&ConfusionMatrix::from_scores(&scores, &actual, th).unwrap())
                .recall
                .unwrap()
        };
        assert!(t.threshold <= t.point && sens(t.threshold) >= 0.9);
        assert_eq!(sens(t.threshold), sens(t.point));
        // No score lies between the stored threshold and the point.
        assert!(!scores.iter().any(|&s| s >= t.threshold && s < t.point));
        let i = t.interval.unwrap();
        assert!(i.lower <= t.point && t.point <= i.upper, "{i:?} vs {}", t.point);
        assert!((0.0..=1.0).contains(&t.holds_in));
        assert_eq!(
            choose_stable_threshold(&scores, &[false; 200], 0.9, 10, 0).unwrap(),
            None
        );
        assert!(choose_stable_threshold(&[1.5, 0.2], &[true, false], 0.9, 10, 0).is_err());
    }
}
