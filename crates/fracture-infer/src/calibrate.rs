//! Calibrated probabilities and a steady operating point, fitted on the validation images.
//!
//! The class-weighted loss makes P(fractured) a good ranking but an inflated probability. Training
//! (and `fracture calibrate` for an existing model file) fits [`Platt`] scaling on the validation
//! images' logits, reports its ECE cross-fitted (each image calibrated by a fit on the other
//! folds), stores the map in the model file, and chooses the threshold on the calibrated
//! probabilities with [`choose_stable_threshold`] for the target-sensitivity rule. Every command then
//! shows calibrated probabilities ([`TrainedModel::probability`](crate::TrainedModel::probability)).

use fracture_eval::{
    EvalReport, Platt, StableThreshold, ThresholdRule, brier_score, choose_stable_threshold,
    choose_threshold, cross_fitted_platt, expected_calibration_error, logit,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Stratified folds of the cross-fitted calibration estimate.
pub const CALIBRATION_FOLDS: usize = 5;
/// Bootstrap replicates of the threshold's interval.
pub const THRESHOLD_RESAMPLES: usize = 1000;

/// The calibration stored with a model: the map, and how well it did on the images it was fitted on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// `P = sigmoid(a · logit + b)`.
    pub platt: Platt,
    /// Images it was fitted on (the validation split).
    pub images: usize,
    /// Fractured images among them.
    pub positives: usize,
    /// ECE (10 bins) of the uncalibrated probabilities on those images.
    pub ece_uncalibrated: Option<f64>,
    /// ECE (10 bins) of cross-fitted calibrated probabilities: each image calibrated by a fit on
    /// the other folds ([`CALIBRATION_FOLDS`]), so an honest estimate for new images of the same kind.
    pub ece_cross_fitted: Option<f64>,
    /// Brier score of the cross-fitted calibrated probabilities.
    pub brier_cross_fitted: Option<f64>,
}

/// The operating point chosen on validation images: the calibration (when it could be fitted),
/// the threshold on the calibrated probabilities, its stability, and the report there.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatingPoint {
    /// The fitted calibration; `None` when the fit failed (a class too small, or an inverted
    /// ranking), in which case probabilities stay uncalibrated.
    pub calibration: Option<Calibration>,
    /// The threshold on the (calibrated) probabilities.
    pub threshold: f64,
    /// The threshold's bootstrap interval and margin, for the target-sensitivity rule.
    pub stability: Option<StableThreshold>,
    /// The validation report at the threshold, on the calibrated probabilities.
    pub report: EvalReport,
    /// The calibrated validation probabilities, in the order given.
    pub probabilities: Vec<f64>,
}

/// Fits the calibration on uncalibrated validation probabilities `raw` against `truth` and chooses
/// the threshold by `rule` on the calibrated ones (for a target sensitivity, the stable threshold).
pub fn operating_point(raw: &[f64], truth: &[bool], rule: ThresholdRule) -> Result<OperatingPoint> {
    let logits: Vec<f64> = raw.iter().map(|&p| logit(p)).collect();
    let calibration = match fracture_eval::Platt::fit(&logits, truth)? {
        Some(platt) => {
            let cross = cross_fitted_platt(&logits, truth, CALIBRATION_FOLDS, 0)?;
            let positives = truth.iter().filter(|&&t| t).count();
            Some(Calibration {
                platt,
                images: truth.len(),
                positives,
                ece_uncalibrated: expected_calibration_error(raw, truth, fracture_eval::ECE_BINS)?,
                ece_cross_fitted: match &cross {
                    Some(c) => expected_calibration_error(c, truth, fracture_eval::ECE_BINS)?,
                    None => None,
                },
                brier_cross_fitted: match &cross {
                    Some(c) => brier_score(c, truth)?,
                    None => None,
                },
            })
        }
        None => None,
    };
    let probabilities: Vec<f64> = match &calibration {
        Some(c) => raw.iter().map(|&p| c.platt.apply(p)).collect(),
        None => raw.to_vec(),
    };
    let no_threshold =
        || Error::InvalidConfig("choosing a threshold needs validation images of both classes".into());
    let (threshold, stability) = match rule {
        ThresholdRule::TargetSensitivity { target } => {
            let s = choose_stable_threshold(&probabilities, truth, target, THRESHOLD_RESAMPLES, 0)?
                .ok_or_else(no_threshold)?;
            (s.threshold, Some(s))
        }
        other => (
            choose_threshold(&probabilities, truth, other)?.ok_or_else(no_threshold)?,
            None,
        ),
    };
    let report = EvalReport::new(&probabilities, truth, threshold)?;
    Ok(OperatingPoint {
        calibration,
        threshold,
        stability,
        report,
        probabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflated_scores_are_calibrated_and_the_threshold_keeps_the_target() {
        // 40 levels, 25 images each, fractured at the rate sigmoid(u); reported as sigmoid(2u + 2).
        let (mut raw, mut truth) = (Vec::new(), Vec::new());
        for k in 0..40 {
            let u = -4.0 + 8.0 * f64::from(k) / 39.0;
            let pos = (25.0 / (1.0 + (-u).exp())).round() as usize;
            for i in 0..25 {
                raw.push(1.0 / (1.0 + (-(2.0 * u + 2.0)).exp()));
                truth.push(i < pos);
            }
        }
        let rule = ThresholdRule::TargetSensitivity { target: 0.9 };
        let op = operating_point(&raw, &truth, rule).unwrap();
        let c = op.calibration.unwrap();
        assert!(c.ece_cross_fitted.unwrap() < 0.05, "{c:?}");
        assert!(c.ece_uncalibrated.unwrap() > 0.1, "{c:?}");
        assert!(op.report.sensitivity.unwrap() >= 0.9);
        assert_eq!(op.report.threshold, op.threshold);
        // The ranking is unchanged.
        let auc_raw = fracture_eval::roc_auc(&raw, &truth).unwrap();
        assert_eq!(op.report.roc_auc, auc_raw);
        let youden = operating_point(&raw, &truth, ThresholdRule::Youden).unwrap();
        assert!(youden.stability.is_none() && youden.calibration.is_some());
        assert!(operating_point(&raw, &vec![false; raw.len()], rule).is_err());
    }
}
