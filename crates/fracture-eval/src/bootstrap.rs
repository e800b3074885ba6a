//! Seeded bootstrap confidence intervals.

use serde::{Deserialize, Serialize};

use crate::roc::check_scores;
use crate::sweep::TieGroups;
use crate::{Error, Result};

/// A two-sided interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
}

/// 95% percentile-bootstrap intervals of the headline metrics. A metric is `None` when it is
/// undefined (a class absent).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceIntervals {
    /// Area under the ROC curve.
    pub roc_auc: Option<Interval>,
    /// Sensitivity at the operating threshold.
    pub sensitivity: Option<Interval>,
    /// Specificity at the operating threshold.
    pub specificity: Option<Interval>,
    /// Accuracy at the operating threshold.
    pub accuracy: Option<Interval>,
    /// Average precision (the area under the precision-recall curve).
    #[serde(default)]
    pub pr_auc: Option<Interval>,
    /// F1 at the operating threshold (`None` in a replicate with no fractured call and no fracture
    /// cannot happen: every replicate keeps the fractured cases).
    #[serde(default)]
    pub f1: Option<Interval>,
}

/// SplitMix64: a tiny, well-mixed generator, enough for resampling indices.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by Lemire's multiply-shift (bias below 2⁻³² for our sizes).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    // Linear interpolation between order statistics (NumPy's default).
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub(crate) fn interval(mut values: Vec<f64>) -> Option<Interval> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(Interval {
        lower: percentile(&values, 0.025),
        upper: percentile(&values, 0.975),
    })
}

/// 95% percentile-bootstrap interval of the mean of `values` (images resampled with replacement,
/// `resamples` replicates, seeded); `None` for no values.
///
/// ```
/// use fracture_eval::mean_ci;
/// let ci = mean_ci(&[0.0, 1.0, 1.0, 0.0, 1.0], 1000, 1).unwrap();
/// assert!(ci.lower < 0.6 && 0.6 < ci.upper);
/// assert!(mean_ci(&[], 10, 1).is_none());
/// ```
pub fn mean_ci(values: &[f64], resamples: usize, seed: u64) -> Option<Interval> {
    if values.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = SplitMix(seed ^ 0x6d65_616e_5f63_6900);
    let n = values.len();
    let means = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    interval(means)
}

