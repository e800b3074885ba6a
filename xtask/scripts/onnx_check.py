"""Runs an exported fracture ONNX file in ONNX Runtime (CPU) for `cargo xtask onnx-check`.

Reads N preprocessed images (N x 1 x S x S little-endian float32, gray values / 255, written by
the xtask with fracture's own preprocessing), runs them as one batch, and times one image at a time.
Prints one JSON object: the outputs, ONNX Runtime's version, and the batch-1 latency in ms. Given
the image files too (a sixth argument: a file with one path per line, in the same order), it also
preprocesses them with Pillow as the README's Python example does and reports P from those inputs,
to show how close a Python pipeline gets without fracture's own resizing.
"""

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def pillow_input(path: str, preprocess: dict) -> np.ndarray:
    """The README's Python preprocessing: gray, fitted to S x S (stretch or letterbox), / 255."""
    from PIL import Image

    side = preprocess["size"]
    image = Image.open(path).convert("L")
    if preprocess.get("resize", "stretch") == "letterbox":
        scale = side / max(image.size)
        w, h = (max(1, min(side, int(v * scale + 0.5))) for v in image.size)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(image.resize((w, h), Image.BILINEAR), ((side - w) // 2, (side - h) // 2))
        image = canvas
    else:
        image = image.resize((side, side), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)[None, None] / 255.0


def main() -> None:
    model, inputs, n, side, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    images = np.fromfile(inputs, dtype="<f4").reshape(n, 1, side, side)
    options = ort.SessionOptions()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"image": images})))
    pillow = None
    if len(sys.argv) > 6:
        preprocess = json.loads(session.get_modelmeta().custom_metadata_map["fracture.preprocess"])
        with open(sys.argv[6], encoding="utf-8") as f:
            paths = [line.rstrip("\n") for line in f if line.strip()]
        batch = np.concatenate([pillow_input(p, preprocess) for p in paths])
        pillow = [float(p) for p in session.run(["p_fractured"], {"image": batch})[0]]
    one = images[:1]
    for _ in range(3):
        session.run(["p_fractured"], {"image": one})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["p_fractured"], {"image": one})
        times.append((time.perf_counter() - start) * 1000.0)
    print(
        json.dumps(
            {
                "onnxruntime": ort.__version__,
                "outputs": names,
                "p_fractured": [float(p) for p in outputs["p_fractured"]],
                "fractured": [bool(d) for d in outputs["fractured"]],
                "map_shape": list(outputs["fracture_map"].shape) if "fracture_map" in outputs else None,
                "metadata": session.get_modelmeta().custom_metadata_map,
                "p_fractured_pillow": pillow,
                "latency_ms_median": statistics.median(times),
                "threads": options.intra_op_num_threads,
            }
        )
    )


if __name__ == "__main__":
    main()
