//! Naming a Kaggle dataset.

use crate::{Error, Result};

/// The Bone Fracture Multi-Region X-ray Data set (10,580 radiographs) that the project targets.
pub const DEFAULT_DATASET: &str = "bmadushanirodrigo/fracture-multi-region-x-ray-data";

/// A Kaggle dataset, `owner/slug`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatasetRef {
    /// The owner's user name.
    pub owner: String,
    /// The dataset's slug.
    pub slug: String,
}

impl std::str::FromStr for DatasetRef {
    type Err = Error;

    /// Parses `owner/slug`; both parts non-empty, of ASCII letters, digits, `-`, `_` and `.`, and not
    /// `.` or `..`.
    fn from_str(s: &str) -> Result<Self> {
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match s.trim().split_once('/') {
            Some((owner, slug)) if ok(owner) && ok(slug) => Ok(DatasetRef {
                owner: owner.to_string(),
                slug: slug.to_string(),
            }),
            _ => Err(Error::BadDataset(s.to_string())),
        }
    }
}

impl std::fmt::Display for DatasetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.slug)
    }
}

impl DatasetRef {
    /// The download URL under an API base such as `https://www.kaggle.com/api/v1`.
    pub fn download_url(&self, base_url: &str) -> String {
        format!(
            "{}/datasets/download/{}/{}",
            base_url.trim_end_matches('/'),
            self.owner,
            self.slug
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d: DatasetRef = DEFAULT_DATASET.parse().unwrap();
        assert_eq!(d.slug, "fracture-multi-region-x-ray-data");
        assert_eq!(
            d.download_url("https://www.kaggle.com/api/v1/"),
            "https://www.kaggle.com/api/v1/datasets/download/bmadushanirodrigo/fracture-multi-region-x-ray-data"
        );
        for bad in [
            "", "noslash", "a/", "/b", "a/b/c", "../x", "a/..", "a b/c", "a/b?x=1",
        ] {
            assert!(bad.parse::<DatasetRef>().is_err(), "{bad}");
        }
    }
}
