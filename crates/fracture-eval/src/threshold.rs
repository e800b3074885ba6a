//! Turning P(fractured) into decisions.

use crate::{Error, Result};

/// The default operating threshold on P(fractured).
pub const DEFAULT_THRESHOLD: f64 = 0.5;

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
                Ok(s >= threshold)
            }
        })
        .collect()
}
