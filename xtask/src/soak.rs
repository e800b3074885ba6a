//! `cargo xtask soak`: `fracture serve` holding many idle connections under a steady prediction load,
//! on loopback. It checks that `/api/health` keeps answering quickly throughout and that the
//! server's memory comes back near its start once the load is gone; then it sends many large
//! uploads at once (`--uploads`, 100 of 19 MB by default) and checks that the server's memory
//! stays under 1 GB (uploads beyond the admission queue are answered 503 before their bodies are
//! read).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

type DynError = Box<dyn std::error::Error>;

/// One HTTP/1.1 request on a fresh connection; the status code of the answer.
fn request(addr: &str, head: &str, body: &[u8]) -> Result<u16, DynError> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let line = String::from_utf8_lossy(&answer[..answer.len().min(12)]).into_owned();
    Ok(line.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0))
}

/// One upload on a fresh connection, sent in 64 KB pieces; the status code of the answer, which
/// may come before the body is all sent (a 503 to an upload that was not admitted), so a failed
/// write still reads the answer.
fn upload(addr: &str, head: &str, body: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    if s.write_all(head.as_bytes()).is_ok() {
        for piece in body.chunks(64 << 10) {
            if s.write_all(piece).is_err() {
                break;
            }
        }
    }
    let mut answer = [0u8; 12];
    let mut got = 0;
    while got < answer.len() {
        match s.read(&mut answer[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    String::from_utf8_lossy(&answer[..got])
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of a process, in MB (Linux `/proc`).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Builds `fracture` in release and starts `fracture serve` on a free loopback port with room for
/// `idle` idle connections held `seconds`: the process, its pid and its address.
fn start_server(
    root: &Path,
    model: &Path,
    idle: usize,
    seconds: u64,
) -> Result<(std::process::Child, u32, String), DynError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "-q", "-p", "fracture-cli"])
        .status()?;
    if !built.success() {
        return Err("building fracture failed".into());
    }
    let mut server = Command::new(root.join("target/release/fracture"))
        .args(["serve", "--addr", "127.0.0.1:0", "--model"])
        .arg(model)
        .args(["--max-connections", &(idle + 1000).to_string()])
        .args(["--header-timeout-secs", &(seconds * 4 + 60).to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = server.id();
    let mut line = String::new();
    BufReader::new(server.stdout.take().ok_or("no server output")?).read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .map(|a| a.trim_end_matches('/').to_string())
        .ok_or_else(|| format!("unexpected server output: {line}"))?;
    Ok((server, pid, addr))
}

/// Two clients sending `head` + `body` to `addr` for five seconds ([`start_load`], stopped).
fn warm_up(addr: &str, head: &str, body: &[u8]) {
    let (stop, _, _, clients) = start_load(addr, head, body);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        let _ = t.join();
    }
}

/// `uploads` clients at once each sending `body` padded to 19 MB (under the 20 MB upload limit):
/// how many were answered (200 or 400), refused as busy (503) or neither, and the server's RSS in
/// MB before and at its peak.
fn upload_burst(addr: &str, body: &[u8], uploads: usize, pid: u32) -> (usize, usize, usize, f64, f64) {
    // Many large uploads at once: the image padded to 19 MB (under the 20 MB upload limit).
    let mut big = body.to_vec();
    big.resize(19 << 20, 0);
    let big = Arc::new(big);
    let big_head = format!(
        "POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    );
    let before_uploads_mb = rss_mb(pid).unwrap_or(0.0);
    let burst: Vec<_> = (0..uploads)
        .map(|_| {
            let (addr, head, big) = (addr.to_string(), big_head.clone(), big.clone());
            std::thread::spawn(move || upload(&addr, &head, &big))
        })
        .collect();
    let mut upload_peak_mb = before_uploads_mb;
    while !burst.iter().all(std::thread::JoinHandle::is_finished) {
        upload_peak_mb = upload_peak_mb.max(rss_mb(pid).unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(20));
    }
    let statuses: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap_or(0)).collect();
    let count = |f: &dyn Fn(u16) -> bool| statuses.iter().filter(|&&c| f(c)).count();
    let answered = count(&|c| c == 200 || c == 400);
    let busy = count(&|c| c == 503);
    let other = statuses.len() - answered - busy;
    (answered, busy, other, before_uploads_mb, upload_peak_mb)
}

/// Up to `idle` connections to `addr` opened and left idle, and the seconds that took.
fn hold_idle(addr: &str, idle: usize) -> (Vec<TcpStream>, f64) {
    let opened = Instant::now();
    let mut held = Vec::with_capacity(idle);
    for _ in 0..idle {
        match TcpStream::connect(addr) {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("could open only {} idle connections: {e}", held.len());
                break;
            }
        }
    }
    let open_s = opened.elapsed().as_secs_f64();
    (held, open_s)
}

/// The load's stop flag, its counts of answers that were 200 and of the others, and its threads.
type Load = (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<std::thread::JoinHandle<()>>,
);

/// Two clients sending `head` + `body` to `addr` until the stop flag is set, counting the answers
/// that were 200 and the others.
fn start_load(addr: &str, head: &str, body: &[u8]) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let (addr, head, body) = (addr.to_string(), head.to_string(), body.to_vec());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match request(&addr, &head, &body) {
                        Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    (stop, ok, failed, load)
}

pub(crate) fn run(args: &[String], root: &Path) -> Result<(), DynError> {
    let mut uploads = 100usize;
    let (mut model, mut idle, mut seconds, mut image) = (
        None::<PathBuf>,
        10_000usize,
        30u64,
        root.join("../shared/data/fracatlas/val/fractured/IMG0000019.jpg"),
    );
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--idle" => idle = value()?.parse()?,
            "--seconds" => seconds = value()?.parse()?,
            "--image" => image = PathBuf::from(value()?),
            "--uploads" => uploads = value()?.parse()?,
            other => return Err(format!("soak: unknown option `{other}`").into()),
        }
    }
    let model = model.ok_or("soak: --model RUN_OR_FILE is required (a trained model)")?;
    let body = std::fs::read(&image).map_err(|e| format!("{}: {e}", image.display()))?;
    let (mut server, pid, addr) = start_server(root, &model, idle, seconds)?;
    let predict_head = format!(
        "POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let health_head = "GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    // Warm-up with the load's own pattern (two clients, five seconds), so that "start" is the
    // server's working set under that load: inference buffers are pooled per thread and kept for
    // reuse by design; what must come back is anything beyond that.
    warm_up(&addr, &predict_head, &body);
    std::thread::sleep(Duration::from_secs(1));
    let start_mb = rss_mb(pid).unwrap_or(0.0);

    let (held, open_s) = hold_idle(&addr, idle);

    let (stop, ok, failed, load) = start_load(&addr, &predict_head, &body);
    let mut latencies = Vec::new();
    let mut health_failures = 0usize;
    let mut peak_mb = start_mb;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let t = Instant::now();
        match request(&addr, health_head, b"") {
            Ok(200) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
            _ => health_failures += 1,
        }
        peak_mb = peak_mb.max(rss_mb(pid).unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    let still_open = held.len();
    drop(held);
    std::thread::sleep(Duration::from_secs(3));
    let end_mb = rss_mb(pid).unwrap_or(0.0);

    let (answered, busy, other, before_uploads_mb, upload_peak_mb) = upload_burst(&addr, &body, uploads, pid);
    let _ = server.kill();
    let _ = server.wait();

    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let max = latencies.last().copied().unwrap_or(f64::NAN);
    println!("| | value |\n|---|---|");
    println!("| idle connections held | {still_open} (opened in {open_s:.1} s) |");
    println!(
        "| predictions during {seconds} s | {} ok, {} failed |",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    println!(
        "| /api/health | {} answers, {health_failures} failures; p50 {:.1} ms, p99 {:.1} ms, max {max:.1} ms |",
        latencies.len(),
        pct(0.5),
        pct(0.99)
    );
    println!(
        "| server memory (RSS) | {start_mb:.0} MB at start, {peak_mb:.0} MB peak, {end_mb:.0} MB after ({:+.0}%) |",
        (end_mb / start_mb - 1.0) * 100.0
    );
    println!(
        "| {uploads} concurrent 19 MB uploads | {answered} admitted and answered, {busy} answered 503 (busy), {other} other; server RSS {before_uploads_mb:.0} MB before, {upload_peak_mb:.0} MB peak |"
    );
    let mut problems = Vec::new();
    if upload_peak_mb >= 1024.0 {
        problems.push(format!(
            "{uploads} concurrent uploads took the server to {upload_peak_mb:.0} MB (target: under 1 GB)"
        ));
    }
    if other > 0 {
        problems.push(format!("{other} uploads got no answer or an unexpected one"));
    }
    if health_failures > 0 || max.is_nan() || max >= 100.0 {
        problems.push(format!(
            "/api/health: {health_failures} failures, max {max:.1} ms (target: none, < 100 ms)"
        ));
    }
    if end_mb > start_mb * 1.2 {
        problems.push(format!(
            "memory after the load {end_mb:.0} MB is over 120% of the start {start_mb:.0} MB"
        ));
    }
    if failed.load(Ordering::Relaxed) > 0 {
        problems.push("some predictions failed".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; ").into())
    }
}
