"""Quality against measured speed for the exports of one model: each export's error, as pop-eval measured
it through the runtime against the fp32 full model (report.json of `pop-eval --artifacts A --artifacts B
...`), beside the time to first token and the decode step that export takes on this machine, measured
for all of them in one rotation.  POP's error and quantization's error land on one plot.

    .venv/bin/python benchmarks/quantized/tradeoff.py --time artifacts/smollm2-135m-onnx-pop \
        artifacts/smollm2-135m-onnx-pop-int4-mixed ... --prompt-len 1024 --runs 3 --threads 2 \
        --out benchmarks/quantized/speed-smollm2-135m.json
    .venv/bin/python benchmarks/quantized/tradeoff.py --eval benchmarks/quantized/eval-smollm2-135m/report.json \
        --speeds benchmarks/quantized/speed-smollm2-135m.json --out benchmarks/quantized/tradeoff-smollm2-135m

The first times the exports, the second joins the times with pop-eval's errors into OUT.json, OUT.md and
OUT.png (exports timed but not evaluated appear with speed only); --replot OUT.json redraws them.
Speeds are medians over --runs rounds after a warm-up round; in each round every export runs POP and
full mode back to back (bench/measure.py) before the next export's turn.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pop.bench.measure import measure_runtime, prompt_ids
from pop.runtime.manifest import Manifest
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


def rows(report, speed_report):
    """One row per export and mode: its speed and, per data file, its error against the fp32 full model.
    Exports timed but not evaluated get speed only."""
    timed = {Path(t["path"]).resolve(): t for t in speed_report["exports"]}
    out = []
    for art in report["artifacts"]:
        speed = timed.pop(Path(art["path"]).resolve(), None)
        if speed is None:
            continue
        for mode, tag in (("full", art["tags"][0]), ("pop", art["tags"][1])):
            method = (f"exported graphs, pop runtime, full mode{tag}" if mode == "full" else
                      f"exported graphs, pop runtime, POP K={art['prefill_layers']}{tag}")
            quality = {}
            for d in report["data"]:
                r = next(r for r in d["results"] if r["method"] == method)
                quality[Path(d["path"]).name] = {k: r[k] for k in ("top1_agreement", "kl_full_to_method",
                                                                   "perplexity", "greedy_common_prefix")}
            # the export column names the folder; a "[folder]" that pop-eval added to tell exports apart goes
            out.append(_row(speed, mode, tag.removesuffix(f" [{Path(art['path']).name}]").strip(", ") or "fp32",
                            quality))
    for speed in timed.values():
        # an fp32 export without fitted heads verifies equal to the PyTorch reference (1e-4 x scale): the
        # report's own full and POP rows are its quality
        manifest = Manifest.load(speed["path"])
        fp32 = manifest.dtype == "float32" and not (manifest.kv_heads and manifest.kv_heads.kind == "fitted") \
            and not _integer_products(Path(speed["path"]) / manifest.graphs["decode"].file)
        k = manifest.pop.prefill_layers
        for mode, method in (("full", "full"), ("pop", f"POP K={k}")):
            quality = None
            if fp32:
                quality = {Path(d["path"]).name: {key: r[key] for key in ("top1_agreement", "kl_full_to_method",
                                                                          "perplexity", "greedy_common_prefix")}
                           for d in report["data"] for r in d["results"] if r["method"] == method}
            out.append(_row(speed, mode, "fp32" if fp32 else Path(speed["path"]).name, quality or None))
    return out


def _integer_products(path):
    """Whether a graph multiplies by integer weights (ours, or dynamic_int8.py's), its weights unread."""
    import onnx
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return bool(ops & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"})


def _row(speed, mode, label, quality):
    return {"export": Path(speed["path"]).name, "mode": mode, "label": label,
            "ttft_ms": speed[f"{mode}_ttft"], "decode_ms": speed["decode"], "folder_bytes": speed["folder_bytes"],
            "quality": quality}


def _baseline(table):
    """fp32 full mode: the export with no quantization and no fitted heads. Where pop-eval had to tell
    exports apart by folder (its labels then end in "[folder]"), the first export, fp32 by --time's contract."""
    full = [r for r in table if r["mode"] == "full"]
    return next((r for r in full if r["label"] == "fp32"), full[0])


def markdown(result):
    table, base = result["rows"], _baseline(result["rows"])
    texts = list(next(r["quality"] for r in table if r["quality"]))
    head = ("| export | mode | TTFT ms | TTFT speedup | decode ms/tok | folder MB | "
            + " | ".join(f"{t}: top-1 / KL / PPL" for t in texts) + " |")
    lines = [f"## {result['model']}: quality against speed\n",
             f"Speed: {result['prompt_len']}-token prompt, batch 1, {result['threads']} threads, median of "
             f"{result['runs']} rounds ({result['speeds']}); speedup against fp32 full mode. Quality: pop-eval "
             f"against the fp32 full model ({result['eval']}).\n", head, "|" + "---|" * (6 + len(texts))]
    for r in table:
        q = " | ".join("not evaluated" if not r["quality"] else
                       f"{r['quality'][t]['top1_agreement']:.3f} / {r['quality'][t]['kl_full_to_method']:.3f} / "
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
    texts = list(next(r["quality"] for r in table if r["quality"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), layout="constrained")
    exports = list(dict.fromkeys(r["export"] for r in table))  # one colour per export: labels can repeat
    colors = dict(zip(exports, plt.cm.tab20.colors))
    for r in (r for r in table if r["quality"]):
        kl = np.mean([r["quality"][t]["kl_full_to_method"] for t in texts])
        ppl = np.mean([r["quality"][t]["perplexity"] / _ref_ppl(result, t) for t in texts])
        marker = "o" if r["mode"] == "pop" else "s"
        for ax, x, y in ((axes[0], base["ttft_ms"] / r["ttft_ms"], kl),
                         (axes[1], base["decode_ms"] / r["decode_ms"], ppl)):
            ax.scatter(x, y, marker=marker, color=colors[r["export"]], s=50,
                       label=f"{r['export']}, {'POP' if r['mode'] == 'pop' else 'full'}")
    axes[0].set_xlabel(f"time-to-first-token speedup over fp32 full mode ({result['prompt_len']}-token prompt)")
    axes[0].set_ylabel("first-token KL(fp32 full || export), mean over texts")
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_xlabel("decode speedup over fp32 (ms/token)")
    axes[1].set_ylabel("continuation perplexity / fp32 full's, mean over texts")
    # below the plots, where it hides no point
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']}: POP's error and quantization's error against measured speed "
                 f"(squares: full mode, circles: POP)")
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
    p.add_argument("--time", nargs="+", type=Path, metavar="DIR", help="exports of one model to time (first: fp32)")
    p.add_argument("--speeds", type=Path, help="the JSON --time wrote (with --eval: join them)")
    p.add_argument("--eval", type=Path, help="report.json of pop-eval with several --artifacts")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="OUT.json/.md/.png (joined), or the speeds JSON (--time)")
    p.add_argument("--replot", type=Path, help="a joined JSON this script wrote: redraw its md and png")
    a = p.parse_args(argv)
    if a.replot:
        return write(json.loads(a.replot.read_text()), a.replot.with_suffix(""))
    if a.time:
        if not a.out:
            p.error("--time needs --out")
        measured = speeds(a.time, a.prompt_len, a.new_tokens, a.runs, a.threads)
        exports = [{"path": str(f), "folder_bytes": sum(x.stat().st_size for x in f.rglob("*") if x.is_file()),
                    **m} for f, m in zip(a.time, measured)]
        a.out.write_text(json.dumps({"prompt_len": a.prompt_len, "runs": a.runs, "threads": a.threads,
                                     "new_tokens": a.new_tokens, "exports": exports}, indent=1) + "\n")
        for e in exports:
            print(f"{Path(e['path']).name}: POP {e['pop_ttft']:.0f} ms, full {e['full_ttft']:.0f} ms, decode "
                  f"{e['decode']:.2f} ms/token, {e['folder_bytes'] / 1e6:.0f} MB")
        return
    if not (a.eval and a.speeds and a.out):
        p.error("give --time DIR... --out SPEEDS.json, or --eval REPORT --speeds SPEEDS.json --out OUT, or --replot")
    report, timed = json.loads(a.eval.read_text()), json.loads(a.speeds.read_text())
    reference = {Path(d["path"]).name: next(r["perplexity"] for r in d["results"] if r["method"] == "full")
                 for d in report["data"]}
    result = {"model": report["model"]["name"], "eval": str(a.eval), "speeds": str(a.speeds),
              "prompt_len": timed["prompt_len"], "runs": timed["runs"], "threads": timed["threads"],
              "reference_perplexity": reference, "rows": rows(report, timed)}
    write(result, a.out)


if __name__ == "__main__":
    main()
