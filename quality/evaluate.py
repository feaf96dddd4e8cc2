"""pop-eval: what pruning the prefill costs, against the full model, on real text."""
import argparse
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pop.exporter import sources
from pop.exporter.export import kept_layers
from pop.runtime.errors import PopError, run_command

from . import data, fidelity
from .methods import HFRunner, RuntimeRunner, standard_methods

PRUNE_RATIOS = (0.2, 0.25, 1 / 3, 0.4, 0.5)  # the paper's pruning-ratio study (its Table 4)


def default_ks(num_layers):
    return sorted({num_layers - math.floor(r * num_layers + 1e-9) for r in PRUNE_RATIOS})


def _model_spec(manifest):
    src = manifest["model"]["source"]
    spec = src.get("preset") or src.get("id") or src.get("path")
    if not spec:
        raise PopError("the manifest does not say which model these artifacts came from")
    return spec


def evaluate(model=None, artifacts=None, data_paths=(), ks=None, samples=24, prompt_len=128, continuation=32,
             greedy_tokens=16, progress=print):
    if (model is None) == (artifacts is None):
        raise PopError("give --model or --artifacts")
    texts = [(p, *data.read_text(p)) for p in data_paths]  # bad files fail before any model loads
    session = None
    if artifacts:
        from pop.runtime.session import PopSession
        session = PopSession.load(artifacts)
        model = _model_spec(session.manifest)
    progress(f"loading {model}")
    loaded = sources.load(model, progress=progress)
    n_layers = loaded.model.config.num_hidden_layers
    default_k = kept_layers(n_layers)
    ks = list(ks) if ks else default_ks(n_layers)
    bad = [k for k in ks if not 1 <= k <= n_layers]
    if bad:
        raise PopError(f"--prefill-layers must be in 1..{n_layers} for this model, got {bad[0]}")
    if default_k not in ks:
        ks.append(default_k)
    methods = standard_methods(n_layers, ks, default_k)
    runner = HFRunner(loaded.model)
    bos = sources.bos_for(loaded.tokenizer)
    report = {"model": {"name": loaded.name, "source": loaded.source, "num_layers": n_layers},
              "settings": {"samples": samples, "prompt_len": prompt_len, "continuation": continuation,
                           "greedy_tokens": greedy_tokens, "prefill_layers": sorted(ks), "default_k": default_k,
                           "reference": "HF modules, eager attention, fp32"},
              "artifacts": None, "data": []}
    if session:
        report["artifacts"] = {"path": str(artifacts), "prefill_layers": session.manifest["pop"]["prefill_layers"]}
    started = time.perf_counter()
    for path, text, sha in texts:
        windows = data.windows(text, loaded.tokenizer, prompt_len, continuation, samples, bos, path)
        rows = {m.name: [] for m in methods}
        runtime_rows = {"full": [], "pop": []}
        steps = len(windows) * (len(methods) + (2 if session else 0))
        bar = tqdm(total=steps, desc=f"pop-eval: {Path(path).name}", unit="run", file=sys.stderr)
        for prompt, cont in windows:
            full = runner.run(methods[0], prompt, cont, greedy_tokens)
            for m in methods:
                outcome = full if m is methods[0] else runner.run(m, prompt, cont, greedy_tokens)
                rows[m.name].append(fidelity.compare(full, outcome))
                bar.update(1)
            if session:
                for mode in runtime_rows:
                    outcome = RuntimeRunner(session).run(mode, prompt, cont, greedy_tokens)
                    runtime_rows[mode].append(fidelity.compare(full, outcome))
                    bar.update(1)
        bar.close()
        results = [{"method": m.name, "prefill_layers": m.prefill_layers, "kind": m.kind,
                    **fidelity.summarize(rows[m.name])} for m in methods]
        if session:
            k = session.manifest["pop"]["prefill_layers"]
            results += [{"method": "exported graphs, pop runtime, full mode", "prefill_layers": n_layers,
                         "kind": "runtime", **fidelity.summarize(runtime_rows["full"])},
                        {"method": f"exported graphs, pop runtime, POP K={k}", "prefill_layers": k,
                         "kind": "runtime", **fidelity.summarize(runtime_rows["pop"])}]
        report["data"].append({"path": str(path), "sha256": sha, "windows": len(windows), "results": results})
    report["seconds"] = time.perf_counter() - started
    return report


