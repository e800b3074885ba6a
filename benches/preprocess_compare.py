"""Preprocessing rate of fracture-data against PIL and OpenCV, in one run on one machine.

Each implementation decodes the same 512x512 JPEG (a FracAtlas radiograph, CC BY 4.0, resized; or a
generated X-ray when ../shared is absent) and resizes it to 128x128 grayscale, on one thread, for a
fixed time budget. Prints a table of images/s and the ratio of each to ours.

Set-up once (PIL and OpenCV from PyPI):  cargo xtask setup-python   (a venv in target/pyref)
Usage:                                   cargo xtask bench-preprocess [--seconds S]
"""
import os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0


def rate(fn):
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def main():
    from PIL import Image
    import io
    shared = os.environ.get("FRACTURE_SHARED_DIR", os.path.join(ROOT, "..", "shared"))
    src_dir = os.path.join(shared, "data", "fracatlas", "train", "fractured")
    out = os.path.join(ROOT, "target", "tmp", "preprocess_512.jpg")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.isdir(src_dir):
        first = sorted(os.listdir(src_dir))[0]
        Image.open(os.path.join(src_dir, first)).convert("L").resize((512, 512), Image.BILINEAR).convert("RGB").save(out, quality=75)
        source = f"FracAtlas {first} (CC BY 4.0), resized to 512x512"
    else:
        import numpy as np
        y, x = np.mgrid[0:512, 0:512]
        Image.fromarray(((np.sin(x / 20.0) * np.cos(y / 30.0) + 1) * 120).astype("uint8")).convert("RGB").save(out, quality=75)
        source = "generated 512x512 image (../shared absent)"
    data = open(out, "rb").read()

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "fracture-benches", "--example", "preprocess_rate"], cwd=ROOT, check=True)
    exe = os.path.join(ROOT, "target", "release", "examples", "preprocess_rate")
    res = subprocess.run([exe, out, str(SECONDS)], capture_output=True, text=True, check=True, env=dict(os.environ, RAYON_NUM_THREADS="1"))
    rates = {}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT"):
            kv = dict(p.split("=", 1) for p in line.split()[1:])
            rates[kv["impl"]] = float(kv["img_per_s"])

    def pil():
        im = Image.open(io.BytesIO(data))
        im.convert("L").resize((128, 128), Image.BILINEAR)
    rates["PIL (convert L + bilinear)"] = rate(pil)
    try:
        import cv2, numpy as np
        cv2.setNumThreads(1)
        buf = np.frombuffer(data, np.uint8)
        rates["OpenCV (IMREAD_GRAYSCALE + INTER_AREA)"] = rate(lambda: cv2.resize(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), (128, 128), interpolation=cv2.INTER_AREA))
    except ImportError:
        print("OpenCV not installed: pip install opencv-python-headless", file=sys.stderr)

    ours = rates["fracture-data"]
    print(f"decode + grayscale + resize to 128x128, one thread, {SECONDS:.0f} s each; input: {source}")
    print(f"{'implementation':42} {'images/s':>9} {'ours / it':>10}")
    for name, r in rates.items():
        print(f"{name:42} {r:9.0f} {ours / r:9.2f}x")


if __name__ == "__main__":
    main()
