//! The FracAtlas release (Abedeen et al., Scientific Data 10, 521, 2023; CC BY 4.0), fetched from
//! figshare and laid out as `fracture train` reads it.
//!
//! The figshare API (`GET {api}/articles/22363012`) lists the article's files with their sizes,
//! MD5s and download addresses; the zip is downloaded like a Kaggle archive (resumable, retried,
//! checked against the listed MD5 and each entry's CRC, safely extracted), then reorganised:
//! `dataset.csv` gives each image its label and flags, the class folders (`Fractured`,
//! `Non_fractured`) must agree with it, and the COCO annotation file gives the fracture boxes. The
//! images are split per class, deterministically from a seed, into `train`, `val` and `test`.
//! The result, under `dest`:
//!
//! ```text
//! train/{fractured,not fractured}/IMG*.jpg   val/…   test/…
//! boxes.csv   id,split,x,y,w,h (pixels of the image as stored; one row per box)
//! meta.csv    id,split,hand,leg,hip,shoulder,mixed,hardware,multiscan,frontal,lateral,oblique,fractured,fracture_count
//! README.md   source, licence, citation and how the split was drawn
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use fracture_fs::AtPath;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::fetch::{archive_for, download_verified, extract_or_discard, install, sibling};
use crate::http::{Announced, Client, Failure};
use crate::{Error, Event, ExtractLimits, MARKER_FILE, Result};

mod release;
use release::*;

/// The FracAtlas article on figshare (DOI 10.6084/m9.figshare.22363012).
pub const FRACATLAS_ARTICLE: u64 = 22_363_012;
/// The figshare API that the article's file list comes from.
pub const DEFAULT_FIGSHARE_API: &str = "https://api.figshare.com/v2";
/// The environment variable that overrides [`DEFAULT_FIGSHARE_API`] (tests point it at a local
/// server).
pub const FIGSHARE_API_ENV: &str = "FRACTURE_FIGSHARE_BASE_URL";
/// The flag columns `meta.csv` carries, in order, when `dataset.csv` has them.
pub const META_COLUMNS: [&str; 12] = [
    "hand",
    "leg",
    "hip",
    "shoulder",
    "mixed",
    "hardware",
    "multiscan",
    "frontal",
    "lateral",
    "oblique",
    "fractured",
    "fracture_count",
];
/// The splits written, in order.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];
/// The class folders written: index 0 = fractured, 1 = not fractured (the project's label encoding).
pub const CLASS_FOLDERS: [&str; 2] = ["fractured", "not fractured"];

/// The figshare API base URL: `$FRACTURE_FIGSHARE_BASE_URL`, or [`DEFAULT_FIGSHARE_API`].
pub fn figshare_api_from_env() -> String {
    std::env::var(FIGSHARE_API_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_FIGSHARE_API.to_string())
}

/// How the images are divided: per class, each image's place is the MD5 of `"{seed}:{id}"`; the
/// first `test` share of each class (rounded) goes to `test`, the next `val` share to `val`, the rest
/// to `train`. The same seed and shares give the same split on every machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitPlan {
    /// The seed.
    pub seed: u64,
    /// Share of each class for `val`, in [0, 1).
    pub val: f64,
    /// Share of each class for `test`, in [0, 1).
    pub test: f64,
}

impl Default for SplitPlan {
    /// Seed 2023, 70% train, 15% val, 15% test.
    fn default() -> Self {
        SplitPlan {
            seed: 2023,
            val: 0.15,
            test: 0.15,
        }
    }
}

impl SplitPlan {
    fn check(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && (0.0..1.0).contains(&v);
        if !ok(self.val) || !ok(self.test) || self.val + self.test >= 1.0 {
            return Err(Error::BadSplit {
                val: self.val,
                test: self.test,
            });
        }
        Ok(())
    }

    /// Assigns each id its split (0 train, 1 val, 2 test); `ids` are one class's.
    fn assign<'a>(&self, ids: &[&'a str]) -> Vec<(&'a str, usize)> {
        let mut keyed: Vec<([u8; 16], &str)> = ids
            .iter()
            .map(|id| (Md5::digest(format!("{}:{id}", self.seed)).into(), *id))
            .collect();
        keyed.sort();
        let n = keyed.len() as f64;
        let n_test = (n * self.test).round() as usize;
        let n_val = (n * self.val).round() as usize;
        keyed
            .into_iter()
            .enumerate()
            .map(|(i, (_, id))| {
                let split = if i < n_test {
                    2
                } else if i < n_test + n_val {
                    1
                } else {
                    0
                };
                (id, split)
            })
            .collect()
    }
}

