//! `fracture download`, and fetching the Kaggle dataset or FracAtlas for `fracture train` when `--data` is not
//! given: one download path, shared with `cargo xtask download` (all call fracture-fetch).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fracture_fetch::{DatasetRef, Event, FetchOptions, FracAtlasOptions, SplitPlan, fetch, fetch_fracatlas};
use indicatif::{ProgressBar, ProgressStyle};

/// The `--dataset` value that selects the FracAtlas release on figshare instead of a Kaggle dataset.
pub(crate) const FRACATLAS: &str = "fracatlas";

/// Where a data set comes from and where it is kept: `fracture download`'s arguments, and
/// `fracture train`'s when it is given no `--data`.
#[derive(Debug, clap::Args)]
pub(crate) struct Source {
    /// The data set: a Kaggle dataset (`owner/slug`), or `fracatlas` for the FracAtlas release on
    /// figshare (CC BY 4.0; 4,083 radiographs with radiologists' boxes and body-region flags, split
    /// per class into train/val/test, 70/15/15, from `--split-seed`).
    #[arg(long, default_value = fracture_fetch::DEFAULT_DATASET)]
    pub(crate) dataset: String,
    /// Where downloaded datasets live (`<DATA_DIR>/<slug>`, or `<DATA_DIR>/fracatlas`).
    #[arg(long, env = "FRACTURE_DATA_DIR", default_value = "data")]
    pub(crate) data_dir: PathBuf,
    /// The Kaggle API base URL for downloads.
    #[arg(long, env = "FRACTURE_KAGGLE_BASE_URL", default_value = fracture_fetch::DEFAULT_BASE_URL)]
    pub(crate) base_url: String,
    /// The figshare API base URL (for `--dataset fracatlas`).
    #[arg(long, env = "FRACTURE_FIGSHARE_BASE_URL", default_value = fracture_fetch::DEFAULT_FIGSHARE_API)]
    pub(crate) figshare_url: String,
    /// The seed of FracAtlas's train/val/test split (the same seed gives the same split everywhere).
    #[arg(long, default_value_t = fracture_fetch::SplitPlan::default().seed)]
    pub(crate) split_seed: u64,
}

impl Source {
    /// The dataset's folder, downloaded first when it is not there yet.
    pub(crate) fn ensure(&self) -> anyhow::Result<PathBuf> {
        if self.dataset.trim().eq_ignore_ascii_case(FRACATLAS) {
            return ensure_fracatlas(self);
        }
        ensure_dataset(&self.dataset, &self.data_dir, &self.base_url)
    }
}

/// Arguments of `fracture download`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    source: Source,
}

/// `fracture download`: fetch the dataset (resumable, checked) and print where it is.
pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let dir = args.source.ensure()?;
    println!("dataset: {}", dir.display());
    Ok(())
}

/// Shows [`Event`]s: a progress bar on a terminal, a line every 8 MB otherwise.
#[derive(Default)]
struct Progress {
    bar: Option<ProgressBar>,
    last_line: u64,
}

