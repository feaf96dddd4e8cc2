"""pop-eval: what pruning the prefill costs, against the full model, on real text.  Flags: pop.cli.eval."""
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pop.exporter import fitted_heads, sources
from pop.exporter.families import adapter_for
from pop.exporter.options import prefill_layers_for
from pop.runtime.errors import PopError

from . import data, fidelity
from .methods import Runner, RuntimeRunner, standard_methods

PRUNE_RATIOS = (0.2, 0.25, 1 / 3, 0.4, 0.5)  # the paper's pruning-ratio study (its Table 4)
SPEEDUP_PROMPT_LEN = 1024  # where the cost model's expected TTFT speedup is read, for plots and recommendations
HEAD_KINDS = {"original": "pop", "fitted": "pop-fitted"}  # --kv-heads -> the kind of their report rows


def expected_speedup(config, keep, prompt_len=SPEEDUP_PROMPT_LEN):
    """POP's expected TTFT speedup at K from the FLOP cost model (bench/cost.py); fitted heads have the
    same shapes as the original ones, so the same cost."""
    from pop.bench import cost
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shapes = cost.Shapes(config.hidden_size, heads, config.num_key_value_heads, head_dim, config.intermediate_size,
                         config.vocab_size, config.num_hidden_layers, keep)
    return cost.expected_speedup(shapes, prompt_len)


def recommend(report, max_kl):
    """Per KV-head kind, the deepest pruning (smallest K) whose mean first-token KL stays within max_kl
    on every data file; None where no evaluated K does."""
    out = {"max_kl": max_kl, "rule": f"the smallest evaluated K whose KL(full||POP) <= {max_kl} on every data file",
           "speedup_prompt_len": SPEEDUP_PROMPT_LEN}
    for heads, kind in HEAD_KINDS.items():
        worst = {}
        for d in report["data"]:
            for r in d["results"]:
                if r["kind"] == kind:
                    worst[r["prefill_layers"]] = max(worst.get(r["prefill_layers"], 0.0), r["kl_full_to_method"])
        if not worst:
            continue
        ok = [k for k, kl in worst.items() if kl <= max_kl]
        k = min(ok) if ok else None
        row = next((r for d in report["data"] for r in d["results"] if r["kind"] == kind and r["prefill_layers"] == k),
                   None)
        out[heads] = None if k is None else {
            "prefill_layers": k, "pruned_layers": report["model"]["num_layers"] - k, "worst_kl": worst[k],
            "expected_ttft_speedup": row["expected_ttft_speedup"]}
        if heads == "fitted" and k is not None:
            # the data files may all be of the calibration's domain: say what the heads do outside it
            calibration = report["calibration"]
            out[heads]["out_of_domain_gain"] = calibration["gain"][k]["out_of_domain"]
            out[heads]["risk"] = calibration["warning"][k]
    return out


def default_ks(num_layers):
    return sorted({num_layers - math.floor(r * num_layers + 1e-9) for r in PRUNE_RATIOS})


def _model_spec(manifest):
    src = manifest.model.source
    spec = src.get("preset") or src.get("id") or src.get("path")
    if not spec:
        raise PopError("the manifest does not say which model these artifacts came from")
    return spec


def _tags(session):
    """(full mode's, POP's) row tags that tell one export from another: its weights (their scheme, zero
    points, block size, a float32 output matrix or embedding, the graphs where they take int8 activations),
    its fitted heads."""
    m = session.manifest
    q = m.weights.quantization
    weights = ""
    if q:
        notes = [f"block {q.block_size}"] + ([] if q.symmetric else ["zero points"])
        if q.output_matrix == "float32":
            notes.append("float32 output matrix and embedding")
        elif q.embedding == "float32":  # an embedding the block layout cannot gather, beside a quantized output
            notes.append("float32 embedding")
        int8 = sorted(g for g, level in q.accuracy_level.items() if level == 4)
        if int8:
            notes.append(f"int8 activations: {' and '.join(int8)}")
        if q.integer_graphs:
            notes.append(f"integer GEMMs: {' and '.join(q.integer_graphs)}")
        weights = f", {q.scheme} weights ({', '.join(notes)})"
    fitted = ", fitted heads" if m.kv_heads and m.kv_heads.kind == "fitted" else ""
    return weights, f"{fitted}{weights}"