/// How to fetch FracAtlas.
#[derive(Debug, Clone)]
pub struct FracAtlasOptions {
    /// The folder the organised data set is written to. The archive is downloaded beside it, as
    /// `<dest>.zip.part` and then `<dest>.zip`.
    pub dest: PathBuf,
    /// The figshare API base URL (see [`figshare_api_from_env`]).
    pub api_base: String,
    /// The split.
    pub split: SplitPlan,
    /// Download and organise again even when `dest` holds a completed fetch.
    pub force: bool,
    /// Zip-bomb limits.
    pub limits: ExtractLimits,
    /// Retries after a server error or a dropped connection.
    pub retries: u32,
    /// The first pause between retries; it doubles each time (at most 30 s).
    pub backoff: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Keep `<dest>.zip` afterwards (it is removed by default).
    pub keep_archive: bool,
}

impl FracAtlasOptions {
    /// Options for `dest` with the process's API base URL, the default split, 5 retries from 1 s, a
    /// 10 s connect timeout and default extraction limits.
    pub fn new(dest: PathBuf) -> Self {
        FracAtlasOptions {
            dest,
            api_base: figshare_api_from_env(),
            split: SplitPlan::default(),
            force: false,
            limits: ExtractLimits::default(),
            retries: 5,
            backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            keep_archive: false,
        }
    }
}

/// What [`fetch_fracatlas`] produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FracAtlasFetched {
    /// The organised data set's folder.
    #[serde(skip)]
    pub root: PathBuf,
    /// Whether it was already there (nothing was downloaded).
    #[serde(skip)]
    pub cached: bool,
    /// The split used.
    pub split: SplitPlan,
    /// Images per split (train, val, test) and class (fractured, not fractured).
    pub counts: [[usize; 2]; 3],
    /// Rows written to `boxes.csv` (0 when the release held no COCO annotation file).
    pub boxes: usize,
    /// Images listed in `dataset.csv` that had no file, and image files not in `dataset.csv`: left out.
    pub left_out: Vec<String>,
    /// The archive's size in bytes.
    pub archive_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    dataset: String,
    #[serde(flatten)]
    fetched: FracAtlasFetched,
}

const DATASET_TAG: &str = "figshare:22363012 (FracAtlas)";

