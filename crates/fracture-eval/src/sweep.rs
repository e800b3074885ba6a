//! The one walk over scores that the curves and areas share: cases sorted by score, grouped into
//! runs of tied scores, and counted from the highest score down.

/// The cases of a score list sorted by descending score, with the runs of tied scores.
#[derive(Debug, Clone)]
pub(crate) struct TieGroups {
    /// Case indices, highest score first.
    order: Vec<usize>,
    /// Runs `(start, end)` of `order` whose scores are equal, highest first.
    groups: Vec<(usize, usize)>,
}

/// Cumulative counts after one tie group: every case scoring at least `threshold` called fractured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Step {
    /// The group's score.
    pub(crate) threshold: f64,
    /// Weighted fractured cases in this group.
    pub(crate) group_tp: f64,
    /// Weighted intact cases in this group.
    pub(crate) group_fp: f64,
    /// Weighted fractured cases at or above the threshold.
    pub(crate) tp: f64,
    /// Weighted intact cases at or above the threshold.
    pub(crate) fp: f64,
}

impl TieGroups {
    /// Sorts and groups `scores` (which must not be NaN; ties are exact equality).
    pub(crate) fn new(scores: &[f64]) -> Self {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let mut groups = Vec::new();
        let mut start = 0;
        for k in 1..=order.len() {
            if k == order.len() || scores[order[k]] != scores[order[start]] {
                groups.push((start, k));
                start = k;
            }
        }
        TieGroups { order, groups }
    }

    /// Walks the groups from the highest score down, counting case `i` `weight(i)` times (1 for a
    /// plain curve, its bootstrap multiplicity in a replicate), and calls `step` after each group.
    pub(crate) fn sweep(
        &self,
        scores: &[f64],
        actual: &[bool],
        weight: impl Fn(usize) -> f64,
        mut step: impl FnMut(Step),
    ) {
        let (mut tp, mut fp) = (0.0, 0.0);
        for &(a, b) in &self.groups {
            let (mut group_tp, mut group_fp) = (0.0, 0.0);
            for &i in &self.order[a..b] {
                if actual[i] {
                    group_tp += weight(i);
                } else {
                    group_fp += weight(i);
                }
            }
            tp += group_tp;
            fp += group_fp;
            step(Step {
                threshold: scores[self.order[a]],
                group_tp,
                group_fp,
                tp,
                fp,
            });
        }
    }

    /// The ROC-AUC (Mann-Whitney: ties count one half) with case weights; `positives` and
    /// `negatives` are the weighted class totals, both positive.
    pub(crate) fn auc(
        &self,
        scores: &[f64],
        actual: &[bool],
        weight: impl Fn(usize) -> f64,
        positives: f64,
        negatives: f64,
    ) -> f64 {
        let mut wins = 0.0;
        self.sweep(scores, actual, weight, |s| {
            // This group's fractured cases beat every intact case below it, and tie with its own.
            wins += s.group_tp * (negatives - s.fp) + 0.5 * s.group_tp * s.group_fp;
        });
        wins / (positives * negatives)
    }

    /// Average precision `Σ (Rₖ − Rₖ₋₁) · Pₖ` with case weights, one point per tie group;
    /// `positives` is the weighted number of fractured cases (> 0).
    pub(crate) fn average_precision(
        &self,
        scores: &[f64],
        actual: &[bool],
        weight: impl Fn(usize) -> f64,
        positives: f64,
    ) -> f64 {
        let (mut prev_recall, mut ap) = (0.0, 0.0);
        self.sweep(scores, actual, weight, |s| {
            if s.tp + s.fp > 0.0 {
                let recall = s.tp / positives;
                ap += (recall - prev_recall) * s.tp / (s.tp + s.fp);
                prev_recall = recall;
            }
        });
        // The recall steps sum to 1 only up to rounding; keep the area in [0, 1].
        ap.clamp(0.0, 1.0)
    }
}