def evaluate(model=None, artifacts=None, data_paths=(), ks=None, samples=24, prompt_len=128, continuation=32,
             greedy_tokens=16, progress=print, kv_heads=("original",), calib=None, calib_tokens=None, ridge="auto",
             max_kl=None, guard="samples"):
    """artifacts: one pop-export folder or several of the same model (say fp32, int8 and int4 exports), each
    evaluated through the runtime beside the PyTorch methods, on the same windows.
    kv_heads: "original" (the paper's POP) and/or "fitted" (heads refitted on calib; exporter/fitted_heads.py).
    max_kl: add a recommendation, per kind of head, of the deepest pruning within that KL budget."""
    if (model is None) == (not artifacts):
        raise PopError("give --model or --artifacts")
    folders = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts or ())
    if len({Path(f).resolve() for f in folders}) < len(folders):
        raise PopError("an --artifacts folder is given twice")
    if not kv_heads or set(kv_heads) - set(HEAD_KINDS):
        raise PopError(f"--kv-heads takes original and/or fitted, got {' '.join(kv_heads or ())}")
    if max_kl is not None and not max_kl > 0:
        raise PopError(f"--max-kl must be positive, got {max_kl}")
    texts = [(p, *sources.read_text(p)) for p in data_paths]  # bad files fail before any model loads
    calib_text = fitted_heads.check_options("fitted" if "fitted" in kv_heads else "original", calib, calib_tokens,
                                            ridge, guard)
    sessions = []
    if folders:
        from pop.runtime.session import PopSession
        sessions = [PopSession.load(f) for f in folders]
        specs = {_model_spec(s.manifest) for s in sessions}
        if len(specs) > 1:
            raise PopError(f"the --artifacts folders come from different models ({', '.join(sorted(specs))}): "
                           f"evaluate each model on its own")
        model = specs.pop()
    progress(f"loading {model}")
    loaded = sources.load(model, progress=progress)
    adapter = adapter_for(loaded.model)
    n_layers = adapter.num_layers
    default_k = prefill_layers_for(n_layers)
    ks = list(ks) if ks else default_ks(n_layers)
    bad = [k for k in ks if not 1 <= k <= n_layers]
    if bad:
        raise PopError(f"--prefill-layers must be in 1..{n_layers} for this model, got {bad[0]}")
    if default_k not in ks:
        ks.append(default_k)
    bos = sources.bos_for(loaded.tokenizer)
    fitted, calibration = {}, None
    if calib_text:
        pruned = [k for k in ks if k < n_layers]
        progress(f"fitting KV heads for K = {', '.join(map(str, sorted(pruned, reverse=True)))} on {calib}")
        fitted = fitted_heads.calibrate(adapter, loaded.tokenizer, calib_text[0], pruned,
                                        calib_tokens or fitted_heads.DEFAULT_TOKENS, ridge, bos, calib,
                                        guard=guard, say=progress)
        first = next(iter(fitted.values()))
        calibration = {"file": str(calib), "sha256": calib_text[1], **first.calibration,
                       "gain": {k: h.calibration["gain"] for k, h in fitted.items()},
                       "warning": {k: h.calibration["warning"] for k, h in fitted.items()},
                       "layers": {k: h.layers for k, h in fitted.items()}}
        for k, line in calibration["warning"].items():
            if line:
                progress(f"warning: K={k}: {line}")
    methods = standard_methods(n_layers, ks, default_k, fitted, original="original" in kv_heads)
    runner = Runner(loaded.model)
    report = {"model": {"name": loaded.name, "source": loaded.source, "num_layers": n_layers},
              "settings": {"samples": samples, "prompt_len": prompt_len, "continuation": continuation,
                           "greedy_tokens": greedy_tokens, "prefill_layers": sorted(ks), "default_k": default_k,
                           "reference": "pop's layers over the model's own HF modules, eager, fp32", "kv_heads": list(kv_heads),
                           "speedup": f"expected TTFT speedup at {SPEEDUP_PROMPT_LEN} prompt tokens, FLOP cost "
                                      f"model (bench/cost.py)"},
              "calibration": calibration, "artifacts": None, "data": []}
    tags = [_tags(s) for s in sessions]
    if len(set(tags)) < len(tags):  # two exports alike in weights and heads: their folders tell them apart
        tags = [(f"{a} [{Path(f).name}]", f"{b} [{Path(f).name}]") for (a, b), f in zip(tags, folders)]
    report["artifacts"] = [{"path": str(f), "prefill_layers": s.manifest.pop.prefill_layers, "tags": list(t)}
                           for f, s, t in zip(folders, sessions, tags)] or None
    started = time.perf_counter()
    for path, text, sha in texts:
        windows = data.windows(text, loaded.tokenizer, prompt_len, continuation, samples, bos, path)
        rows = {m.name: [] for m in methods}
        runtime_rows = [{"full": [], "pop": []} for _ in sessions]
        steps = len(windows) * (len(methods) + 2 * len(sessions))
        bar = tqdm(total=steps, desc=f"pop-eval: {Path(path).name}", unit="run", file=sys.stderr)
        for prompt, cont in windows:
            full = runner.run(methods[0], prompt, cont, greedy_tokens)
            for m in methods:
                outcome = full if m is methods[0] else runner.run(m, prompt, cont, greedy_tokens)
                rows[m.name].append(fidelity.compare(full, outcome))
                bar.update(1)
            for session, by_mode in zip(sessions, runtime_rows):
                for mode in by_mode:
                    outcome = RuntimeRunner(session).run(mode, prompt, cont, greedy_tokens)
                    by_mode[mode].append(fidelity.compare(full, outcome))
                    bar.update(1)
        bar.close()
        config = loaded.model.config.get_text_config()
        results = [{"method": m.name, "prefill_layers": m.prefill_layers, "kind": m.kind,
                    "expected_ttft_speedup": expected_speedup(config, m.prefill_layers),
                    **fidelity.summarize(rows[m.name])} for m in methods]
        for session, by_mode, (full_tag, pop_tag) in zip(sessions, runtime_rows, tags):
            k = session.manifest.pop.prefill_layers
            results += [{"method": f"exported graphs, pop runtime, full mode{full_tag}", "prefill_layers": n_layers,
                         "kind": "runtime", "expected_ttft_speedup": expected_speedup(config, n_layers),
                         **fidelity.summarize(by_mode["full"])},
                        {"method": f"exported graphs, pop runtime, POP K={k}{pop_tag}", "prefill_layers": k,
                         "kind": "runtime", "expected_ttft_speedup": expected_speedup(config, k),
                         **fidelity.summarize(by_mode["pop"])}]
        report["data"].append({"path": str(path), "sha256": sha, "windows": len(windows), "results": results})
    report["seconds"] = time.perf_counter() - started
    if max_kl is not None:
        report["recommendation"] = recommend(report, max_kl)
    return report


