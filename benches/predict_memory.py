"""Peak memory (resident set) of `fracture predict` over many radiographs.

For each count N given (default 512 and 10000), builds a folder of N hard links that cycle through
the 512 val radiographs of ../shared/data/fracatlas (FracAtlas, CC BY 4.0) under
target/predict-memory/N, runs the release binary on it with the built-in model (evidence on, as by
default) once per output format, output to /dev/null, and prints each run's peak RSS (the child's
ru_maxrss from wait4: exact, not sampled), its wall time and images/s.

Set-up once:  cargo build --release -p fracture-cli
Usage:        python3 benches/predict_memory.py [--formats csv,json] [N ...]
"""
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


def main():
    args = sys.argv[1:]
    formats = ["csv", "json"]
    if args[:1] == ["--formats"]:
        formats = args[1].split(",")
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
    for n in counts:
        folder = folder_of(n, sources)
        for fmt in formats:
            peak, seconds = run(binary, folder, fmt)
            print(f"{n:>7} {fmt:>6} {peak / 2**20:>7.0f} MiB {seconds:>8.1f} {n / seconds:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
