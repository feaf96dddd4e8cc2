"""pop-bench's outputs: the terminal table, and the plot."""
from pathlib import Path

# The paper's reference point (arXiv 2602.03295, Llama-3.1-8B on an A100,
# pruning 31% of layers): TTFT speedup at a 2048-token prompt.
PAPER_POINT = {"prompt_len": 2048, "speedup": 1.36, "prune_ratio": 0.31}


def _ms(s, digits=1):
    if s is None:
        return "-"
    spread = (s["p75"] - s["p25"]) / 2
    return f"{s['median']:.{digits}f}±{spread:.{digits}f}"


def table(report) -> str:
    images = any("image_size" in r for r in report["results"])
    head = ["batch", *(["image", "preprocess ms", "vision ms"] if images else []), "prompt", "POP TTFT ms", "full TTFT ms", "speedup",
            "expected", "meas/exp", "prefill ms", "boundary ms", "decode ms/tok", "peak RSS MB, both modes"]
    lines = []
    for r in report["results"]:
        image = ["x".join(map(str, r["image_size"])), _ms(r["prepare_ms"]), _ms(r["vision_ms"])] if images else []
        lines.append([str(r["batch"]), *image, str(r["prompt_len"]), _ms(r["pop_ttft_ms"]), _ms(r["full_ttft_ms"]),
                      _ms(r["speedup"], 2), f"{r['expected_speedup']:.2f}", f"{r['measured_over_expected']:.2f}",
                      _ms(r["graphs_ms"]["prefill"]), _ms(r["graphs_ms"]["boundary"]),
                      _ms(r["decode_ms_per_token"], 2),
                      f"{r['peak_rss_bytes'] / 2**20:.0f}" if r["peak_rss_bytes"] else "-"])
    out = [_format(head, lines)]
    gpu = [r for r in report["results"] if r.get("gpu_ms")]
    if gpu:
        out.append(f"GPU time per graph, CUDA events ({(report.get('gpu') or {}).get('name', 'GPU')}, "
                   f"backend {report['backend']}):")
        out.append(_format(["batch", "prompt", "POP prefill ms", "boundary ms", "full prefill ms", "decode step ms"],
                           [[str(r["batch"]), str(r["prompt_len"]), *(_ms(r["gpu_ms"][k], 2) for k in
                             ("pop_prefill", "pop_boundary", "full_prefill", "decode_step"))] for r in gpu]))
    for peer in report["peers"]:
        if not peer["available"]:
            out.append(f"{peer['name']}: not run ({peer['why']})")
            continue
        rows = [[str(r["batch"]), str(r["prompt_len"]), _ms(r["ttft_ms"]), _ms(r["decode_ms_per_token"], 2),
                 _ratio(r.get("pop_full_ttft_vs_peer")), _ratio(r.get("pop_decode_vs_peer")),
                 "-" if r.get("first_token_agreement") is None else f"{r['first_token_agreement']:.2f}"]
                for r in peer["results"]]
        out.append(f"{peer['name']} ({', '.join(f'{k} {v}' for k, v in peer.get('versions', {}).items())})")
        out.append(_format(["batch", "prompt", "TTFT ms", "decode ms/tok", "our full TTFT / theirs",
                            "our decode / theirs", "same 1st token"], rows))
    return "\n".join(out)


def _ratio(x):
    return "-" if x is None else f"{x:.2f}"


def _format(head, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def plot(report, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    results = report["results"]
    batches = sorted({r["batch"] for r in results})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for b in batches:
        rows = sorted((r for r in results if r["batch"] == b), key=lambda r: r["prompt_len"])
        n = [r["prompt_len"] for r in rows]
        med = [r["speedup"]["median"] for r in rows]
        err = [[m - r["speedup"]["p25"] for m, r in zip(med, rows)], [r["speedup"]["p75"] - m for m, r in zip(med, rows)]]
        line = ax.errorbar(n, med, yerr=err, marker="o", capsize=3, label=f"measured, batch {b}")
        bx.plot(n, [r["pop_ttft_ms"]["median"] for r in rows], marker="o", color=line[0].get_color(),
                label=f"POP, batch {b}")
        bx.plot(n, [r["full_ttft_ms"]["median"] for r in rows], marker="s", linestyle="--",
                color=line[0].get_color(), label=f"full, batch {b}")
        for peer, style in zip(report["peers"], (":", "-.")):
            prow = sorted((r for r in peer.get("results", []) if r["batch"] == b), key=lambda r: r["prompt_len"])
            if prow:
                bx.plot([r["prompt_len"] for r in prow], [r["ttft_ms"]["median"] for r in prow], marker="^",
                        linestyle=style, color=line[0].get_color(), alpha=0.6, label=f"{peer['name']}, batch {b}")
    lens = sorted({r["prompt_len"] for r in results})
    expected = {r["prompt_len"]: r["expected_speedup"] for r in results}
    ax.plot(lens, [expected[n] for n in lens], "k--", label="expected (FLOP cost model)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    if min(lens) <= PAPER_POINT["prompt_len"] <= max(lens):
        ax.plot([PAPER_POINT["prompt_len"]], [PAPER_POINT["speedup"]], "r*", markersize=12,
                label="paper: 1.36x, 31% pruned (A100, Llama-3.1-8B)")
    pop = report["pop"]
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="TTFT speedup, full / POP",
           title=f"{report['model']}: K={pop['prefill_layers']} of {pop['num_layers']} layers in prefill")
    ax.legend(fontsize=8)
    bx.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="time to first token, ms (median)",
           title=f"{report['backend']} on {report['device']}, {report['threads']} threads")
    for axis in (ax, bx):
        axis.set_xticks(lens, [str(n) for n in lens])
        axis.xaxis.set_minor_formatter(NullFormatter())
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
