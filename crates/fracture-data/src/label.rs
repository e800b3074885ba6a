//! The two classes and their encodings. This is the only place that converts between a class, its
//! index, its training target and its folder names.

use serde::{Deserialize, Serialize};

/// The diagnosis of one radiograph.
///
/// Index encoding follows the original project: `Fractured` = 0, `NotFractured` = 1.
/// The network's single logit scores *fracture*: `sigmoid(logit)` = P(fractured), so the
/// binary-cross-entropy target is 1.0 for [`Label::Fractured`] (see [`Label::target`]).
/// "Fractured" is the positive class for every clinical metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// A fracture is present (index 0, target 1.0, the positive class).
    Fractured,
    /// No fracture (index 1, target 0.0).
    NotFractured,
}

impl Label {
    /// Both labels, in index order.
    pub const ALL: [Label; 2] = [Label::Fractured, Label::NotFractured];

    /// The original project's class index: 0 = fractured, 1 = not fractured.
    pub fn index(self) -> usize {
        match self {
            Label::Fractured => 0,
            Label::NotFractured => 1,
        }
    }

    /// The label for a class index (0 or 1); `None` for any other value.
    pub fn from_index(index: usize) -> Option<Label> {
        match index {
            0 => Some(Label::Fractured),
            1 => Some(Label::NotFractured),
            _ => None,
        }
    }

    /// The training target for the fracture logit: 1.0 for fractured, 0.0 for not fractured.
    pub fn target(self) -> f32 {
        if self.is_fractured() { 1.0 } else { 0.0 }
    }

    /// The label predicted by a fracture decision (`true` = fractured).
    pub fn from_fractured(fractured: bool) -> Label {
        if fractured {
            Label::Fractured
        } else {
            Label::NotFractured
        }
    }

    /// Whether this is the positive class.
    pub fn is_fractured(self) -> bool {
        self == Label::Fractured
    }

    /// The canonical folder and display name: `fractured` or `not fractured`.
    pub fn name(self) -> &'static str {
        match self {
            Label::Fractured => "fractured",
            Label::NotFractured => "not fractured",
        }
    }

    /// Maps a class-folder name to a label, ignoring letter case and surrounding spaces.
    ///
    /// Fractured: `fractured`, `fracture`, `positive`, `abnormal`. Not fractured: `not fractured`,
    /// `not_fractured`, `not-fractured`, `non_fractured`, `non-fractured`, `non fractured`, `normal`,
    /// `negative`. Any other name gives `None`.
    ///
    /// ```
    /// use fracture_data::Label;
    /// assert_eq!(Label::from_class_name("Not Fractured"), Some(Label::NotFractured));
    /// assert_eq!(Label::from_class_name("ABNORMAL"), Some(Label::Fractured));
    /// assert_eq!(Label::from_class_name("unknown"), None);
    /// ```
    pub fn from_class_name(name: &str) -> Option<Label> {
        let lower = name.trim().to_lowercase();
        match lower.as_str() {
            "fractured" | "fracture" | "positive" | "abnormal" => Some(Label::Fractured),
            "not fractured" | "not_fractured" | "not-fractured" | "non_fractured" | "non-fractured"
            | "non fractured" | "normal" | "negative" => Some(Label::NotFractured),
            _ => None,
        }
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_matches_the_original_encoding() {
        assert_eq!(Label::Fractured.index(), 0);
        assert_eq!(Label::NotFractured.index(), 1);
        for label in Label::ALL {
            assert_eq!(Label::from_index(label.index()), Some(label));
            assert_eq!(Label::from_class_name(label.name()), Some(label));
            assert_eq!(Label::from_fractured(label.is_fractured()), label);
        }
        assert_eq!(Label::from_index(2), None);
    }

    #[test]
    fn target_scores_fracture() {
        assert_eq!(Label::Fractured.target(), 1.0);
        assert_eq!(Label::NotFractured.target(), 0.0);
    }

    #[test]
    fn aliases_match_in_any_case() {
        for name in ["fractured", "Fracture", "POSITIVE", "abnormal"] {
            assert_eq!(Label::from_class_name(name), Some(Label::Fractured), "{name}");
        }
        for name in [
            "not fractured",
            "Not_Fractured",
            "non_fractured",
            "NON-FRACTURED",
            "normal",
            "Negative",
        ] {
            assert_eq!(Label::from_class_name(name), Some(Label::NotFractured), "{name}");
        }
        for name in ["", "fract", "other", "not"] {
            assert_eq!(Label::from_class_name(name), None, "{name}");
        }
    }

    #[test]
    fn serde_uses_snake_case_names() {
        let json = serde_json::to_string(&Label::NotFractured).unwrap();
        assert_eq!(json, "\"not_fractured\"");
        let back: Label = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Label::NotFractured);
    }
}
