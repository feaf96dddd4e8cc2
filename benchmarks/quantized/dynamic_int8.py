"""The other int8: ONNX Runtime's dynamic quantization (onnxruntime.quantization.quantize_dynamic: int8
weights per output channel, activations quantized per tensor at run time, MatMulInteger fused by ONNX
Runtime into DynamicQuantizeMatMul) applied to a finished fp32 export, for comparison with
pop-export --weights int8 (MatMulNBits, 8 bits in blocks of 32).

    .venv/bin/python benchmarks/quantized/dynamic_int8.py artifacts/smollm2-135m-onnx-pop \
        artifacts/smollm2-135m-onnx-pop-dyn8

The new folder runs in pop's runtime like any export (same graph IO, one shared weights.bin), so pop-eval
and pop-bench take it.  The tied embedding's gather keeps its float32 table (quantize_dynamic rewrites
products only), so the folder stores that matrix twice; the comparison is of speed and error, not size.
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnxruntime.quantization import QuantType, quantize_dynamic

from pop.exporter.formats.onnx import WEIGHTS, save_shared
from pop.runtime.manifest import Manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fp32", type=Path, help="an fp32 pop-export folder")
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    manifest = Manifest.load(a.fp32)
    if manifest.weights.quantization is not None or manifest.dtype != "float32":
        sys.exit(f"dynamic_int8: {a.fp32} is not an fp32 export")
    if a.out.exists():
        sys.exit(f"dynamic_int8: {a.out} exists")
    graphs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("prefill", "decode"):
            model = onnx.load(str(a.fp32 / manifest.graphs[name].file))  # with its weights
            out = Path(tmp) / f"{name}.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
            graphs[name] = ir.load(out)
            ops = [n.op_type for n in graphs[name].graph]
            print(f"{name}: {ops.count('MatMulInteger')} MatMulInteger, {ops.count('MatMul')} MatMul, "
                  f"{ops.count('Gemm')} Gemm left", file=sys.stderr)
        partial = a.out.with_name(a.out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for graph in graphs.values():  # weights.bin paths are re-written by save_shared
            for value in graph.graph.initializers.values():
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
        stored = save_shared(graphs, partial)
    shutil.copytree(a.fp32 / Path(manifest.tokenizer.file).parent, partial / Path(manifest.tokenizer.file).parent,
                    dirs_exist_ok=True)
    record = json.loads((a.fp32 / "pop_manifest.json").read_text())
    record["weights"].update(bytes=(partial / WEIGHTS).stat().st_size, unique_tensors=stored["unique_tensors"],
                             stored_bytes=stored["stored_bytes"], referenced_bytes=stored["referenced_bytes"])
    (partial / "pop_manifest.json").write_text(json.dumps(record, indent=1) + "\n")
    Manifest.load(partial)  # still a valid manifest
    partial.rename(a.out)
    print(f"dynamic_int8: wrote {a.out} ({sum(f.stat().st_size for f in a.out.rglob('*') if f.is_file()) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
