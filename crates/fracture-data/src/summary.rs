//! A printable summary of a dataset: images per split and class, and what was skipped.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{DatasetLayout, Label, Skipped, Split};

/// Image counts of one split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    /// The split.
    pub split: Split,
    /// Images labelled fractured.
    pub fractured: usize,
    /// Images labelled not fractured.
    pub not_fractured: usize,
}

impl SplitCounts {
    /// Both classes together.
    pub fn total(&self) -> usize {
        self.fractured + self.not_fractured
    }
}

/// Images per split and class, and the skipped files. `Display` renders a plain-text table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// The dataset root (the folder holding the splits).
    pub root: PathBuf,
    /// One row per split present, in train, val, test order.
    pub splits: Vec<SplitCounts>,
    /// Everything passed over, with the reason.
    pub skipped: Vec<Skipped>,
    /// The layout's [`DatasetLayout::link_problems`].
    #[serde(default)]
    pub link_problems: Vec<Skipped>,
}

impl DatasetSummary {
    /// The counts of a discovered layout (files not yet decoded).
    pub fn from_layout(layout: &DatasetLayout) -> Self {
        let splits = layout
            .splits
            .iter()
            .map(|(&split, items)| {
                let fractured = items.iter().filter(|i| i.label == Label::Fractured).count();
                SplitCounts {
                    split,
                    fractured,
                    not_fractured: items.len() - fractured,
                }
            })
            .collect();
        DatasetSummary {
            root: layout.root.clone(),
            splits,
            skipped: layout.skipped.clone(),
            link_problems: layout.link_problems.clone(),
        }
    }

    /// The row of one split.
    pub fn split(&self, split: Split) -> Option<&SplitCounts> {
        self.splits.iter().find(|s| s.split == split)
    }

    /// Replaces a split's counts (e.g. after unreadable files were dropped) and adds skipped entries.
    pub fn update(&mut self, counts: SplitCounts, skipped: &[Skipped]) {
        match self.splits.iter_mut().find(|s| s.split == counts.split) {
            Some(row) => *row = counts,
            None => {
                self.splits.push(counts);
                self.splits.sort_by_key(|s| s.split);
            }
        }
        self.skipped.extend_from_slice(skipped);
    }
}

impl fmt::Display for DatasetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset: {}", self.root.display())?;
        writeln!(
            f,
            "  {:<6} {:>10} {:>14} {:>7}",
            "split", "fractured", "not fractured", "total"
        )?;
        for s in &self.splits {
            writeln!(
                f,
                "  {:<6} {:>10} {:>14} {:>7}",
                s.split.name(),
                s.fractured,
                s.not_fractured,
                s.total()
            )?;
        }
        match self.skipped.len() {
            0 => writeln!(f, "  skipped: none")?,
            n => {
                writeln!(f, "  skipped: {n}")?;
                for s in &self.skipped {
                    writeln!(f, "    {s}")?;
                }
            }
        }
        if !self.link_problems.is_empty() {
            writeln!(f, "  symbolic link problems: {}", self.link_problems.len())?;
            for s in &self.link_problems {
                writeln!(f, "    {s}")?;
            }
        }
        Ok(())
    }
}
