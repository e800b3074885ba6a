//! How much the preprocessed-image cache saves: one pass over a dataset that decodes every image,
//! then the same pass served from the on-disk cache, then an epoch of batches from memory.
//!
//! ```text
//! cargo run --release -p fracture-benches --example cache_pass [-- --data DIR --image-size 128]
//! ```
//! Without `--data` it reads the FracAtlas radiographs at `../shared/data/fracatlas` (CC BY 4.0,
//! Abedeen et al. 2023).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use fracture_data::{
    DatasetLayout, FolderDataset, Item, LoadOptions, PreprocessConfig, epoch_order, make_batch,
};

fn main() -> anyhow::Result<()> {
    let mut data: Option<PathBuf> = None;
    let mut size = 128u32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--data" => data = args.next().map(PathBuf::from),
            "--image-size" => size = args.next().context("--image-size needs a value")?.parse()?,
            other => bail!("unknown argument {other} (use --data DIR, --image-size N)"),
        }
    }
    let data = match data {
        Some(d) => d,
        None => fracture_testkit::shared_dir().join("data/fracatlas"),
    };
    let layout = DatasetLayout::discover(&data)
        .with_context(|| format!("no dataset at {} (pass --data DIR)", data.display()))?;
    let items: Vec<Item> = layout.splits.values().flatten().cloned().collect();
    let cache = std::env::temp_dir().join(format!("fracture-cache-pass-{}", std::process::id()));
    let options = LoadOptions {
        disk_cache: Some(cache.clone()),
        ..LoadOptions::default()
    };
    let cfg = PreprocessConfig::with_size(size);

    let first = FolderDataset::load(&items, &cfg, &options)?;
    let second = FolderDataset::load(&items, &cfg, &options)?;
    let t = Instant::now();
    let order = epoch_order(first.len(), 0, 0, true);
    let mut seen = 0;
    for chunk in order.chunks(32) {
        seen += make_batch(&first, chunk, None)?.len();
    }
    let memory_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&cache);

    let (a, b) = (first.stats(), second.stats());
    println!(
        "{} images from {} at {size}×{size}, {} threads",
        items.len(),
        layout.root.display(),
        threads()
    );
    println!(
        "first pass (decode + resize + cache write): {:>8.3} s  {:>9.0} images/s",
        a.seconds,
        a.images_per_second()
    );
    println!(
        "second pass (on-disk cache):                {:>8.3} s  {:>9.0} images/s",
        b.seconds,
        b.images_per_second()
    );
    println!(
        "epoch of batches from memory:               {:>8.3} s  {:>9.0} images/s",
        memory_s,
        seen as f64 / memory_s
    );
    println!(
        "speed-up of the second pass: {:.0}×; of an in-memory epoch: {:.0}×",
        a.seconds / b.seconds,
        a.seconds / memory_s
    );
    if b.decoded != 0 || b.from_disk_cache != first.len() {
        bail!(
            "the second pass decoded {} images instead of reading them all from the cache",
            b.decoded
        );
    }
    Ok(())
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
