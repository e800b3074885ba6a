//! A bounded load check of `fracture serve`: N requests at concurrency C, each posting the same image
//! to `/api/predict`; prints requests/s, latency percentiles and the error count. It exits non-zero when
//! any request failed.
//!
//! ```text
//! fracture serve --model runs/seed128 --addr 127.0.0.1:8080 &
//! cargo run --release -p fracture-benches --example load_check -- --url http://127.0.0.1:8080 \
//!     --image ../shared/data/fracatlas/val/fractured/IMG0000019.jpg [--requests 1000] [--concurrency 16] [--heatmap]
//! ```
//! Only loopback addresses are accepted: this is a check of our own server, not a load generator.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let (mut url, mut image, mut requests, mut concurrency, mut heatmap) =
        (None, None, 1000usize, 16usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => url = args.next(),
            "--image" => image = args.next(),
            "--requests" => requests = args.next().context("--requests needs a number")?.parse()?,
            "--concurrency" => concurrency = args.next().context("--concurrency needs a number")?.parse()?,
            "--heatmap" => heatmap = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let url = url.context("--url is required")?;
    let host = url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    if !(host.starts_with("127.") || host == "localhost" || host == "[::1]") {
        bail!("{url} is not a loopback address");
    }
    let body = std::fs::read(image.context("--image is required")?)?;
    let endpoint = format!(
        "{}/api/predict{}",
        url.trim_end_matches('/'),
        if heatmap { "?heatmap=1" } else { "" }
    );
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(requests)));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (next, latencies, errors, body, endpoint) = (
                next.clone(),
                latencies.clone(),
                errors.clone(),
                body.clone(),
                endpoint.clone(),
            );
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(60)))
                    .build()
                    .new_agent();
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    let t = Instant::now();
                    let ok = match agent
                        .post(&endpoint)
                        .header("Content-Type", "image/jpeg")
                        .send(&body[..])
                    {
                        Ok(mut r) => {
                            r.status() == 200
                                && r.body_mut()
                                    .read_to_string()
                                    .is_ok_and(|b| b.contains("p_fractured"))
                        }
                        Err(_) => false,
                    };
                    if ok {
                        if let Ok(mut l) = latencies.lock() {
                            l.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        l.get(((l.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "{requests} requests, concurrency {concurrency}{}: {:.1} requests/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {errors} errors",
        if heatmap { ", with heatmaps" } else { "" },
        l.len() as f64 / seconds,
        pct(0.5),
        pct(0.99),
        l.last().copied().unwrap_or(f64::NAN),
    );
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}
