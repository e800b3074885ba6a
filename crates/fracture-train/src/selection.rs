//! Which epoch is the best so far, and when a run stops early.

use crate::checkpoint::{Best, CheckpointMeta};
use crate::{BestMetric, TrainConfig};

/// Whether an epoch whose selection metric is `value` replaces `best` as the best epoch.
///
/// A defined value replaces no best, a best whose value was undefined, or a worse best (strictly:
/// ties keep the earlier epoch). An undefined value (`None`: the metric could not be computed on
/// that epoch) is taken only when there is no best yet, so that a run always saves a model, and is
/// recorded as undefined, so the first defined value replaces it.
pub(crate) fn improves(metric: BestMetric, value: Option<f64>, best: Option<Best>) -> bool {
    let Some(v) = value.filter(|v| v.is_finite()) else {
        return best.is_none();
    };
    match best.and_then(|b| b.value) {
        None => true,
        Some(b) if metric.higher_is_better() => v > b,
        Some(b) => v < b,
    }
}

/// Whether early stopping ends the run: the patience is set and that many epochs have passed
/// without an improvement.
pub(crate) fn stop_early(cfg: &TrainConfig, meta: &CheckpointMeta) -> bool {
    cfg.early_stopping_patience
        .is_some_and(|p| meta.epochs_since_best >= p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn best(epoch: usize, value: Option<f64>) -> Option<Best> {
        Some(Best { epoch, value })
    }

    #[test]
    fn higher_or_lower_is_better_by_metric_and_ties_keep_the_earlier_epoch() {
        assert!(improves(BestMetric::RocAuc, Some(0.8), None));
        assert!(improves(BestMetric::RocAuc, Some(0.8), best(1, Some(0.7))));
        assert!(!improves(BestMetric::RocAuc, Some(0.7), best(1, Some(0.7))));
        assert!(!improves(BestMetric::RocAuc, Some(0.6), best(1, Some(0.7))));
        assert!(improves(BestMetric::ValLoss, Some(0.3), best(1, Some(0.4))));
        assert!(!improves(BestMetric::ValLoss, Some(0.5), best(1, Some(0.4))));
    }

    #[test]
    fn an_undefined_first_epoch_does_not_freeze_the_best_epoch() {
        // Epoch 1's metric is undefined: it is kept (a model must exist) but as undefined ...
        assert!(improves(BestMetric::RocAuc, None, None));
        assert!(improves(BestMetric::RocAuc, Some(f64::NAN), None));
        // ... and any defined value later replaces it (a stored NaN once compared false forever).
        assert!(improves(BestMetric::RocAuc, Some(0.55), best(1, None)));
        assert!(improves(BestMetric::ValLoss, Some(9.0), best(1, None)));
        // An undefined value never replaces a defined best.
        assert!(!improves(BestMetric::RocAuc, None, best(2, Some(0.55))));
    }

    #[test]
    fn an_undefined_best_survives_the_checkpoint_as_null() {
        let b = Best {
            epoch: 1,
            value: None,
        };
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(text, r#"{"epoch":1,"value":null}"#);
        assert_eq!(serde_json::from_str::<Best>(&text).unwrap(), b);
        // Checkpoints written before: a number.
        let old: Best = serde_json::from_str(r#"{"epoch":3,"value":0.8}"#).unwrap();
        assert_eq!(old.value, Some(0.8));
    }
}
