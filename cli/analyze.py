"""pop-analyze: per-layer stage importance, and a recommended number of kept prefill layers."""
import argparse
import sys

from pop.quality.analyze import analyze
from pop.runtime.errors import PopError

from .console import progress_printer
from .options import add_fitted_heads


def parser():
    p = argparse.ArgumentParser(prog="pop-analyze", description="Per-layer prefill and decode importance "
                                "(virtual gates), and a recommended number of kept prefill layers.")
    p.add_argument("--model", required=True, help="as for pop-export")
    p.add_argument("--data", required=True, help="a UTF-8 text file for calibration")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (the paper used 200)")
    p.add_argument("--out", help="output folder (default: artifacts/analyze-<model>)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32, help="sampled continuation: the decode positions")
    p.add_argument("--budget", type=float, default=0.05, help="share of prefill importance pruning may drop")
    p.add_argument("--seed", type=int, default=0)
    # fitted: also fit KV heads on --data at the recommended and default K, and report each pruned
    # layer's held-out K/V error with the original and the fitted heads
    add_fitted_heads(p, calib_flag=False)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.samples < 1 or args.prompt_len < 2 or args.new_tokens < 1 or not 0 <= args.budget < 1:
        raise PopError("need --samples >= 1, --prompt-len >= 2, --new-tokens >= 1 and 0 <= --budget < 1")
    analyze(args.model, args.data, args.samples, args.out, args.prompt_len, args.new_tokens, args.seed, args.budget,
            progress=progress_printer("pop-analyze"), kv_heads=args.kv_heads, calib_tokens=args.calib_tokens,
            ridge=args.ridge, guard=args.guard)
    return 0


if __name__ == "__main__":
    from .console import run_command
    sys.exit(run_command("pop-analyze", main))
