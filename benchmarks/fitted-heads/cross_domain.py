"""Fitted KV heads calibrated on one domain and evaluated on every domain: the original heads, the fit chosen
on the calibration text alone (guard off, the previous method) and the guarded fit (the default, guarded by
the model's own samples), at K = default and half.

    python benchmarks/fitted-heads/cross_domain.py --model smollm2-135m --out benchmarks/fitted-heads/cross-domain

Domains are the texts in ../shared/data/text: Austen calibrates on Pride and Prejudice and is evaluated on
Persuasion; the others calibrate on the first 70% of their file and are evaluated on the rest, so no
evaluation window was seen by a fit.  Every method runs on the same windows; noise is measured by
resampling the windows (paired bootstrap of the difference against the original heads).
Writes <out>/<model>.json, <model>.md and <model>.png.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pop.exporter import fitted_heads as fh
from pop.exporter import sources
from pop.exporter.families import adapter_for
from pop.exporter.options import prefill_layers_for
from pop.quality import data, fidelity
from pop.quality.methods import Method, Runner

TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "text"
DOMAINS = {"austen": ("prideprejudice.txt", "persuasion.txt"), "sotu": "sotu_1993_2000.txt",
           "code": "code_python.txt", "legal": "licenses.txt"}
CALIB_SHARE = 0.7
HEADS = ("original", "fitted, guard off", "fitted, guarded")


def texts(domain):
    """(calibration text, evaluation text) of a domain."""
    spec = DOMAINS[domain]
    if isinstance(spec, tuple):
        return tuple((TEXT / f).read_text() for f in spec)
    text = (TEXT / spec).read_text()
    cut = text.index("\n", int(CALIB_SHARE * len(text)))  # at a line end
    return text[:cut], text[cut:]


def bootstrap(a, b, stat, resamples, seed=0):
    """95% interval of stat(b) - stat(a) over windows resampled together (paired)."""
    rng = np.random.default_rng(seed)
    n = len(a)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        diffs.append(stat([b[i] for i in idx]) - stat([a[i] for i in idx]))
    return [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]


def kl(rows):
    return fidelity.summarize(rows)["kl_full_to_method"]


def ppl(rows):
    return fidelity.summarize(rows)["perplexity"]


def run(model, out, samples, calib_tokens, resamples, domains):
    started = time.perf_counter()
    loaded = sources.load(model, progress=lambda m: print(m, file=sys.stderr))
    adapter = adapter_for(loaded.model)
    runner = Runner(loaded.model)
    bos = sources.bos_for(loaded.tokenizer)
    n_layers = adapter.num_layers
    default_k = prefill_layers_for(n_layers)
    ks = [default_k, prefill_layers_for(n_layers, prune_ratio=0.5)]
    split = {d: texts(d) for d in domains}
    windows = {d: data.windows(split[d][1], loaded.tokenizer, 128, 32, samples, bos, d) for d in domains}
    rows = {}  # (method name, eval domain) -> per-window comparison rows

    def evaluate(methods, desc):
        bar = tqdm(total=sum(map(len, windows.values())) * len(methods), desc=desc, file=sys.stderr)
        for d in domains:
            for i, (prompt, cont) in enumerate(windows[d]):
                full = fulls[d][i]
                for m in methods:
                    rows.setdefault((m.name, d), []).append(
                        fidelity.compare(full, runner.run(m, prompt, cont, greedy_tokens=8)))
                    bar.update(1)
        bar.close()

    fulls = {d: [] for d in domains}
    for d in domains:
        for prompt, cont in tqdm(windows[d], desc=f"full model, {d}", file=sys.stderr):
            fulls[d].append(runner.run(Method("full"), prompt, cont, greedy_tokens=8))
    evaluate([Method(f"original K={k}", tuple(range(k, n_layers))) for k in ks], "original heads")

    guard, guard_record = fh.guard_chunks(adapter, loaded.tokenizer, "samples", bos,
                                          progress=lambda m: print(m, file=sys.stderr))
    tools = {}
    for c in domains:
        chunks = fh.calibration_chunks(split[c][0], loaded.tokenizer, calib_tokens, bos, c)
        stats = fh.collect(adapter, chunks, ks, True, guard)
        methods = []
        for k in ks:
            for name, guarded in (("fitted, guard off", False), ("fitted, guarded", True)):
                heads = fh.fit(adapter, stats, k, guarded=guarded)
                gain = fh.gains(heads.layers)
                tools[f"{name} K={k} calib={c}"] = {
                    "gain": gain, "warning": fh.warning(gain, "model samples"),
                    "kept_original": sum(row[kind]["ridge"] == "inf" for row in heads.layers for kind in fh.KINDS),
                    "matrices": 2 * len(heads.layers), "calibration_tokens": sum(map(len, chunks))}
                methods.append(Method(f"{name} K={k} calib={c}", tuple(range(k, n_layers)), heads=heads))
        evaluate(methods, f"fitted on {c}")

    cells = []
    for k in ks:
        for c in domains:
            for e in domains:
                base = rows[f"original K={k}", e]
                cell = {"K": k, "calib": c, "eval": e, "original": {"kl": kl(base), "ppl": ppl(base)},
                        "full_ppl": ppl([fidelity.compare(f, f) for f in fulls[e]])}
                for name in HEADS[1:]:
                    got = rows[f"{name} K={k} calib={c}", e]
                    cell[name] = {"kl": kl(got), "ppl": ppl(got),
                                  "kl_diff_ci95": bootstrap(base, got, kl, resamples),
                                  "ppl_diff_ci95": bootstrap(base, got, ppl, resamples),
                                  "tool": tools[f"{name} K={k} calib={c}"]}
                cells.append(cell)
    report = {"model": loaded.name, "num_layers": n_layers, "ks": ks, "domains": domains,
              "settings": {"samples": samples, "prompt_len": 128, "continuation": 32, "greedy_tokens": 8,
                           "calib_tokens": calib_tokens, "calib_share": CALIB_SHARE, "resamples": resamples,
                           "guard": guard_record},
              "windows": {d: len(w) for d, w in windows.items()}, "cells": cells,
              "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{loaded.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{loaded.name}.md").write_text(markdown(report))
    plot(out / f"{loaded.name}.png", report)
    print(markdown(report))


def verdict(cell, name, key):
    """Whether a fitted method is at or below the original heads, or within the resampling noise of it."""
    return cell[name][key] <= cell["original"][key] or cell[name][f"{key}_diff_ci95"][0] <= 0


def markdown(report):
    lines = [f"## {report['model']}: fitted heads across domains\n",
             f"{report['settings']['samples']} windows per evaluation text (128 prompt tokens, 32 continuation "
             f"tokens); KL(full‖POP) of the first token and continuation perplexity. Each cell: original heads / "
             f"fitted with the guard off (the previous method) / guarded fit (the default). A fitted value in bold "
             f"is above the original heads' beyond the 95% resampling interval (off the target). Diagonal: "
             f"calibration and evaluation from the same domain, disjoint text.\n"]
    for k in report["ks"]:
        for key, label, fmt in (("kl", "KL", "{:.3f}"), ("ppl", "perplexity", "{:.1f}")):
            lines += [f"### K={k} of {report['num_layers']}, {label}\n",
                      "| calibrated on \\ evaluated on | " + " | ".join(report["domains"]) + " |",
                      "|---|" + "---|" * len(report["domains"])]
            for c in report["domains"]:
                cells = []
                for e in report["domains"]:
                    cell = next(x for x in report["cells"] if x["K"] == k and x["calib"] == c and x["eval"] == e)
                    parts = [fmt.format(cell["original"][key])]
                    for name in HEADS[1:]:
                        text = fmt.format(cell[name][key])
                        parts.append(text if verdict(cell, name, key) else f"**{text}**")
                    cells.append(" / ".join(parts))
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["### What the tool reports (pop-export / pop-eval), from the calibration text and the model's "
              "samples\n", "| K | calibrated on | heads | in-domain gain | out-of-domain gain | warns | "
              "matrices kept original |", "|---|---|---|---|---|---|---|"]
    for k in report["ks"]:
        for c in report["domains"]:
            cell = next(x for x in report["cells"] if x["K"] == k and x["calib"] == c)
            for name in HEADS[1:]:
                t = cell[name]["tool"]
                lines.append(f"| {k} | {c} | {name} | {t['gain']['in_domain']:+.0%} | "
                             f"{t['gain']['out_of_domain']:+.0%} | {'yes' if t['warning'] else 'no'} | "
                             f"{t['kept_original']} of {t['matrices']} |")
    off = [(x, name, key) for x in report["cells"] if x["calib"] != x["eval"] for name in HEADS[1:]
           for key in ("kl", "ppl")]
    lines += ["", "### Off-diagonal cells above the original heads beyond the noise\n"]
    for name in HEADS[1:]:
        bad = [f"K={x['K']} {x['calib']}→{x['eval']} {key}" for x, n, key in off if n == name
               and not verdict(x, n, key)]
        lines.append(f"- {name}: {len(bad)} of {len(off) // len(HEADS[1:])}" + (f" ({', '.join(bad)})" if bad else ""))
    lines.append(f"\n{report['seconds'] / 60:.0f} min on this machine.\n")
    return "\n".join(lines)


def plot(path, report):
    """log2 of the fitted heads' KL over the original heads', per calibration (rows) and evaluation (columns)
    domain: blue is better than the original heads, red worse."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doms = report["domains"]
    fig, axes = plt.subplots(len(report["ks"]), 2, figsize=(10, 4.6 * len(report["ks"])), squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    for row, k in zip(axes, report["ks"]):
        for ax, name in zip(row, HEADS[1:]):
            m = np.array([[math.log2(next(x for x in report["cells"] if x["K"] == k and x["calib"] == c
                                          and x["eval"] == e)[name]["kl"]
                                     / next(x for x in report["cells"] if x["K"] == k and x["calib"] == c
                                            and x["eval"] == e)["original"]["kl"]) for e in doms] for c in doms])
            im = ax.imshow(m, cmap="RdBu_r", vmin=-3, vmax=3)
            for i in range(len(doms)):
                for j in range(len(doms)):
                    ax.text(j, i, f"{2 ** m[i, j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(doms)), doms)
            ax.set_yticks(range(len(doms)), doms)
            ax.set_xlabel("evaluated on")
            if ax is row[0]:
                ax.set_ylabel("calibrated on")
            ax.set_title(f"K={k}: {name}\nKL / original heads' KL", fontsize=9)
        fig.colorbar(im, ax=row.tolist(), label="log2 KL ratio")
    fig.suptitle(f"{report['model']}: fitted heads across domains")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="benchmarks/fitted-heads/cross-domain")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--calib-tokens", type=int, default=fh.DEFAULT_TOKENS)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    p.add_argument("--replot", metavar="JSON", help="only redraw the .md and .png of an earlier run's JSON")
    a = p.parse_args()
    if a.replot:
        report = json.loads(Path(a.replot).read_text())
        Path(a.replot).with_suffix(".md").write_text(markdown(report))
        plot(Path(a.replot).with_suffix(".png"), report)
        return
    torch.set_grad_enabled(False)
    run(a.model, Path(a.out), a.samples, a.calib_tokens, a.resamples, a.domains)


if __name__ == "__main__":
    main()