/// 95% confidence intervals by the stratified percentile bootstrap: each of `resamples` replicates
/// draws the fractured and the intact cases separately, with replacement, keeping both counts (so
/// prevalence is fixed and every replicate has both classes); the interval is the 2.5th to 97.5th
/// percentile of the replicates. Deterministic for a given `seed`.
///
/// ```
/// use fracture_eval::bootstrap_ci;
/// let scores: Vec<f64> = (0..40).map(|i| i as f64 / 40.0).collect();
/// let actual: Vec<bool> = (0..40).map(|i| i % 3 == 0).collect();
/// let ci = bootstrap_ci(&scores, &actual, 0.5, 200, 7).unwrap();
/// let auc = ci.roc_auc.unwrap();
/// assert!(auc.lower <= auc.upper);
/// assert_eq!(ci, bootstrap_ci(&scores, &actual, 0.5, 200, 7).unwrap());
/// ```
pub fn bootstrap_ci(
    scores: &[f64],
    actual: &[bool],
    threshold: f64,
    resamples: usize,
    seed: u64,
) -> Result<ConfidenceIntervals> {
    check_scores(scores, actual)?;
    if threshold.is_nan() {
        return Err(Error::InvalidValue {
            what: "threshold".into(),
            value: threshold,
        });
    }
    let pos: Vec<usize> = (0..actual.len()).filter(|&i| actual[i]).collect();
    let neg: Vec<usize> = (0..actual.len()).filter(|&i| !actual[i]).collect();
    // Cases sorted by score, grouped into ties once, for an O(n) AUC and AP per replicate.
    let ties = TieGroups::new(scores);
    let mut rng = SplitMix(seed ^ 0x5eed_b007_57a9_0000);
    let mut weight = vec![0u32; scores.len()];
    let (mut aucs, mut sens, mut spec, mut acc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut aps, mut f1s) = (Vec::new(), Vec::new());
    for _ in 0..resamples {
        weight.iter_mut().for_each(|w| *w = 0);
        for class in [&pos, &neg] {
            for _ in 0..class.len() {
                weight[class[rng.below(class.len())]] += 1;
            }
        }
        let (mut tp, mut tn) = (0u64, 0u64);
        for (i, &w) in weight.iter().enumerate() {
            let called = crate::is_fractured(scores[i], threshold);
            if actual[i] && called {
                tp += u64::from(w);
            } else if !actual[i] && !called {
                tn += u64::from(w);
            }
        }
        let (p, n) = (pos.len() as f64, neg.len() as f64);
        if p > 0.0 {
            sens.push(tp as f64 / p);
        }
        if n > 0.0 {
            spec.push(tn as f64 / n);
        }
        if p + n > 0.0 {
            acc.push((tp + tn) as f64 / (p + n));
        }
        if p > 0.0 {
            // 2·TP / (2·TP + FP + FN); the denominator is at least the number of fractured cases.
            let (fp, fn_) = (n - tn as f64, p - tp as f64);
            f1s.push(2.0 * tp as f64 / (2.0 * tp as f64 + fp + fn_));
            aps.push(ties.average_precision(scores, actual, |i| f64::from(weight[i]), p));
        }
        if p > 0.0 && n > 0.0 {
            aucs.push(ties.auc(scores, actual, |i| f64::from(weight[i]), p, n));
        }
    }
    Ok(ConfidenceIntervals {
        roc_auc: interval(aucs),
        sensitivity: interval(sens),
        specificity: interval(spec),
        accuracy: interval(acc),
        pr_auc: interval(aps),
        f1: interval(f1s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roc_auc;

    #[test]
    fn intervals_contain_the_point_estimate_and_shrink_with_more_data() {
        let make = |n: usize| -> (Vec<f64>, Vec<bool>) {
            let mut rng = SplitMix(3);
            let actual: Vec<bool> = (0..n).map(|i| i % 4 == 0).collect();
            let scores = actual
                .iter()
                .map(|&a| (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 0.8 + if a { 0.25 } else { 0.0 })
                .collect();
            (scores, actual)
        };
        let (s_small, a_small) = make(80);
        let (s_big, a_big) = make(2000);
        let small = bootstrap_ci(&s_small, &a_small, 0.5, 500, 1)
            .unwrap()
            .roc_auc
            .unwrap();
        let big = bootstrap_ci(&s_big, &a_big, 0.5, 500, 1)
            .unwrap()
            .roc_auc
            .unwrap();
        let point = roc_auc(&s_big, &a_big).unwrap().unwrap();
        assert!(big.lower <= point && point <= big.upper, "{big:?} vs {point}");
        assert!(big.upper - big.lower < small.upper - small.lower);
    }

    proptest::proptest! {
        /// A replicate's weights are multiplicities: weighted AP and AUC equal those of the list
        /// with each case repeated that many times, the AUC checked against its pairwise definition.
        #[test]
        fn weighted_ap_and_auc_equal_those_of_the_repeated_cases(
            cases in proptest::collection::vec((0u8..12, proptest::bool::ANY, 0u32..4), 1..40)
        ) {
            let scores: Vec<f64> = cases.iter().map(|c| f64::from(c.0) / 11.0).collect();
            let actual: Vec<bool> = cases.iter().map(|c| c.1).collect();
            let weight: Vec<u32> = cases.iter().map(|c| c.2).collect();
            let (mut rs, mut ra) = (Vec::new(), Vec::new());
            for (i, &w) in weight.iter().enumerate() {
                for _ in 0..w {
                    rs.push(scores[i]);
                    ra.push(actual[i]);
                }
            }
            let p = ra.iter().filter(|&&a| a).count() as f64;
            let n = ra.len() as f64 - p;
            proptest::prop_assume!(p > 0.0);
            let ties = TieGroups::new(&scores);
            let ap = ties.average_precision(&scores, &actual, |i| f64::from(weight[i]), p);
            let expected = crate::average_precision(&rs, &ra).unwrap().unwrap();
            proptest::prop_assert!((ap - expected).abs() < 1e-12, "{} vs {}", ap, expected);
            if n > 0.0 {
                let auc = ties.auc(&scores, &actual, |i| f64::from(weight[i]), p, n);
                let mut pairs = 0.0;
                for (i, &si) in rs.iter().enumerate() {
                    for (j, &sj) in rs.iter().enumerate() {
                        if ra[i] && !ra[j] {
                            pairs += if si > sj { 1.0 } else if si == sj { 0.5 } else { 0.0 };
                        }
                    }
                }
                proptest::prop_assert!((auc - pairs / (p * n)).abs() < 1e-12, "{} vs {}", auc, pairs / (p * n));
            }
        }
    }

    #[test]
    fn pr_auc_and_f1_intervals_contain_their_point_estimates() {
        let mut rng = SplitMix(9);
        let actual: Vec<bool> = (0..600).map(|i| i % 5 == 0).collect();
        let scores: Vec<f64> = actual
            .iter()
            .map(|&a| (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 0.7 + if a { 0.3 } else { 0.0 })
            .collect();
        let ci = bootstrap_ci(&scores, &actual, 0.6, 500, 2).unwrap();
        let ap = crate::average_precision(&scores, &actual).unwrap().unwrap();
        let (pr, f1) = (ci.pr_auc.unwrap(), ci.f1.unwrap());
        assert!(pr.lower <= ap && ap <= pr.upper, "{pr:?} vs {ap}");
        let m = crate::ConfusionMatrix::from_scores(&scores, &actual, 0.6).unwrap();
        let point = 2.0 * m.tp as f64 / (2 * m.tp + m.fp + m.fn_) as f64;
        assert!(f1.lower <= point && point <= f1.upper, "{f1:?} vs {point}");
        assert!(pr.upper - pr.lower > 0.0 && f1.upper - f1.lower > 0.0);
    }

    #[test]
    fn one_class_gives_no_auc_interval() {
        let ci = bootstrap_ci(&[0.2, 0.8], &[false, false], 0.5, 50, 0).unwrap();
        assert_eq!(ci.roc_auc, None);
        assert_eq!(ci.sensitivity, None);
        let spec = ci.specificity.unwrap();
        assert!(
            0.0 <= spec.lower && spec.lower <= spec.upper && spec.upper <= 1.0,
            "{spec:?}"
        );
    }

    #[test]
    fn percentiles_interpolate() {
        assert_eq!(percentile(&[0.0, 1.0], 0.5), 0.5);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
    }
}
