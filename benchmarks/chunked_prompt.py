"""Time to first token with the prompt phase in chunks (PopSession.prompt_chunk) against one call, on one
session: each round times every chunk size at every prompt length and batch, POP and full mode back to
back (bench/measure.py), before the next round.  Prints a table, writes OUT.json and OUT.png.

    .venv/bin/python benchmarks/chunked_prompt.py artifacts/gemma3-270m-onnx-pop-int4-mixed \
        --chunks 0,128,256,512 --prompt-lens 512,1024,2048 --batch 1 --runs 3 --threads 2 \
        --out benchmarks/chunked-prompt/gemma3-270m-int4

Chunk 0 is one call per prompt phase (what the runtime did before chunking); benchmarks/chunked-prompt
says what is known of why chunks are faster on the CPU.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pop.bench.measure import measure_runtime, prompt_ids
from pop.runtime.session import PopSession


def ints(text):
    return [int(x) for x in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path)
    p.add_argument("--chunks", type=ints, default=[0, 128, 256, 512], help="tokens per call; 0: one call")
    p.add_argument("--prompt-lens", type=ints, default=[512, 1024, 2048])
    p.add_argument("--batch", type=ints, default=[1])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.png")
    a = p.parse_args(argv)
    session = PopSession.load(a.artifacts, threads=a.threads)
    m = session.manifest
    cases = [(b, n) for b in a.batch for n in a.prompt_lens]
    ids = {(b, n): prompt_ids(m.model.vocab_size, session.eos_ids, b, n, m.tokenizer.bos_id) for b, n in cases}
    got = {(b, n, c): {"pop": [], "full": []} for b, n in cases for c in a.chunks}
    for r in range(a.runs + 1):  # round 0 warms every shape up
        for b, n in cases:
            for c in a.chunks:
                session.prompt_chunk = c or None
                t = measure_runtime(session, ids[b, n], 1, runs=1, warmup=0)
                print(f"round {r}{' (warm-up)' if r == 0 else ''}, batch {b}, {n} tokens, chunk {c or 'off'}: "
                      f"POP {t['pop_ttft']['median']:.0f} ms, full {t['full_ttft']['median']:.0f} ms",
                      file=sys.stderr)
                if r:
                    got[b, n, c]["pop"].append(t["pop_ttft"]["median"])
                    got[b, n, c]["full"].append(t["full_ttft"]["median"])
    rows = [{"batch": b, "prompt_len": n, "chunk": c, **{f"{mode}_ttft_ms": float(np.median(v))
                                                          for mode, v in got[b, n, c].items()},
             "runs": got[b, n, c]} for b, n in cases for c in a.chunks]
    result = {"artifacts": str(a.artifacts), "model": m.model.name, "threads": a.threads, "runs": a.runs,
              "command": " ".join(["benchmarks/chunked_prompt.py", *(argv or sys.argv[1:])]), "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    plot(result, a.out.with_suffix(".png"))


def table(result):
    base = {(r["batch"], r["prompt_len"]): r for r in result["rows"] if r["chunk"] == 0}
    lines = [f"{result['model']} ({Path(result['artifacts']).name}), {result['threads']} threads, median of "
             f"{result['runs']} rounds; against one call (chunk 0)\n",
             "| batch | prompt | chunk | POP TTFT ms | full TTFT ms | POP / one call | full / one call |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b = base.get((r["batch"], r["prompt_len"]))
        ratio = (lambda k: f"{r[k] / b[k]:.2f}") if b else (lambda k: "-")
        lines.append(f"| {r['batch']} | {r['prompt_len']} | {r['chunk'] or 'one call'} | {r['pop_ttft_ms']:.1f} | "
                     f"{r['full_ttft_ms']:.1f} | {ratio('pop_ttft_ms')} | {ratio('full_ttft_ms')} |")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for mode, style in (("pop", "-o"), ("full", "--s")):
            for i, c in enumerate(sorted({r["chunk"] for r in result["rows"]})):  # a colour per chunk size
                pts = sorted((r["prompt_len"], r[f"{mode}_ttft_ms"]) for r in result["rows"]
                             if r["batch"] == b and r["chunk"] == c)
                ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{mode.upper() if mode == 'pop' else 'full'}, "
                                                 f"{f'chunk {c}' if c else 'one call'}")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token, ms")
        ax.set_title(f"{result['model']}, batch {b}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