def markdown(report):
    parts = [f"## pop-eval: {report['model']['name']} ({report['model']['num_layers']} layers)\n",
             f"Windows of {report['settings']['prompt_len']} prompt tokens and {report['settings']['continuation']} "
             f"continuation tokens; greedy over {report['settings']['greedy_tokens']} tokens. Every method is "
             f"compared with the full model on the same windows.\n"]
    for d in report["data"]:
        parts.append(fidelity.markdown(d["results"], f"{Path(d['path']).name} ({d['windows']} windows)"))
    calibration = report.get("calibration")
    if calibration:
        guard = calibration["guard"]
        parts.append(f"### Fitted heads in and out of the calibration domain\n\nReduction of the pruned layers' "
                     f"K/V error against the original heads, on held-out calibration text and on text unlike it "
                     f"({guard.get('file', guard['source'])}, unseen by the fit's choice); below 0 is worse.\n")
        parts.append("| K | in domain | out of domain |\n|---|---|---|")
        for k, g in sorted(calibration["gain"].items(), key=lambda kv: -int(kv[0])):
            parts.append(f"| {k} | {g['in_domain']:+.0%} | {g['out_of_domain']:+.0%} |")
        parts += [f"\n**Warning (K={k}):** {w}" for k, w in calibration["warning"].items() if w] + [""]
    rec = report.get("recommendation")
    if rec:
        parts.append(f"### Deepest pruning within KL <= {rec['max_kl']}\n")
        for heads in HEAD_KINDS:
            if heads in rec:
                r = rec[heads]
                parts.append(f"- {heads} heads: " + (
                    "no evaluated K stays within the budget" if r is None else
                    f"K = {r['prefill_layers']} ({r['pruned_layers']} of {report['model']['num_layers']} layers "
                    f"pruned; worst KL {r['worst_kl']:.4f}; expected TTFT speedup {r['expected_ttft_speedup']:.2f}x "
                    f"at {rec['speedup_prompt_len']} tokens)"
                    + ("" if heads != "fitted" else f"; out of the calibration domain their K/V error "
                       f"{'falls' if r['out_of_domain_gain'] >= 0 else 'rises'} by {abs(r['out_of_domain_gain']):.0%}"
                       + (" - see the warning above" if r["risk"] else ""))))
        parts.append("")
    return "\n".join(parts)


