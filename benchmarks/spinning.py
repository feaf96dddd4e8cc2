"""Threads that spin after a run, A/B: ONNX Runtime's per-session threads spin a while after each run by
default; the runtime stops the decode session's at the end of each run (session.force_spinning_stop), so
that they leave the cores to the prefill call that follows decode steps.  This times both in alternating
fresh processes (a session's thread settings are fixed when it loads): "stop", as shipped, against "spin",
the same sessions without that entry (the runtime before it).  Per process: one warm-up round, then
--rounds rounds of a POP prompt and a full-mode one, each followed by --new-tokens tokens.

    .venv/bin/python benchmarks/spinning.py artifacts/smollm2-135m-onnx-pop artifacts/gemma3-270m-onnx-pop \
        --prompt-len 1024 --processes 3 --threads 2 --out benchmarks/spinning
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def child(a):
    import onnxruntime as ort
    if a.variant == "spin":
        plain = ort.SessionOptions

        class Spinning(plain):
            def add_session_config_entry(self, key, value):
                if key != "session.force_spinning_stop":
                    super().add_session_config_entry(key, value)
        ort.SessionOptions = Spinning
    from pop.bench.measure import prompt_ids
    from pop.runtime.session import PopSession
    s = PopSession.load(a.artifacts[0], threads=a.threads)
    m = s.manifest
    ids = list(map(int, prompt_ids(m.model.vocab_size, s.eos_ids, 1, a.prompt_len, m.tokenizer.bos_id)[0]))
    res = {"pop": [], "full": [], "boundary": [], "decode": []}
    for r in range(a.rounds + 1):
        for mode in ("pop", "full"):
            st = {}
            for _ in s.steps([ids], a.new_tokens + 1, mode, stats=st):
                pass
            if r:  # round 0 warms up
                res[mode].append(st["prefill_ms"] + st["boundary_ms"])
                res["decode"].extend(st["decode_ms"])
                if mode == "pop":
                    res["boundary"].append(st["boundary_ms"])
    out = {k: float(np.median(v)) for k, v in res.items()}
    if a.report_memory:  # benchmarks/hugepages.py: how much of the process sits in huge pages
        rollup = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
        out["anon_huge_mb"] = int(rollup["AnonHugePages"].split()[0]) / 1024
    print(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path, nargs="+")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", type=int, default=3, help="processes per variant, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=("stop", "spin"), help=argparse.SUPPRESS)
    p.add_argument("--report-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.variant:
        return child(a)
    rows = []
    for art in a.artifacts:
        got = {"stop": [], "spin": []}
        for i in range(a.processes):
            for variant in ("spin", "stop"):
                cmd = [sys.executable, __file__, str(art), "--variant", variant, "--prompt-len", str(a.prompt_len),
                       "--new-tokens", str(a.new_tokens), "--rounds", str(a.rounds), "--threads", str(a.threads)]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"{art.name} {variant}: {run.stderr.strip().splitlines()[-1]}")
                got[variant].append(json.loads(run.stdout))
                print(f"{art.name} process {i + 1}/{a.processes} {variant}: {got[variant][-1]}", file=sys.stderr)
        for variant, runs in got.items():
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            rows.append({"artifacts": art.name, "variant": variant, **med, "pop_over_full": med["pop"] / med["full"],
                         "runs": runs})
    head = "| artifacts | threads after a run | POP TTFT ms | full TTFT ms | POP / full | boundary ms | decode ms/token |"
    lines = [f"Prompt {a.prompt_len} tokens, batch 1, {a.threads} threads, medians over {a.processes} processes "
             f"per variant (alternating) of {a.rounds} rounds each.", "", head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artifacts']} | {r['variant']} | {r['pop']:.1f} | {r['full']:.1f} | "
                     f"{r['pop_over_full']:.3f} | {r['boundary']:.1f} | {r['decode']:.2f} |")
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        stem = f"spinning-{a.prompt_len}"
        (a.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
        (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
