//! `fracture`: the command line of the fracture toolkit. Glue only: arguments, device choice and
//! printing; the work happens in the library crates (through `fracture_train`).
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod commands;

use clap::{Parser, Subcommand};

// Training allocates and frees tens of megabytes per step; mimalloc reuses that memory instead of
// mapping and unmapping it (page faults and TLB shootdowns) every step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc to keep freed memory mapped instead of returning it to the OS 10 ms later: a
/// training step frees and re-allocates the same tens of megabytes, and handing them back costs a
/// page fault per 4 KiB on every step (about 8% of a 128 px step on 2 cores). Peak memory is
/// unchanged; the resident size simply stays at the peak.
fn keep_freed_memory() {
    set_purge_delay(-1);
}

/// Tells mimalloc to return memory to the OS one second after it is freed: a server's load comes in
/// bursts (10,000 idle connections, then none). With mimalloc's default the soak (`cargo xtask
/// soak`) measured the resident size 67% above its start after the connections closed; with a
/// delay of 0, 11% but a third fewer predictions (buffers faulted in again every request); with one
/// second, 8% and most of the throughput.
fn return_freed_memory() {
    set_purge_delay(1000);
}

/// Sets mimalloc's `mi_option_purge_delay` (milliseconds; -1 = never purge).
#[allow(unsafe_code)]
fn set_purge_delay(ms: std::os::raw::c_long) {
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: `mi_option_set` only stores an integer option; it is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, ms) };
}

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
    /// Train a classifier on a dataset folder; writes the best model, checkpoints, metrics.csv and
    /// report.json to a run folder.
    Train(Box<commands::train::Args>),
    /// Evaluate a trained model on labelled images: a table of clinical metrics with 95% confidence
    /// intervals, report.json, predictions.csv and charts (confusion matrix, ROC, PR, calibration).
    Eval(commands::eval::Args),
    /// Predict P(fractured) and the label for image files or folders.
    Predict(commands::predict::Args),
    /// Serve a web page (and a JSON API) to upload X-rays and see P(fractured), the decision and a
    /// heatmap of the evidence.
    Serve(commands::serve::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A server runs for days and its load comes in bursts: there memory goes back to the OS.
    if matches!(cli.command, Command::Serve(_)) {
        return_freed_memory();
    } else {
        keep_freed_memory();
    }

    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(&args),
        Command::Train(args) => commands::train::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Predict(args) => commands::predict::run(&args),
        Command::Serve(args) => commands::serve::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
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