def plot(path, report):
    """Quality against POP's expected TTFT speedup (the FLOP cost model), one curve per data file and kind of
    KV head: the original heads solid, the fitted ones dashed; the paper's ablations as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    markers = {"ShortGPT": "x", "without KV": "v", "without boundary": "^", "first third": "D"}
    keys = ("top1_agreement", "kl_full_to_method", "perplexity")
    for d, color in zip(report["data"], ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        name = Path(d["path"]).name
        full = [r for r in d["results"] if r["kind"] == "full"]
        for kind, style, label in (("pop", "o-", "POP"), ("pop-fitted", "s--", "POP, fitted heads")):
            rows = sorted((r for r in d["results"] if r["kind"] == kind), key=lambda r: -r["prefill_layers"])
            if not rows:
                continue
            rows = full + rows
            for ax, key in zip(axes, keys):
                ax.plot([r["expected_ttft_speedup"] for r in rows], [r[key] for r in rows], style, color=color,
                        label=f"{label}, {name}", mfc="none" if kind == "pop-fitted" else color)
            if kind == "pop" and color == "tab:blue":
                for r in rows[1:]:
                    axes[0].annotate(f"K={r['prefill_layers']}", (r["expected_ttft_speedup"], r[keys[0]]),
                                     textcoords="offset points", xytext=(3, 4), fontsize=7)
        for r in d["results"]:
            tag = next((t for t in markers if t in r["method"]), None)
            if r["kind"] == "ablation" and tag:
                for ax, key in zip(axes, keys):
                    ax.scatter(r["expected_ttft_speedup"], max(r[key], 1e-4) if key != "top1_agreement" else r[key],
                               marker=markers[tag], color=color, label=f"{r['method'].split(':')[0]}, {name}")
    axes[0].set_ylabel("first-token top-1 agreement with the full model")
    axes[1].set_ylabel("first-token KL(full ‖ method)")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[2].set_ylabel("continuation perplexity")
    axes[2].set_yscale("log")
    rec = report.get("recommendation")
    if rec:
        axes[1].axhline(rec["max_kl"], color="grey", ls=":", lw=1, label=f"--max-kl {rec['max_kl']}")
    for ax in axes:
        ax.set_xlabel(f"expected TTFT speedup at {SPEEDUP_PROMPT_LEN} tokens (FLOP cost model)")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"Quality against prefill speedup: {report['model']['name']} ({report['model']['num_layers']} layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(report, out: Path):
    """report.json, report.md and tradeoff.png into out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(out / "tradeoff.png", report)
