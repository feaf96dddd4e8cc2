"""pop-analyze: per-layer stage importance on the user's model and text.  Flags: pop.cli.analyze."""
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pop.exporter import sources
from pop.exporter.families import adapter_for
from pop.exporter.options import prefill_layers_for
from pop.runtime.errors import PopError

from . import data, importance


def model_sha256(model):
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plot(path, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pre, dec = report["prefill_normalized"], report["decode_normalized"]
    layers = range(len(pre))
    fitted = report.get("kv_heads")
    fig, axes = plt.subplots(1, 2 if fitted else 1, figsize=(15 if fitted else 8, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(layers, pre, "o-", label="prefill", color="tab:blue")
    ax.plot(layers, dec, "s-", label="decode", color="tab:red")
    k, k_default = report["recommended_prefill_layers"], report["default_prefill_layers"]
    ax.axvspan(k - 0.5, len(pre) - 0.5, color="tab:blue", alpha=0.08, label=f"pruned at recommended K={k}")
    ax.axvline(k_default - 0.5, color="grey", ls="--", lw=1, label=f"default K={k_default} (last third)")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("importance E[(dL/dg)²], share of the stage's total")
    ax.set_title(f"Stage importance: {report['model']['name']} on {Path(report['data']['path']).name} "
                 f"({report['settings']['samples']} samples)")
    ax.legend()
    if fitted:
        kv_error_panel(axes[0, 1], fitted, len(pre))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kv_error_panel(ax, fitted, num_layers):
    """Held-out relative K/V error of each pruned layer's cache, original against fitted heads, per K."""
    for (k, rows), color in zip(sorted(fitted["layers"].items(), key=lambda kv: -int(kv[0])),
                                ("tab:blue", "tab:green", "tab:red")):
        idx = [r["index"] for r in rows]
        for kind, mark in (("key", "o"), ("value", "s")):
            ax.plot(idx, [r[kind]["original_rel_error"] for r in rows], f"{mark}-", color=color, mfc="none",
                    label=f"K={k}, {kind}, original heads")
            ax.plot(idx, [r[kind]["heldout_rel_error"] for r in rows], f"{mark}--", color=color,
                    label=f"K={k}, {kind}, fitted heads")
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_xlabel("pruned layer")
    ax.set_ylabel("held-out ||W' norm(h) - W norm(x_l)||² / ||W norm(x_l)||²")
    ax.set_yscale("log")
    ax.set_title(f"KV-head error on held-out calibration tokens ({fitted['calibration']['tokens']} tokens)")
    ax.legend(fontsize=6)


def analyze(model, data_path, samples=32, out=None, prompt_len=128, new_tokens=32, seed=0, budget=0.05,
            progress=print, kv_heads="original", calib_tokens=None, ridge="auto", guard="samples"):
    """kv_heads="fitted" also fits KV heads on the same text at the recommended and the default K
    (exporter/fitted_heads.py) and reports each pruned layer's held-out K/V error with and without them."""
    from pop.exporter import fitted_heads
    if kv_heads not in ("original", "fitted"):
        raise PopError(f"--kv-heads must be original or fitted, got {kv_heads!r}")
    if kv_heads == "fitted":
        fitted_heads.check_options("fitted", data_path, calib_tokens, ridge, guard)
    text, data_sha = sources.read_text(data_path)
    progress(f"loading {model}")
    loaded = sources.load(model, progress=progress)
    adapter = adapter_for(loaded.model)
    prompts = [p for p, _ in data.windows(text, loaded.tokenizer, prompt_len, 1, samples,
                                          sources.bos_for(loaded.tokenizer), data_path)]
    started = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="pop-analyze: forward-backward", unit="sample", file=sys.stderr)
    pre, dec = importance.stage_importance(loaded.model, adapter, prompts, new_tokens, seed,
                                           lambda i: bar.update(1))
    bar.close()
    report = {
        "model": {"name": loaded.name, "architecture": type(loaded.model).__name__, "source": loaded.source,
                  "sha256": model_sha256(loaded.model), "num_layers": adapter.num_layers},
        "data": {"path": str(data_path), "sha256": data_sha},
        "settings": {"samples": len(prompts), "prompt_len": prompt_len, "new_tokens": new_tokens, "seed": seed,
                     "budget": budget, "targets": "sampled from the model (temperature 1)",
                     "loss": "mean cross-entropy over decode positions"},
        "prefill": pre, "decode": dec,
        "prefill_normalized": [x / (sum(pre) or 1) for x in pre],
        "decode_normalized": [x / (sum(dec) or 1) for x in dec],
        "recommended_prefill_layers": importance.recommend(pre, budget),
        "rule": importance.RULE.format(budget=budget),
        "default_prefill_layers": prefill_layers_for(adapter.num_layers),
        "seconds": time.perf_counter() - started,
    }
    if kv_heads == "fitted":
        keeps = sorted({report["recommended_prefill_layers"], report["default_prefill_layers"]} - {adapter.num_layers})
        if keeps:
            progress(f"fitting KV heads at K = {', '.join(map(str, keeps))} on the same text")
            fitted = fitted_heads.calibrate(adapter, loaded.tokenizer, text, keeps,
                                            calib_tokens or fitted_heads.DEFAULT_TOKENS, ridge,
                                            sources.bos_for(loaded.tokenizer), data_path, guard=guard,
                                            say=progress)
            report["kv_heads"] = {"kind": "fitted", "calibration": next(iter(fitted.values())).calibration,
                                  "layers": {k: h.layers for k, h in fitted.items()}}
    out = Path(out) if out else Path("artifacts") / f"analyze-{loaded.name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "importance.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out / "importance.png", report)
    progress(f"recommended K = {report['recommended_prefill_layers']} of {adapter.num_layers} "
             f"({report['rule']}); wrote {out}/importance.json and importance.png")
    return report
