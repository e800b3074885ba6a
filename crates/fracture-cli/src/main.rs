//! `fracture`: the command line of the fracture toolkit. Glue only: arguments, device choice and
//! printing; the work happens in the library crates (`fracture_infer` for models, prediction and
//! reports, `fracture_train` for training).
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod commands;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: fracture_alloc::MiMalloc = fracture_alloc::MiMalloc;

/// Train, evaluate and serve convolutional networks that classify bone X-rays as fractured or not.
#[derive(Debug, Parser)]
#[command(name = "fracture", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Find and decode every image of a dataset; print images per split and class, skipped files and
    /// the decoding rate.
    Inspect(commands::inspect::Args),
    /// Find exact and near duplicates (flipped, rotated, cropped, resized, re-encoded copies) within
    /// and across the splits of a dataset; writes audit.json, duplicates.csv and contact sheets.
    Audit(commands::audit::Args),
    /// Train a classifier on a dataset folder; writes the best model, checkpoints, metrics.csv and
    /// report.json to a run folder.
    Train(Box<commands::train::Args>),
    /// Evaluate a trained model on labelled images: a table of clinical metrics with 95% confidence
    /// intervals, report.json, predictions.csv and charts (confusion matrix, ROC, PR, calibration).
    Eval(commands::eval::Args),
    /// Predict P(fractured) and the label for image files or folders.
    Predict(commands::predict::Args),
    /// Join the result files of a sharded `predict` (`--shard I/N --out FILE`) into one, refusing
    /// an image written twice and shards without rows.
    Merge(commands::merge::Args),
    /// Serve a web page (and a JSON API) to upload X-rays and see P(fractured), the decision and a
    /// heatmap of the evidence.
    Serve(commands::serve::Args),
    /// Download a data set into `--data-dir` when it is not there yet, and print its folder: the
    /// Kaggle dataset `--dataset owner/slug`, or the FracAtlas release with `--dataset fracatlas`.
    Download(commands::download::Args),
    /// Write a trained model as one compact file (half-precision weights) with its training
    /// fingerprints beside it, as `crates/fracture-cli/models/` holds the ready model.
    Export(commands::export::Args),
    /// Fit a model's probability calibration (Platt scaling) and its operating threshold on labelled
    /// validation images, and write the model with them.
    Calibrate(commands::calibrate::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A server runs for days and its load comes in bursts: there memory goes back to the OS.
    if matches!(cli.command, Command::Serve(_)) {
        fracture_alloc::return_freed_memory();
    } else {
        fracture_alloc::keep_freed_memory();
        end_quietly_on_a_closed_pipe();
    }

    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(&args),
        Command::Audit(args) => commands::audit::run(&args),
        Command::Train(args) => commands::train::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Predict(args) => commands::predict::run(&args),
        Command::Merge(args) => commands::merge::run(&args),
        Command::Serve(args) => commands::serve::run(&args),
        Command::Download(args) => commands::download::run(&args),
        Command::Export(args) => commands::export::run(&args),
        Command::Calibrate(args) => commands::calibrate::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A command whose output is piped into a reader that stops early (`fracture audit | head -1`)
/// ends as every Unix filter does, by the broken-pipe signal, instead of panicking in `println!`.
/// Commands write their files before they print, so nothing is lost. Not for the server, whose
/// sockets must see a closed peer as an error, not a signal.
fn end_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    #[allow(unsafe_code)]
    // SAFETY: setting a signal's disposition to SIG_DFL at start-up, before any other thread
    // exists, has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message already
/// holds (our library errors name their cause in their own text).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}
