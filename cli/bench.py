"""pop-bench: time to first token of POP against the full model, decode speed,
and the same figures for peers, in one run.

    pop-bench artifacts/gemma3-270m-onnx-pop --prompt-lens 128,1024 --batch 1 --json out.json --plot out.png
"""
import argparse
import sys

from pop.bench.run import bench
from pop.runtime.backends import BACKENDS

from .options import add_runtime


def _ints(name):
    def parse(text):
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes comma-separated integers, e.g. 128,512") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} is empty")
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {min(values)}")
        return values
    return parse


def _sizes(text):
    try:
        sizes = [tuple(int(v) for v in t.lower().split("x")) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = [()]
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError("--image-sizes takes WIDTHxHEIGHT pairs, e.g. 640x480,1280x720")
    return sizes


def parser():
    p = argparse.ArgumentParser(prog="pop-bench", description="Latency of POP against the full model and peers.")
    p.add_argument("artifacts", help="a folder written by pop-export")
    p.add_argument("--prompt-lens", type=_ints("--prompt-lens"), default=[128, 512, 1024, 2048])
    p.add_argument("--prompt-file", metavar="FILE", default=None,
                   help="time this prompt (UTF-8 text, tokenized as pop-generate does) instead of seeded ids of "
                        "--prompt-lens")
    p.add_argument("--batch", type=_ints("--batch"), default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (decode is timed over them)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per configuration (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--peers", default="hf,optimum",
                   help="comma-separated peers to run beside ours: hf, optimum, genai and genai-int4 "
                        "(onnxruntime-genai's own export of the same weights, fp32 or int4), cpp (the C++ runtime "
                        "on the same AOTI artifacts, with its per-step overhead against Python's), other "
                        "(--other-artifacts), or none")
    p.add_argument("--other-artifacts", default=None,
                   help="the same model exported for the other backend, for --peers other (ORT against AOTI)")
    p.add_argument("--optimum-python", default=None,
                   help="python of the Optimum virtualenv (default: $POP_OPTIMUM_PYTHON or .venv-optimum)")
    p.add_argument("--optimum-dir", default=None,
                   help="where the Optimum export is cached (default: artifacts/optimum/MODEL)")
    p.add_argument("--genai-python", default=None,
                   help="python of the onnxruntime-genai virtualenv (default: $POP_GENAI_PYTHON or .venv-genai; "
                        "bash scripts/genai_venv.sh makes it)")
    p.add_argument("--genai-dir", default=None,
                   help="where onnxruntime-genai's builds are cached (default: artifacts/genai/MODEL-PRECISION)")
    p.add_argument("--image-sizes", type=_sizes, default=None,
                   help="VLM artifacts: time a chat prompt with one image of each size (WxH,...) instead of "
                        "--prompt-lens, with the vision encoder's time shown apart")
    add_runtime(p, BACKENDS)
    p.add_argument("--json", dest="json_out", default=None, help="write the full report here")
    p.add_argument("--plot", default=None, help="write the speedup plot here (PNG)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.command = " ".join(["pop-bench", *argv])
    return bench(args)


if __name__ == "__main__":
    from .console import run_command
    sys.exit(run_command("pop-bench", main))