impl Progress {
    fn say(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    fn show(&mut self, event: Event<'_>) {
        match event {
            Event::Status(s) => self.say(s),
            Event::Retry {
                attempt,
                wait,
                reason,
            } => self.say(&format!(
                "attempt {attempt} failed ({reason}); retrying in {:.1} s",
                wait.as_secs_f64()
            )),
            Event::Progress { downloaded, total } => {
                if std::io::stderr().is_terminal() {
                    let b = self.bar.get_or_insert_with(|| {
                        let b = ProgressBar::new(total.unwrap_or(0));
                        let style = ProgressStyle::with_template(
                            "{bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}, ETA {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> ");
                        b.set_style(style);
                        b
                    });
                    if let Some(t) = total {
                        b.set_length(t);
                    }
                    b.set_position(downloaded);
                } else if downloaded >= self.last_line + (8 << 20) || total == Some(downloaded) {
                    self.last_line = downloaded;
                    match total {
                        Some(t) => println!("  {downloaded} / {t} bytes"),
                        None => println!("  {downloaded} bytes"),
                    }
                }
            }
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// FracAtlas under `<data_dir>/fracatlas`, downloaded and split first when it is not there yet.
fn ensure_fracatlas(source: &Source) -> anyhow::Result<PathBuf> {
    let dest = source.data_dir.join(FRACATLAS);
    if dest.is_dir() && !dest.join(fracture_fetch::MARKER_FILE).is_file() {
        // A folder the user put there themselves: use it as it is.
        return Ok(dest);
    }
    let options = FracAtlasOptions {
        api_base: source.figshare_url.clone(),
        split: SplitPlan {
            seed: source.split_seed,
            ..SplitPlan::default()
        },
        ..FracAtlasOptions::new(dest.clone())
    };
    let mut progress = Progress::default();
    let fetched = fetch_fracatlas(&options, &mut |e| progress.show(e));
    progress.finish();
    let fetched = fetched.map_err(with_flag_hint).context("cannot get FracAtlas")?;
    if !fetched.cached {
        println!(
            "FracAtlas (CC BY 4.0, doi:10.6084/m9.figshare.22363012): {} bytes downloaded, split with seed {}",
            fetched.archive_bytes, fetched.split.seed
        );
        println!("{:<6} {:>10} {:>14}", "split", "fractured", "not fractured");
        for (split, c) in fracture_fetch::SPLITS.iter().zip(fetched.counts) {
            println!("{split:<6} {:>10} {:>14}", c[0], c[1]);
        }
        if !fetched.left_out.is_empty() {
            println!(
                "left out {} entr{} of the release: {}",
                fetched.left_out.len(),
                if fetched.left_out.len() == 1 { "y" } else { "ies" },
                fetched.left_out.join("; ")
            );
        }
        let boxes = dest.join("boxes.csv");
        println!(
            "boxes: {} ({} rows); flags: {}; about: {}",
            boxes.display(),
            fetched.boxes,
            dest.join("meta.csv").display(),
            dest.join("README.md").display()
        );
        println!(
            "train on it: fracture train --data {} --boxes {}",
            dest.display(),
            boxes.display()
        );
    }
    Ok(fetched.root)
}

/// The dataset's folder under `data_dir`, downloaded first when it is not there yet.
fn ensure_dataset(dataset: &str, data_dir: &Path, base_url: &str) -> anyhow::Result<PathBuf> {
    let dataset: DatasetRef = dataset.parse()?;
    let dest = data_dir.join(&dataset.slug);
    let options = FetchOptions {
        base_url: base_url.to_string(),
        ..FetchOptions::new(dataset.clone(), dest.clone())
    };
    if dest.is_dir() && !dest.join(fracture_fetch::MARKER_FILE).is_file() {
        // A folder the user put there themselves: use it as it is.
        return Ok(dest);
    }
    let mut progress = Progress::default();
    let fetched = fetch(&options, &mut |e| progress.show(e));
    progress.finish();
    let fetched = fetched
        .map_err(with_flag_hint)
        .with_context(|| format!("cannot get the dataset {dataset}"))?;
    if !fetched.cached {
        println!(
            "downloaded {dataset}: {} bytes, {} files in {}",
            fetched.archive_bytes,
            fetched.files,
            dest.display()
        );
    }
    Ok(fetched.root)
}

/// A download error with what to do about it in this command's flags (the library names none).
fn with_flag_hint(e: fracture_fetch::Error) -> anyhow::Error {
    use fracture_fetch::Error as E;
    let hint = match &e {
        E::Unreachable { .. } => Some("pass the folder of a copy downloaded elsewhere with --data DIR"),
        E::DestinationExists { .. } => Some("pass --force to replace it, or use it with --data DIR"),
        E::SplitDiffers { .. } => {
            Some("pass --force to split it again, or --split-seed with the seed it holds")
        }
        _ => None,
    };
    match hint {
        Some(hint) => anyhow::anyhow!("{e}\n({hint})"),
        None => anyhow::Error::new(e),
    }
}