fn release(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
    Error::Release {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Downloads FracAtlas from figshare and organises it under `options.dest`, or does nothing when
/// `dest` already holds it with the same split. See the module documentation for the layout.
///
/// `dest` appears only when complete; an existing folder not made by this function is never
/// touched, nor one made with another split unless `force` is set.
pub fn fetch_fracatlas(
    options: &FracAtlasOptions,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<FracAtlasFetched> {
    options.split.check()?;
    let dest = &options.dest;
    if dest.exists() && !options.force {
        let marker = std::fs::read_to_string(dest.join(MARKER_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<Marker>(&t).ok());
        return match marker {
            Some(m) if m.dataset == DATASET_TAG && m.fetched.split == options.split => {
                on_event(Event::Status(&format!(
                    "FracAtlas is already in {}",
                    dest.display()
                )));
                Ok(FracAtlasFetched {
                    root: dest.clone(),
                    cached: true,
                    ..m.fetched
                })
            }
            Some(m) if m.dataset == DATASET_TAG => Err(Error::SplitDiffers {
                path: dest.clone(),
                seed: m.fetched.split.seed,
                val: m.fetched.split.val,
                test: m.fetched.split.test,
            }),
            _ => Err(Error::DestinationExists { path: dest.clone() }),
        };
    }
    let (archive, archive_bytes, _) = archive_for(dest, options.force, on_event, &mut |part, on_event| {
        download(options, part, on_event)
    })?;
    let raw = sibling(dest, ".raw");
    let staging = sibling(dest, ".new");
    let _ = std::fs::remove_dir_all(&staging);
    extract_or_discard(&archive, &raw, &options.limits, on_event)?;
    on_event(Event::Status("organising the images into train, val and test"));
    let organised = organise(&raw, &staging, &options.split);
    let _ = std::fs::remove_dir_all(&raw);
    let mut fetched = match organised {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    fetched.archive_bytes = archive_bytes;
    let marker = Marker {
        dataset: DATASET_TAG.into(),
        fetched: fetched.clone(),
    };
    let json = serde_json::to_string_pretty(&marker).unwrap_or_default();
    install(&staging, dest, &json, &archive, options.keep_archive)?;
    fetched.root = dest.clone();
    Ok(fetched)
}

/// One file of a figshare article, as its API lists it.
#[derive(Debug, Deserialize)]
struct ArticleFile {
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    computed_md5: Option<String>,
    #[serde(default)]
    supplied_md5: Option<String>,
    download_url: String,
}

#[derive(Debug, Deserialize)]
struct Article {
    files: Vec<ArticleFile>,
}

/// Asks the API for the article's files and downloads its (largest) zip into `part`, checked
/// against the listed MD5; returns the checksums verified.
fn download(
    options: &FracAtlasOptions,
    part: &Path,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Vec<String>> {
    let client = Client::new(options.connect_timeout, options.retries, options.backoff);
    let url = format!(
        "{}/articles/{FRACATLAS_ARTICLE}",
        options.api_base.trim_end_matches('/')
    );
    on_event(Event::Status(&format!(
        "asking figshare for FracAtlas's files ({url})"
    )));
    let body = client.get_small(&url, 4 << 20)?;
    let article: Article = serde_json::from_slice(&body).map_err(|e| {
        release(
            PathBuf::from(&url),
            format!("the answer is not a figshare article ({e})"),
        )
    })?;
    let Some(file) = article
        .files
        .iter()
        .filter(|f| f.name.to_lowercase().ends_with(".zip"))
        .max_by_key(|f| f.size)
    else {
        let names: Vec<&str> = article.files.iter().map(|f| f.name.as_str()).collect();
        return Err(release(
            PathBuf::from(&url),
            format!("the article lists no zip file (files: {names:?})"),
        ));
    };
    let md5 = file
        .computed_md5
        .as_deref()
        .or(file.supplied_md5.as_deref())
        .map(hex_to_base64)
        .transpose()
        .map_err(|why| release(PathBuf::from(&url), format!("{}: {why}", file.name)))?;
    on_event(Event::Status(&format!(
        "downloading {} ({} MB) from {}",
        file.name,
        file.size >> 20,
        file.download_url
    )));
    download_verified(part, on_event, &mut |on_event| {
        let announced = client
            .download(&file.download_url, None, part, on_event)
            .map_err(|failure| match failure {
                Failure::Other(e) => e,
                Failure::Refused(status) => Error::Http {
                    url: file.download_url.clone(),
                    status,
                },
            })?;
        // The API's MD5 is the one that counts; what the file server sent is checked too.
        Ok(Announced {
            md5: md5.clone().or(announced.md5),
            crc32c: announced.crc32c,
        })
    })
}

fn hex_to_base64(hex: &str) -> std::result::Result<String, String> {
    let hex = hex.trim();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("`{hex}` is not an MD5 in hexadecimal"));
    }
    let bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Moves the release extracted at `raw` into the split layout at `staging`.
fn organise(raw: &Path, staging: &Path, plan: &SplitPlan) -> Result<FracAtlasFetched> {
    let files = walk(raw)?;
    let csv = files
        .iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().eq_ignore_ascii_case("dataset.csv"))
        })
        .ok_or_else(|| release(raw, "the release has no dataset.csv"))?;
    let rows = read_dataset_csv(csv)?;
    let mut images: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for path in &files {
        let is_image = path.extension().is_some_and(|e| {
            let e = e.to_string_lossy().to_lowercase();
            matches!(e.as_str(), "jpg" | "jpeg" | "png")
        });
        if let (true, Some(class)) = (is_image, folder_class(path)) {
            images.insert(stem(path), (path.clone(), class));
        }
    }
    if images.is_empty() {
        return Err(release(
            raw,
            "the release has no images in Fractured/Non_fractured folders",
        ));
    }
    let mut left_out = Vec::new();
    let mut listed: Vec<&Row> = Vec::new();
    for row in &rows {
        match images.get(&row.id) {
            Some((path, class)) if *class != row.class => {
                return Err(release(
                    path,
                    format!(
                        "dataset.csv calls {} {}, its folder says otherwise",
                        row.id, CLASS_FOLDERS[row.class]
                    ),
                ));
            }
            Some(_) => listed.push(row),
            None => left_out.push(format!("{} (in dataset.csv, no image file)", row.id)),
        }
    }
    let in_csv: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let mut unlisted: Vec<&String> = images.keys().filter(|id| !in_csv.contains(id.as_str())).collect();
    unlisted.sort();
    left_out.extend(
        unlisted
            .into_iter()
            .map(|id| format!("{id} (image file not in dataset.csv)")),
    );

    let mut split_of: HashMap<&str, usize> = HashMap::new();
    for class in 0..2 {
        let ids: Vec<&str> = listed
            .iter()
            .filter(|r| r.class == class)
            .map(|r| r.id.as_str())
            .collect();
        split_of.extend(plan.assign(&ids));
    }
    let mut counts = [[0usize; 2]; 3];
    for split in SPLITS {
        for class in CLASS_FOLDERS {
            let dir = staging.join(split).join(class);
            std::fs::create_dir_all(&dir).at(&dir)?;
        }
    }
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    for row in &listed {
        let (from, class) = &images[&row.id];
        let split = split_of[row.id.as_str()];
        let name = from.file_name().unwrap_or_default();
        let to = staging.join(SPLITS[split]).join(CLASS_FOLDERS[*class]).join(name);
        std::fs::rename(from, &to).at(&to)?;
        counts[split][*class] += 1;
    }

    let box_rows = write_boxes_csv(staging, &read_coco_boxes(&files)?, &listed, &split_of)?;
    write_meta_csv(staging, &listed, &split_of)?;
    let readme = readme_text(plan, &counts, box_rows);
    let path = staging.join("README.md");
    std::fs::write(&path, readme).at(&path)?;
    Ok(FracAtlasFetched {
        root: staging.to_path_buf(),
        cached: false,
        split: *plan,
        counts,
        boxes: box_rows,
        left_out,
        archive_bytes: 0,
    })
}

/// `boxes.csv` in `staging`: each listed image's fracture boxes with its split (nothing when the
/// release has no boxes). Returns the number of boxes.
fn write_boxes_csv(
    staging: &Path,
    boxes: &HashMap<String, Vec<[f64; 4]>>,
    listed: &[&Row],
    split_of: &HashMap<&str, usize>,
) -> Result<usize> {
    let mut box_rows = 0;
    if !boxes.is_empty() {
        let mut text = String::from("id,split,x,y,w,h\n");
        for row in listed {
            for b in boxes.get(&row.id).into_iter().flatten() {
                let split = SPLITS[split_of[row.id.as_str()]];
                text.push_str(&format!(
                    "{},{split},{:.1},{:.1},{:.1},{:.1}\n",
                    row.id, b[0], b[1], b[2], b[3]
                ));
                box_rows += 1;
            }
        }
        let path = staging.join("boxes.csv");
        std::fs::write(&path, text).at(&path)?;
    }

    Ok(box_rows)
}

/// `meta.csv` in `staging`: each listed image's split and the release's flags ([`META_COLUMNS`]
/// that `dataset.csv` has).
fn write_meta_csv(staging: &Path, listed: &[&Row], split_of: &HashMap<&str, usize>) -> Result<()> {
    let present: Vec<&str> = META_COLUMNS
        .iter()
        .copied()
        .filter(|c| listed.first().is_some_and(|r| r.fields.contains_key(*c)))
        .collect();
    let mut meta = format!("id,split,{}\n", present.join(","));
    for row in listed {
        let values: Vec<&str> = present.iter().map(|c| row.fields[*c].as_str()).collect();
        meta.push_str(&format!(
            "{},{},{}\n",
            row.id,
            SPLITS[split_of[row.id.as_str()]],
            values.join(",")
        ));
    }
    let path = staging.join("meta.csv");
    std::fs::write(&path, meta).at(&path)?;
    Ok(())
}

fn readme_text(plan: &SplitPlan, counts: &[[usize; 2]; 3], boxes: usize) -> String {
    let mut table = String::from("| split | fractured | not fractured |\n|---|---|---|\n");
    for (split, c) in SPLITS.iter().zip(counts) {
        table.push_str(&format!("| {split} | {} | {} |\n", c[0], c[1]));
    }
    format!(
        "# FracAtlas, as `fracture download --dataset fracatlas` laid it out\n\n\
         Source: the FracAtlas release on figshare, DOI 10.6084/m9.figshare.22363012. Abedeen et al., \
         \"FracAtlas: A Dataset for Fracture Classification, Localization and Segmentation of \
         Musculoskeletal Radiographs\", Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4. \
         Licence: CC BY 4.0; credit the dataset wherever these images or results on them are published.\n\n\
         Split: per class, images ordered by the MD5 of \"{seed}:<image id>\"; the first {test:.0}% \
         (rounded) of each class are `test`, the next {val:.0}% `val`, the rest `train` (seed {seed}). \
         FracAtlas gives no patient identifiers, so radiographs of one patient may fall in different \
         splits.\n\n{table}\n\
         `boxes.csv` holds the radiologists' fracture boxes from the release's COCO file ({boxes} rows; \
         pixels of the images as stored here); `meta.csv` each image's body region and view flags from \
         `dataset.csv`.\n",
        seed = plan.seed,
        test = plan.test * 100.0,
        val = plan.val * 100.0,
    )
}

#[cfg(test)]
mod tests;
