"""Quality against measured speed for the exports of one model: each export's error, as pop-eval measured
it through the runtime against the fp32 full model (report.json of `pop-eval --artifacts A --artifacts B
...`), beside the time to first token and the decode step that export takes on this machine, measured
for all of them in one rotation.  POP's error and quantization's error land on one plot.

    .venv/bin/python benchmarks/quantized/tradeoff.py benchmarks/quantized/eval-smollm2-135m/report.json \
        --prompt-len 1024 --runs 3 --threads 2 --out benchmarks/quantized/tradeoff-smollm2-135m

Writes OUT.json, OUT.md and OUT.png; --replot OUT.json redraws the table and plot without timing.
Speeds are medians over --runs rounds after a warm-up round; in each round every export runs POP and
full mode back to back (bench/measure.py) before the next export's turn.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pop.bench.measure import measure_runtime, prompt_ids
from pop.runtime.session import PopSession


def speeds(folders, prompt_len, new_tokens, runs, threads):
    sessions = [PopSession.load(f, threads=threads) for f in folders]
    ids = prompt_ids(sessions[0].manifest.model.vocab_size, sessions[0].eos_ids, 1, prompt_len,
                     sessions[0].manifest.tokenizer.bos_id)
    got = [{"pop_ttft": [], "full_ttft": [], "decode": []} for _ in sessions]
    for r in range(runs + 1):
        for i, (s, g) in enumerate(zip(sessions, got)):
            m = measure_runtime(s, ids, new_tokens, runs=1, warmup=0)
            print(f"round {r}{' (warm-up)' if r == 0 else ''}, {Path(folders[i]).name}: POP "
                  f"{m['pop_ttft']['median']:.0f} ms, full {m['full_ttft']['median']:.0f} ms, decode "
                  f"{m['decode_per_token']['median']:.2f} ms/token", file=sys.stderr)
            if r:
                g["pop_ttft"].append(m["pop_ttft"]["median"])
                g["full_ttft"].append(m["full_ttft"]["median"])
                g["decode"].append(m["decode_per_token"]["median"])
    return [{k: float(np.median(v)) for k, v in g.items()} for g in got]


def rows(report, measured):
    """One row per export and mode: its speed and, per data file, its error against the fp32 full model."""
    out = []
    for art, speed in zip(report["artifacts"], measured):
        size = sum(f.stat().st_size for f in Path(art["path"]).rglob("*") if f.is_file())
        for mode, tag, ttft in (("full", art["tags"][0], "full_ttft"), ("pop", art["tags"][1], "pop_ttft")):
            method = (f"exported graphs, pop runtime, full mode{tag}" if mode == "full" else
                      f"exported graphs, pop runtime, POP K={art['prefill_layers']}{tag}")
            quality = {}
            for d in report["data"]:
                r = next(r for r in d["results"] if r["method"] == method)
                quality[Path(d["path"]).name] = {k: r[k] for k in ("top1_agreement", "kl_full_to_method",
                                                                   "perplexity", "greedy_common_prefix")}
            out.append({"export": Path(art["path"]).name, "mode": mode, "label": (tag.strip(", ") or "fp32"),
                        "ttft_ms": speed[ttft], "decode_ms": speed["decode"], "folder_bytes": size,
                        "quality": quality})
    return out


def _baseline(table):
    """fp32 full mode: the export with no quantization and no fitted heads."""
    return next(r for r in table if r["mode"] == "full" and r["label"] == "fp32")


def markdown(result):
    table, base = result["rows"], _baseline(result["rows"])
    texts = list(table[0]["quality"])
    head = ("| export | mode | TTFT ms | TTFT speedup | decode ms/tok | folder MB | "
            + " | ".join(f"{t}: top-1 / KL / PPL" for t in texts) + " |")
    lines = [f"## {result['model']}: quality against speed\n",
             f"Speed: {result['prompt_len']}-token prompt, batch 1, {result['threads']} threads, median of "
             f"{result['runs']} rounds; speedup against fp32 full mode. Quality: pop-eval against the fp32 full "
             f"model ({result['eval']}).\n", head, "|" + "---|" * (6 + len(texts))]
    for r in table:
        q = " | ".join(f"{r['quality'][t]['top1_agreement']:.3f} / {r['quality'][t]['kl_full_to_method']:.3f} / "
                       f"{r['quality'][t]['perplexity']:.2f}" for t in texts)
        lines.append(f"| {r['label']} ({r['export']}) | {r['mode']} | {r['ttft_ms']:.0f} | "
                     f"{base['ttft_ms'] / r['ttft_ms']:.2f}x | {r['decode_ms']:.2f} | {r['folder_bytes'] / 1e6:.0f} | "
                     f"{q} |")
    return "\n".join(lines) + "\n"


def plot(path, result):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table, base = result["rows"], _baseline(result["rows"])
    texts = list(table[0]["quality"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = sorted({r["label"] for r in table}, key=lambda x: [r["label"] for r in table].index(x))
    colors = dict(zip(labels, plt.cm.tab10.colors))
    for r in table:
        kl = np.mean([r["quality"][t]["kl_full_to_method"] for t in texts])
        ppl = np.mean([r["quality"][t]["perplexity"] / _ref_ppl(result, t) for t in texts])
        marker = "o" if r["mode"] == "pop" else "s"
        for ax, x, y in ((axes[0], base["ttft_ms"] / r["ttft_ms"], kl),
                         (axes[1], base["decode_ms"] / r["decode_ms"], ppl)):
            ax.scatter(x, y, marker=marker, color=colors[r["label"]], s=50,
                       label=f"{r['label']}, {'POP' if r['mode'] == 'pop' else 'full'}")
    axes[0].set_xlabel(f"time-to-first-token speedup over fp32 full mode ({result['prompt_len']}-token prompt)")
    axes[0].set_ylabel("first-token KL(fp32 full || export), mean over texts")
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_xlabel("decode speedup over fp32 (ms/token)")
    axes[1].set_ylabel("continuation perplexity / fp32 full's, mean over texts")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']}: POP's error and quantization's error against measured speed "
                 f"(squares: full mode, circles: POP)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ref_ppl(result, text):
    return result["reference_perplexity"][text]


def write(result, out: Path):
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(out.with_suffix(".png"), result)
    print(markdown(result))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval", nargs="?", type=Path, help="report.json of pop-eval with several --artifacts")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--replot", type=Path, help="a JSON this script wrote: redraw its md and png")
    a = p.parse_args(argv)
    if a.replot:
        result = json.loads(a.replot.read_text())
        return write(result, a.replot.with_suffix(""))
    if not a.eval or not a.out:
        p.error("give an eval report.json and --out, or --replot")
    report = json.loads(a.eval.read_text())
    if not report.get("artifacts"):
        p.error(f"{a.eval} evaluated no exports: run pop-eval with --artifacts")
    measured = speeds([x["path"] for x in report["artifacts"]], a.prompt_len, a.new_tokens, a.runs, a.threads)
    reference = {Path(d["path"]).name: next(r["perplexity"] for r in d["results"] if r["method"] == "full")
                 for d in report["data"]}
    result = {"model": report["model"]["name"], "eval": str(a.eval), "prompt_len": a.prompt_len, "runs": a.runs,
              "threads": a.threads, "reference_perplexity": reference, "rows": rows(report, measured)}
    write(result, a.out)


if __name__ == "__main__":
    main()
