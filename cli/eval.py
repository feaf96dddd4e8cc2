"""pop-eval: fidelity of POP and its ablations against the full model on real text."""
import argparse
import json
import sys
from pathlib import Path

from pop.quality.evaluate import evaluate, markdown, write_reports
from pop.runtime.errors import PopError

from .console import progress_printer
from .options import add_fitted_heads


def parser():
    p = argparse.ArgumentParser(prog="pop-eval", description="Fidelity of POP and its ablations against the "
                                                             "full model on real text.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="as for pop-export")
    src.add_argument("--artifacts", action="append",
                     help="a pop-export folder: its graphs are evaluated through the runtime too (repeatable: "
                          "exports of one model, say in fp32, int8 and int4, side by side on the same windows)")
    p.add_argument("--data", required=True, action="append", help="a UTF-8 text file (repeatable)")
    p.add_argument("--prefill-layers", type=int, nargs="+", metavar="K",
                   help="POP variants to compare (default: pruning 20, 25, 33, 40 and 50%% of the layers)")
    p.add_argument("--samples", type=int, default=24, help="windows per data file")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens after each prompt")
    p.add_argument("--greedy-tokens", type=int, default=16)
    p.add_argument("--out", help="folder for report.json, report.md, tradeoff.png (default: artifacts/eval-<model>)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    add_fitted_heads(p, several=True)
    p.add_argument("--max-kl", type=float, metavar="X",
                   help="recommend, per kind of KV head, the deepest pruning whose first-token KL stays <= X")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.samples < 1 or args.prompt_len < 2 or args.continuation < 1 or args.greedy_tokens < 1:
        raise PopError("need --samples >= 1, --prompt-len >= 2, --continuation >= 1 and --greedy-tokens >= 1")
    report = evaluate(args.model, args.artifacts, args.data, args.prefill_layers, args.samples, args.prompt_len,
                      args.continuation, args.greedy_tokens, progress=progress_printer("pop-eval"),
                      kv_heads=args.kv_heads, calib=args.calib, calib_tokens=args.calib_tokens, ridge=args.ridge,
                      max_kl=args.max_kl, guard=args.guard)
    out = Path(args.out) if args.out else Path("artifacts") / f"eval-{report['model']['name']}"
    write_reports(report, out)
    print(json.dumps(report) if args.json else markdown(report))
    print(f"pop-eval: wrote {out}/report.json, report.md and tradeoff.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from .console import run_command
    sys.exit(run_command("pop-eval", main))
