"""Qwen3-VL's vision graph, fused form against plain, alternating in one process on the same inputs.

    python benchmarks/vision-forms/ab.py FUSED_DIR PLAIN_DIR [--patches 1024,4096] [--images 2] [--runs 5]

Both folders hold the same model exported with --graph-form fused and plain.  The inputs are seeded
random patches split evenly over --images images (a 1280x720 image is 3600 patches in Qwen3-VL), so the
graph runs at real token counts whatever the preset's processor would resize to.  Prints, per count,
each form's median ms and the largest difference of their outputs."""
import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def inputs(spec, patches, images, rng):
    width = spec["temporal_patch_size"] * 3 * spec["patch_size"] ** 2
    side = spec["num_grid_per_side"]
    return {"pixel_values": rng.standard_normal((patches, width), dtype=np.float32),
            "pos_index": rng.integers(0, side * side, (patches, 4)),
            "pos_weight": rng.random((patches, 4), dtype=np.float32),
            "rope_pos": rng.integers(0, side, (patches, 2)),
            "patch_image": np.arange(patches) * images // patches}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fused"), ap.add_argument("plain")
    ap.add_argument("--patches", default="1024,4096")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sessions = {}
    for form, path in (("fused", a.fused), ("plain", a.plain)):
        manifest = json.loads((Path(path) / "pop_manifest.json").read_text())
        assert manifest["graphs"]["vision"]["form"] == form, (path, manifest["graphs"]["vision"]["form"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = a.threads, 1
        sessions[form] = ort.InferenceSession(str(Path(path) / "vision.onnx"), opts,
                                              providers=["CPUExecutionProvider"])
    spec = manifest["vision"]
    print(f"{manifest['model']['name']}, {a.threads} threads, onnxruntime {ort.__version__}")
    for patches in map(int, a.patches.split(",")):
        feeds = inputs(spec, patches, a.images, np.random.default_rng(patches))
        times, outs = {f: [] for f in sessions}, {}
        for i in range(a.runs + 1):  # the first round warms up
            for form, s in sessions.items():
                t = time.perf_counter()
                outs[form] = s.run(None, feeds)
                if i:
                    times[form].append((time.perf_counter() - t) * 1e3)
        diff = max(float(np.abs(f - p).max()) for f, p in zip(outs["fused"], outs["plain"]))
        scale = max(float(np.abs(p).max()) for p in outs["plain"])
        f, p = statistics.median(times["fused"]), statistics.median(times["plain"])
        print(f"{patches} patches in {a.images} images: fused {f:.1f} ms, plain {p:.1f} ms, plain/fused {p / f:.2f}x;"
              f" max |fused - plain| {diff:.1e} (outputs up to {scale:.1f})")


if __name__ == "__main__":
    main()
