//! `fracture inspect`: what a dataset folder holds and whether every image decodes.

use std::path::PathBuf;

use anyhow::Context;

use fracture_infer::data::{
    DatasetLayout, FolderDataset, LoadOptions, PreprocessConfig, ResizeMode, SplitCounts,
};

/// Arguments of `fracture inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Dataset folder: `<DATA>/<split>/<class>/<image>` (split: train, val, test; class: fractured,
    /// not fractured, or an alias). The folder of the Kaggle zip works too: the nested root is found.
    #[arg(long)]
    data: PathBuf,
    /// The model whose preprocessing is applied (a run folder or weight file); without it, the
    /// built-in model's. `--image-size` and `--resize` override it.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Side in pixels that every image is resized to [default: the model's].
    #[arg(long)]
    image_size: Option<u32>,
    /// Resize by stretching both axes or by letterboxing (keeps the aspect ratio, pads with black)
    /// [default: the model's].
    #[arg(long, value_enum)]
    resize: Option<ResizeMode>,
    /// Folder for the on-disk cache of preprocessed images; a second run reads it instead of decoding.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let layout = DatasetLayout::discover(&args.data).context("cannot read the dataset")?;
    // The preprocessing a prediction would apply: the model's, unless overridden.
    let model = crate::commands::load_model(
        args.model.as_deref(),
        &fracture_infer::candle_core::Device::Cpu,
        super::PrecisionArg::Fp32,
    )?;
    let model_preprocess = *model.preprocess();
    let preprocess = PreprocessConfig {
        size: args.image_size.unwrap_or(model_preprocess.size),
        resize: args.resize.unwrap_or(model_preprocess.resize),
        ..model_preprocess
    };
    preprocess.validate()?;
    println!(
        "preprocessing: {size}×{size}, {:?}{}",
        preprocess.resize,
        if args.image_size.is_none() && args.resize.is_none() {
            " (the model's)"
        } else {
            ""
        },
        size = preprocess.size
    );
    let options = LoadOptions {
        disk_cache: args.cache_dir.clone(),
        ..LoadOptions::default()
    };
    let mut summary = layout.summary();
    for (split, items) in &layout.splits {
        let ds = FolderDataset::load(items, &preprocess, &options)?;
        for s in ds.skipped() {
            eprintln!("warning: skipped {s}");
        }
        let stats = ds.stats();
        println!(
            "{split}: {} images ready at {size}×{size} in {:.2} s ({:.0} images/s; {} decoded, {} from the disk cache)",
            ds.len(),
            stats.seconds,
            stats.images_per_second(),
            stats.decoded,
            stats.from_disk_cache,
            size = preprocess.size,
        );
        if stats.cache_write_failures > 0 {
            eprintln!(
                "warning: {} cache entries could not be written",
                stats.cache_write_failures
            );
        }
        if stats.cache_corrupt > 0 {
            eprintln!(
                "warning: {} cache entries failed their checksum (changed on disk) and were rebuilt",
                stats.cache_corrupt
            );
        }
        let [fractured, not_fractured] = ds.counts();
        summary.update(
            SplitCounts {
                split: *split,
                fractured,
                not_fractured,
            },
            ds.skipped(),
        );
    }
    print!("{summary}");
    Ok(())
}
