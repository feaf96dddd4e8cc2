"""pop-export: export a model as POP graphs plus a manifest."""
import argparse
import os
import shlex
import sys

from pop.runtime.errors import run_command

from .export import BACKENDS, DTYPES, export
from .sources import preset_names


def parser():
    p = argparse.ArgumentParser(
        prog="pop-export", description="Export a model as a shallow POP prefill graph, a full decode graph, "
                                       "one shared weights file, its tokenizer and pop_manifest.json.")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(preset_names())}), a local HF folder, a .gguf file, "
                        "or a hub id already in the local HF cache")
    p.add_argument("--out", help="output folder (default: artifacts/<model>-<backend>-pop)")
    p.add_argument("--backend", default="onnx", choices=BACKENDS)
    k = p.add_mutually_exclusive_group()
    k.add_argument("--prefill-layers", type=int, metavar="K", help="layers prefill runs (L = no pruning)")
    k.add_argument("--prune-ratio", type=float, metavar="R",
                   help="fraction of layers, from the top, that prefill skips (default 1/3, rounded down)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--max-seq-len", type=int, metavar="N", help="prompt + generated tokens the KV buffer holds "
                                                                "(default min(4096, the model's limit))")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of TensorRT profiles (default 8)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for verification")
    p.add_argument("--skip-verify", action="store_true", help="do not compare the graphs with PyTorch")
    p.add_argument("--kv-heads", default="original", choices=("original", "fitted"),
                   help="the pruned layers' KV projections: their own matrices (the paper, default) or matrices "
                        "refitted by ridge regression on --calib text, used by the prefill graph only")
    p.add_argument("--calib", metavar="FILE", help="UTF-8 calibration text for --kv-heads fitted")
    p.add_argument("--calib-tokens", type=int, metavar="N",
                   help="calibration tokens for --kv-heads fitted (default 65536, or all the text has)")
    p.add_argument("--ridge", default="auto", metavar="auto|VALUE",
                   help="ridge strength relative to the mean eigenvalue of the inputs' Gram matrix; auto "
                        "(default) chooses per layer on held-out calibration tokens; inf = the original heads")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return run_command("pop-export", lambda: export(
        args.model, args.out, args.backend, args.prefill_layers, args.prune_ratio, args.dtype, args.max_seq_len,
        args.skip_verify, args.max_batch, args.threads,
        progress=lambda msg: print(f"pop-export: {msg}", file=sys.stderr, flush=True),
        command=shlex.join(["pop-export", *(sys.argv[1:] if argv is None else argv)]),
        kv_heads=args.kv_heads, calib=args.calib, calib_tokens=args.calib_tokens, ridge=args.ridge) and 0)


if __name__ == "__main__":
    sys.exit(main())
