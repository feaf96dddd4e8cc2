"""pop-export: export a model as POP graphs plus a manifest."""
import argparse
import os
import shlex
import sys

from pop.exporter.export import export
from pop.exporter.formats import FORMATS
from pop.exporter.options import DTYPES, ExportOptions
from pop.exporter.quantize import COMPUTE, WEIGHTS
from pop.exporter.sources import preset_names

from .console import progress_printer
from .options import add_fitted_heads


def parser():
    p = argparse.ArgumentParser(
        prog="pop-export", description="Export a model as a shallow POP prefill graph, a full decode graph, "
                                       "one shared weights file, its tokenizer and pop_manifest.json.")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(preset_names())}), a local HF folder, a .gguf file, "
                        "or a hub id already in the local HF cache")
    p.add_argument("--out", help="output folder (default: artifacts/<model>-<format>-pop)")
    p.add_argument("--format", default=None, choices=list(FORMATS),
                   help="artifact format: onnx (ONNX Runtime, default), trt (ONNX plus TensorRT engines) or "
                        "aoti (AOTInductor packages)")
    p.add_argument("--graph-form", choices=("fused", "plain"), default=None,
                   help="ONNX only: fused (ONNX Runtime's GroupQueryAttention, fused norms and rotary; the default "
                        "for --format onnx) or plain (standard operators, for runtimes without ONNX Runtime's "
                        "contrib operators; what --format trt writes)")
    # the flag's name before artifact formats and execution backends got names of their own
    p.add_argument("--backend", dest="legacy_format", choices=list(FORMATS), help=argparse.SUPPRESS)
    k = p.add_mutually_exclusive_group()
    k.add_argument("--prefill-layers", type=int, metavar="K", help="layers prefill runs (L = no pruning)")
    k.add_argument("--prune-ratio", type=float, metavar="R",
                   help="fraction of layers, from the top, that prefill skips (default 1/3, rounded down)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--weights", default="fp32", choices=WEIGHTS,
                   help="int8/int4: weight-only block quantization of the text graphs' matrices (ONNX Runtime's "
                        "MatMulNBits; a tied embedding is gathered from the same 4- or 8-bit table). Default fp32")
    p.add_argument("--weights-block", type=int, metavar="B",
                   help="values per quantization scale: 16, 32, 64, 128 or 256 (default 64 for int4, 32 for int8)")
    p.add_argument("--weights-compute", choices=COMPUTE,
                   help="quantized products in fp32 (verified exactly), or with int8 activations in both graphs "
                        "(int8) or in the decode graph only (int8-decode: POP's prefill graph keeps fp32 products): "
                        "MatMulNBits accuracy_level 4, faster decode steps; or int8-gemm: the decode graph as int8, "
                        "POP's prefill graph as integer GEMMs over int8 weights derived at load (the fastest prompts "
                        "on the CPU, ONNX Runtime's CPU provider only); the error is measured and recorded. "
                        "Default: int8-gemm for --weights int4, int8 for --weights int8 (the faster as measured, "
                        "and for int8 the closer); fp32 with --dtype fp16")
    p.add_argument("--weights-asymmetric", action=argparse.BooleanOptionalAction,
                   help="a zero point per block besides its scale: each block's range uses every code (default: "
                        "on for int4, off for int8; --no-weights-asymmetric: symmetric, no zero points)")
    p.add_argument("--keep-embedding", action="store_true",
                   help="with --weights int8/int4: keep the output matrix, and a tied embedding with it, in float32 "
                        "(a bigger folder and a slower last product, for exact logits' projection)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="prompt + generated tokens the KV buffer holds "
                                                                "(default min(4096, the model's limit))")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of TensorRT profiles (default 8)")
    p.add_argument("--tf32", action="store_true",
                   help="TensorRT engines: let fp32 layers use TF32 (faster; about 1e-3 relative error, so greedy "
                        "tokens may differ from fp32's). Default: true fp32")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for verification")
    p.add_argument("--skip-verify", action="store_true", help="do not compare the graphs with PyTorch")
    add_fitted_heads(p)
    return p


def options(argv) -> ExportOptions:
    p = parser()
    args = p.parse_args(argv)
    if args.format and args.legacy_format and args.format != args.legacy_format:
        p.error("--backend is the old name of --format: give one")
    return ExportOptions(
        model=args.model, out=args.out, format=args.format or args.legacy_format or "onnx", graph_form=args.graph_form,
        prefill_layers=args.prefill_layers, prune_ratio=args.prune_ratio, dtype=args.dtype,
        max_seq_len=args.max_seq_len, max_batch=args.max_batch, tf32=args.tf32, threads=args.threads,
        skip_verify=args.skip_verify, weights=args.weights, weights_block=args.weights_block,
        weights_compute=args.weights_compute, weights_asymmetric=args.weights_asymmetric,
        keep_embedding=args.keep_embedding,
        kv_heads=args.kv_heads, calib=args.calib, calib_tokens=args.calib_tokens, ridge=args.ridge,
        guard=args.guard, command=shlex.join(["pop-export", *argv]))


def main(argv=None):
    chosen = options(sys.argv[1:] if argv is None else list(argv))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    export(chosen, progress_printer("pop-export"))
    return 0


if __name__ == "__main__":
    from .console import run_command
    sys.exit(run_command("pop-export", main))
