//! `fracture merge`: the result files of a sharded `fracture predict` joined into one.

use std::path::PathBuf;

use fracture_infer::archive::merge;

/// Arguments of `fracture merge`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The shards' result files (`fracture predict --shard I/N --out FILE`): all JSON Lines or all
    /// CSV with the same columns.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The merged file, rows sorted by path (written whole, then moved into place).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Write the merged file even when some shards have no rows (by default that is an error: a
    /// shard that did not run, or one whose file was left out).
    #[arg(long)]
    allow_gaps: bool,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let report = merge(&args.files, &args.out, args.allow_gaps)?;
    eprintln!(
        "merged {} rows from {} files into {}",
        report.rows,
        args.files.len(),
        args.out.display()
    );
    if !report.missing_shards.is_empty() {
        let list: Vec<String> = report.missing_shards.iter().map(u32::to_string).collect();
        let count = report.count.unwrap_or_default();
        eprintln!(
            "warning: no rows from shard(s) {} of {count} (--allow-gaps)",
            list.join(", ")
        );
    }
    Ok(())
}
