//! `fracture download`, and fetching the Kaggle dataset for `fracture train` when `--data` is not
//! given: one download path, shared with `cargo xtask download` (all call fracture-fetch).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fracture_fetch::{DatasetRef, Event, FetchOptions, fetch};
use indicatif::{ProgressBar, ProgressStyle};

/// Where a Kaggle dataset comes from and where it is kept: `fracture download`'s arguments, and
/// `fracture train`'s when it is given no `--data`.
#[derive(Debug, clap::Args)]
pub(crate) struct Source {
    /// The Kaggle dataset (`owner/slug`).
    #[arg(long, default_value = fracture_fetch::DEFAULT_DATASET)]
    pub(crate) dataset: String,
    /// Where downloaded datasets live (`<DATA_DIR>/<slug>`).
    #[arg(long, env = "FRACTURE_DATA_DIR", default_value = "data")]
    pub(crate) data_dir: PathBuf,
    /// The Kaggle API base URL for downloads.
    #[arg(long, env = "FRACTURE_KAGGLE_BASE_URL", default_value = fracture_fetch::DEFAULT_BASE_URL)]
    pub(crate) base_url: String,
}

impl Source {
    /// The dataset's folder, downloaded first when it is not there yet.
    pub(crate) fn ensure(&self) -> anyhow::Result<PathBuf> {
        ensure_dataset(&self.dataset, &self.data_dir, &self.base_url)
    }
}

/// Arguments of `fracture download`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    source: Source,
}

/// `fracture download`: fetch the dataset (anonymously, then with Kaggle credentials; resumable,
/// checked) and print where it is.
pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let dir = args.source.ensure()?;
    println!("dataset: {}", dir.display());
    Ok(())
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
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut last_line = 0u64;
    let fetched = fetch(&options, &mut |event| match event {
        Event::Status(s) => match &bar {
            Some(b) => b.println(s),
            None => println!("{s}"),
        },
        Event::Retry {
            attempt,
            wait,
            reason,
        } => {
            let line = format!(
                "attempt {attempt} failed ({reason}); retrying in {:.1} s",
                wait.as_secs_f64()
            );
            match &bar {
                Some(b) => b.println(line),
                None => println!("{line}"),
            }
        }
        Event::Progress { downloaded, total } => {
            if tty {
                let b = bar.get_or_insert_with(|| {
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
            } else if downloaded >= last_line + (8 << 20) || total == Some(downloaded) {
                last_line = downloaded;
                match total {
                    Some(t) => println!("  {downloaded} / {t} bytes"),
                    None => println!("  {downloaded} bytes"),
                }
            }
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let fetched = fetched.with_context(|| format!("cannot get the dataset {dataset}"))?;
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
