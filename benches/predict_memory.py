"""Peak memory (resident set) of `fracture predict` over many radiographs.

For each count N given (default 512 and 10000), builds a folder of N hard links that cycle through
the 512 val radiographs of ../shared/data/fracatlas (FracAtlas, CC BY 4.0) under
target/predict-memory/N, runs the release binary on it with the built-in model (evidence on, as by
default) once per output format, output to /dev/null, and prints each run's peak RSS (the child's
ru_maxrss from wait4: exact, not sampled), its wall time and images/s.

With --kill-resume K, each count is instead scored the way a batch job does it
(`--out FILE.jsonl --resume`): the run is killed with SIGKILL K times at random moments (seeded),
after each kill the file is checked (every whole line a JSON object, at most one cut-off line at
the end) and the run resumed, until all N rows are written, each once; it prints the rows after each run, the
peak RSS over the runs and the total wall time (which includes the images in flight at each kill,
predicted again).

Set-up once:  cargo build --release -p fracture-cli
Usage:        python3 benches/predict_memory.py [--formats csv,json] [--kill-resume K] [N ...]
"""
import json
import random
import signal
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_of(n, sources):
    """A folder of n hard links (symbolic links where hard links fail) over the source files."""
    dest = os.path.join(ROOT, "target", "predict-memory", str(n))
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest
    os.makedirs(dest, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        link = os.path.join(dest, f"{i:06d}-{os.path.basename(src)}")
        if not os.path.exists(link):
            try:
                os.link(src, link)
            except OSError:
                os.symlink(os.path.abspath(src), link)
    open(marker, "w").close()
    return dest


def run(binary, folder, fmt):
    start = time.perf_counter()
    with open(os.devnull, "wb") as null:
        child = subprocess.Popen(
            [binary, "predict", "--format", fmt, folder], stdout=null, stderr=subprocess.PIPE
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        err = child.stderr.read().decode(errors="replace")
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(f"fracture predict failed ({child.returncode}):\n{err[-2000:]}")
    # Linux reports ru_maxrss in KiB.
    return usage.ru_maxrss * 1024, seconds


def check_rows(path):
    """The rows of a result file left by a killed run: (whole rows, paths, cut-off bytes)."""
    data = open(path, "rb").read() if os.path.exists(path) else b""
    whole, _, cut = data.rpartition(b"\n")
    paths = []
    for line in whole.split(b"\n") if whole else []:
        row = json.loads(line)  # every whole line must be a JSON object
        paths.append(row["path"])
    return paths, len(cut)


def kill_resume(binary, folder, n, kills, seed=7):
    out = folder.rstrip("/") + ".jsonl"
    if os.path.exists(out):
        os.remove(out)
    rng = random.Random(seed)
    peak, start = 0, time.perf_counter()
    for attempt in range(kills + 1):
        before = len(check_rows(out)[0])
        child = subprocess.Popen(
            [binary, "predict", "--resume", "--out", out, folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if attempt < kills:
            # Somewhere in the first two thirds of what is left (about 60 images/s here).
            time.sleep(rng.uniform(1.0, max(1.5, (n - before) / 60 * 0.66)))
            child.send_signal(signal.SIGKILL)
        _, status, usage = os.wait4(child.pid, 0)
        peak = max(peak, usage.ru_maxrss * 1024)
        paths, cut = check_rows(out)
        if len(set(paths)) != len(paths):
            sys.exit(f"{out}: a path written twice after attempt {attempt}")
        print(f"  run {attempt + 1}: {'killed' if attempt < kills else 'finished'} with {len(paths)} rows"
              f" ({cut} bytes cut off)", flush=True)
    seconds = time.perf_counter() - start
    paths, cut = check_rows(out)
    if len(paths) != n or cut:
        sys.exit(f"{out}: {len(paths)} rows of {n}, {cut} bytes cut off")
    return peak, seconds


def main():
    args = sys.argv[1:]
    formats = ["csv", "json"]
    kills = None
    while args[:1] in (["--formats"], ["--kill-resume"]):
        if args[0] == "--formats":
            formats = args[1].split(",")
        else:
            kills = int(args[1])
        args = args[2:]
    counts = [int(a) for a in args] or [512, 10000]
    shared = os.environ.get("FRACTURE_SHARED_DIR", os.path.join(ROOT, "..", "shared"))
    val = os.path.join(shared, "data", "fracatlas", "val")
    if not os.path.isdir(val):
        sys.exit(f"{val} is absent: this benchmark needs the FracAtlas radiographs in ../shared")
    sources = sorted(
        os.path.join(val, c, f) for c in sorted(os.listdir(val)) for f in os.listdir(os.path.join(val, c))
    )
    binary = os.path.join(ROOT, "target", "release", "fracture")
    if not os.access(binary, os.X_OK):
        sys.exit(f"{binary} is absent: run `cargo build --release -p fracture-cli` first")
    print(f"fracture predict, built-in model, evidence on; {os.cpu_count()} CPUs")
    print(f"{'images':>7} {'format':>6} {'peak RSS':>10} {'seconds':>8} {'images/s':>9}")
    if kills is not None:
        for n in counts:
            folder = folder_of(n, sources)
            print(f"{n} images, --out FILE.jsonl --resume, killed {kills} times:")
            peak, seconds = kill_resume(binary, folder, n, kills)
            print(f"{n:>7} jsonl {peak / 2**20:>7.0f} MiB {seconds:>8.1f} {n / seconds:>9.1f}  all {n} rows, each once")
        return
    for n in counts:
        folder = folder_of(n, sources)
        for fmt in formats:
            peak, seconds = run(binary, folder, fmt)
            print(f"{n:>7} {fmt:>6} {peak / 2**20:>7.0f} MiB {seconds:>8.1f} {n / seconds:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