def markdown(report):
    parts = [f"## pop-eval: {report['model']['name']} ({report['model']['num_layers']} layers)\n",
             f"Windows of {report['settings']['prompt_len']} prompt tokens and {report['settings']['continuation']} "
             f"continuation tokens; greedy over {report['settings']['greedy_tokens']} tokens. Every method is "
             f"compared with the full model on the same windows.\n"]
    for d in report["data"]:
        parts.append(fidelity.markdown(d["results"], f"{Path(d['path']).name} ({d['windows']} windows)"))
    return "\n".join(parts)


def plot(path, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    markers = {"ShortGPT": "x", "without KV": "v", "without boundary": "^", "first third": "D"}
    for d, color in zip(report["data"], ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        name = Path(d["path"]).name
        pop = sorted((r for r in d["results"] if r["kind"] in ("pop", "full")), key=lambda r: r["prefill_layers"])
        for ax, key in zip(axes, ("top1_agreement", "perplexity")):
            ax.plot([r["prefill_layers"] for r in pop], [r[key] for r in pop], "o-", color=color, label=f"POP, {name}")
            for r in d["results"]:
                tag = next((t for t in markers if t in r["method"]), None)
                if r["kind"] == "ablation" and tag:
                    ax.scatter(r["prefill_layers"], r[key], marker=markers[tag], color=color,
                               label=f"{r['method'].split(':')[0]}, {name}")
    axes[0].set_ylabel("first-token top-1 agreement with the full model")
    axes[1].set_ylabel("continuation perplexity")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("prefill layers kept (K)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].legend(fontsize=6)
    fig.suptitle(f"Quality against K: {report['model']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="pop-eval", description="Fidelity of POP and its ablations against the "
                                                             "full model on real text.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="as for pop-export")
    src.add_argument("--artifacts", help="a pop-export folder: its graphs are evaluated through the runtime too")
    p.add_argument("--data", required=True, action="append", help="a UTF-8 text file (repeatable)")
    p.add_argument("--prefill-layers", type=int, nargs="+", metavar="K",
                   help="POP variants to compare (default: pruning 20, 25, 33, 40 and 50%% of the layers)")
    p.add_argument("--samples", type=int, default=24, help="windows per data file")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens after each prompt")
    p.add_argument("--greedy-tokens", type=int, default=16)
    p.add_argument("--out", help="folder for report.json, report.md, tradeoff.png (default: artifacts/eval-<model>)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    args = p.parse_args(argv)

    def body():
        if args.samples < 1 or args.prompt_len < 2 or args.continuation < 1 or args.greedy_tokens < 1:
            raise PopError("need --samples >= 1, --prompt-len >= 2, --continuation >= 1 and --greedy-tokens >= 1")
        report = evaluate(args.model, args.artifacts, args.data, args.prefill_layers, args.samples,
                          args.prompt_len, args.continuation, args.greedy_tokens,
                          progress=lambda m: print(f"pop-eval: {m}", file=sys.stderr, flush=True))
        out = Path(args.out) if args.out else Path("artifacts") / f"eval-{report['model']['name']}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "report.md").write_text(markdown(report))
        plot(out / "tradeoff.png", report)
        print(json.dumps(report) if args.json else markdown(report))
        print(f"pop-eval: wrote {out}/report.json, report.md and tradeoff.png", file=sys.stderr)
    return run_command("pop-eval", body)


if __name__ == "__main__":
    sys.exit(main())
