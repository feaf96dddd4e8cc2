"""One 4-bit matrix product at prompt shapes, four ways, on ONNX Runtime's CPU provider: fp32 MatMul,
MatMulNBits with fp32 products (accuracy_level 1) and with int8 activations (accuracy_level 4), and the
integer GEMM that `--weights-compute int8-gemm` writes into POP's prefill graph (exporter/quantize.py
integer_product: int8 activations per token, int8 weights per column, MatMulInteger), random weights, one
session per variant, best of two sessions.  The shapes are the MLP input products of models
this project exports, from the two real ones measured here to the Llama-3 sizes our users serve; they
decide which --weights-compute the int4 default takes in POP's prefill graph.

    .venv/bin/python benchmarks/quantized/matmulnbits_levels.py --threads 2 --out benchmarks/quantized/levels
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pop.exporter.quantize import INTEGER_CONSTANTS, integer_product

SHAPES = [  # (rows, in, out, what)
    (512, 576, 1536, "smollm2-135m MLP up, 512-token chunk"),
    (512, 640, 2048, "gemma3-270m MLP up, 512-token chunk"),
    (512, 2048, 8192, "Llama-3.2-1B MLP up, 512-token chunk"),
    (512, 4096, 14336, "Llama-3-8B MLP up, 512-token chunk"),
    (1, 2048, 8192, "Llama-3.2-1B MLP up, one decode row"),
]


def graph(node, inits, k, n, m):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                               helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def nbits(m, k, n, level, rng):
    blocks = k // 32
    b = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    s = rng.random(n * blocks).astype(np.float32) * 0.01
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=32, accuracy_level=level)
    return graph(node, [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")], k, n, m)


def integer(m, k, n, rng):
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    s = rng.random(n).astype(np.float32) * 0.01
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(s, "S")]
    inits += [numpy_helper.from_array(v, name) for name, v in INTEGER_CONSTANTS.items()]
    g = helper.make_graph(integer_product("A", "W", "S", "Y"), "g",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def dense(m, k, n, rng):
    w = rng.standard_normal((k, n)).astype(np.float32)
    return graph(helper.make_node("MatMul", ["A", "W"], ["Y"]), [numpy_helper.from_array(w, "W")], k, n, m)


def timed(model, a, threads, seconds=0.5):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    s = ort.InferenceSession(model, o)
    for _ in range(2):
        s.run(None, {"A": a})
    t = time.perf_counter()
    s.run(None, {"A": a})
    reps = max(3, int(seconds / (time.perf_counter() - t)))
    t = time.perf_counter()
    for _ in range(reps):
        s.run(None, {"A": a})
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    rows = []
    for m, k, n, what in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.random((m, k), dtype=np.float32)
        variants = {"fp32": dense(m, k, n, rng), "level 1": nbits(m, k, n, 1, rng), "level 4": nbits(m, k, n, 4, rng),
                    "int8 GEMM": integer(m, k, n, rng)}
        ms = {name: min(timed(model, x, a.threads) for _ in range(2)) for name, model in variants.items()}
        rows.append({"shape": [m, k, n], "what": what, "ms": ms})
        print(f"{what}: " + ", ".join(f"{v} {t:.2f} ms" for v, t in ms.items()), flush=True)
    lines = [f"ONNX Runtime {ort.__version__}, CPU provider, {a.threads} threads, best of two sessions.", "",
             "| product | rows x in x out | fp32 MatMul ms | int4, fp32 products (level 1) ms | int4, int8 activations "
             "(level 4) ms | level 4 / level 1 | int8 GEMM, per-token activations (int8-gemm) ms | int8 GEMM / fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['what']} | {' x '.join(map(str, r['shape']))} | {ms['fp32']:.2f} | {ms['level 1']:.2f} | "
                     f"{ms['level 4']:.2f} | {ms['level 4'] / ms['level 1']:.2f} | {ms['int8 GEMM']:.2f} | "
                     f"{ms['int8 GEMM'] / ms['fp32']:.2f} |")
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "levels.json").write_text(json.dumps(rows, indent=1))
        (a.out / "levels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
