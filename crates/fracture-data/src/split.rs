//! Dataset splits and the seeded stratified split of a training set.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Item, Label};

/// One of the three conventional dataset splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Images the model learns from.
    Train,
    /// Images used to select the model and its threshold.
    Val,
    /// Held-out images for the final report.
    Test,
}

impl Split {
    /// All splits in canonical order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// Maps a split-folder name to a split, ignoring letter case: `train`/`training`,
    /// `val`/`valid`/`validation`, `test`/`testing`.
    pub fn from_dir_name(name: &str) -> Option<Split> {
        match name.trim().to_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "val" | "valid" | "validation" => Some(Split::Val),
            "test" | "testing" => Some(Split::Test),
            _ => None,
        }
    }

    /// The canonical name: `train`, `val` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Split::from_dir_name(s).ok_or_else(|| format!("unknown split `{s}` (expected train, val or test)"))
    }
}

/// Splits `items` into (kept, held out) so that each class keeps the same proportion, seeded.
///
/// For each label, `round(count * fraction)` items go to the held-out part (at least one when the
/// class has two or more items and `fraction > 0`, and never all of them). Both parts keep the
/// input's relative order, so the result depends only on `items`, `fraction` and `seed`.
///
/// ```
/// use fracture_data::{stratified_split, Item, Label};
/// let items: Vec<Item> = (0..10)
///     .map(|i| Item::new(format!("{i}.png"), if i < 2 { Label::Fractured } else { Label::NotFractured }))
///     .collect();
/// let (train, val) = stratified_split(&items, 0.5, 7);
/// assert_eq!(train.len() + val.len(), 10);
/// assert_eq!(val.iter().filter(|i| i.label == Label::Fractured).count(), 1);
/// ```
pub fn stratified_split(items: &[Item], fraction: f64, seed: u64) -> (Vec<Item>, Vec<Item>) {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut by_label: BTreeMap<Label, Vec<usize>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        by_label.entry(item.label).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut held = vec![false; items.len()];
    for indices in by_label.values_mut() {
        let n = indices.len();
        let mut take = (n as f64 * fraction).round() as usize;
        if fraction > 0.0 && n >= 2 {
            take = take.max(1);
        }
        take = take.min(n.saturating_sub(1));
        indices.shuffle(&mut rng);
        for &i in &indices[..take] {
            held[i] = true;
        }
    }
    let mut kept = Vec::new();
    let mut out = Vec::new();
    for (item, h) in items.iter().zip(held) {
        if h {
            out.push(item.clone());
        } else {
            kept.push(item.clone());
        }
    }
    (kept, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(fractured: usize, normal: usize) -> Vec<Item> {
        (0..fractured + normal)
            .map(|i| {
                let label = if i < fractured {
                    Label::Fractured
                } else {
                    Label::NotFractured
                };
                Item::new(format!("{i}.png"), label)
            })
            .collect()
    }

    #[test]
    fn split_names_have_aliases() {
        assert_eq!(Split::from_dir_name("Valid"), Some(Split::Val));
        assert_eq!(Split::from_dir_name("TRAINING"), Some(Split::Train));
        assert_eq!(Split::from_dir_name("testing"), Some(Split::Test));
        assert_eq!(Split::from_dir_name("dev"), None);
        assert_eq!("val".parse::<Split>(), Ok(Split::Val));
        assert!("nope".parse::<Split>().is_err());
    }

    #[test]
    fn stratified_split_keeps_proportions_and_is_seeded() {
        let all = items(30, 170);
        let (kept, held) = stratified_split(&all, 0.2, 1);
        assert_eq!(held.iter().filter(|i| i.label == Label::Fractured).count(), 6);
        assert_eq!(held.iter().filter(|i| i.label == Label::NotFractured).count(), 34);
        assert_eq!(kept.len() + held.len(), 200);
        let again = stratified_split(&all, 0.2, 1);
        assert_eq!(again.1, held);
        let other = stratified_split(&all, 0.2, 2);
        assert_ne!(other.1, held);
        for item in &held {
            assert!(!kept.contains(item));
        }
    }

    #[test]
    fn stratified_split_never_empties_a_class() {
        let all = items(2, 3);
        let (kept, held) = stratified_split(&all, 0.99, 0);
        assert!(kept.iter().any(|i| i.label == Label::Fractured));
        assert!(kept.iter().any(|i| i.label == Label::NotFractured));
        assert!(held.iter().any(|i| i.label == Label::Fractured));
    }
}
