"""Transparent huge pages for ONNX Runtime's re-laid-out weights, A/B.  Where the kernel gives huge pages
only to memory that asks for them (/sys/kernel/mm/transparent_hugepage/enabled: madvise, as here), glibc
asks for them on its large allocations when started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc
2.35 and later); the prepacked matrices, ONNX Runtime's allocations, then sit in 2 MiB pages.  This runs
benchmarks/spinning.py's measurement (a POP and a full-mode prompt, each followed by generated tokens) in
alternating fresh processes without and with the tunable, and reads each process's AnonHugePages.

    .venv/bin/python benchmarks/hugepages.py artifacts/smollm2-135m-onnx-pop artifacts/gemma3-270m-onnx-pop \
        --processes 3 --threads 2 --out benchmarks/hugepages
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SPINNING = Path(__file__).with_name("spinning.py")
TUNABLE = "glibc.malloc.hugetlb=1"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path, nargs="+")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text().strip() if thp.exists() else "unknown"
    rows = []
    for art in a.artifacts:
        got = {"off": [], "on": []}
        for i in range(a.processes):
            for variant in ("off", "on"):
                env = dict(os.environ)
                env.pop("GLIBC_TUNABLES", None)
                if variant == "on":
                    env["GLIBC_TUNABLES"] = TUNABLE
                cmd = [sys.executable, str(SPINNING), str(art), "--variant", "stop", "--prompt-len", str(a.prompt_len),
                       "--threads", str(a.threads), "--report-memory"]
                run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if run.returncode:
                    sys.exit(f"{art.name} {variant}: {run.stderr.strip().splitlines()[-1]}")
                got[variant].append(json.loads(run.stdout))
                print(f"{art.name} process {i + 1}/{a.processes} huge pages {variant}: {got[variant][-1]}",
                      file=sys.stderr)
        for variant, runs in got.items():
            rows.append({"artifacts": art.name, "tunable": variant,
                         **{k: float(np.median([r[k] for r in runs])) for k in runs[0]}, "runs": runs})
    lines = [f"Prompt {a.prompt_len} tokens, batch 1, {a.threads} threads; transparent_hugepage/enabled: {mode}; "
             f"medians over {a.processes} processes per variant (alternating).", "",
             f"| artifacts | GLIBC_TUNABLES={TUNABLE} | POP TTFT ms | full TTFT ms | decode ms/token | AnonHugePages MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artifacts']} | {r['tunable']} | {r['pop']:.1f} | {r['full']:.1f} | {r['decode']:.2f} | "
                     f"{r['anon_huge_mb']:.0f} |")
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"hugepages-{a.prompt_len}.json").write_text(json.dumps(rows, indent=1))
        (a.out / f"hugepages-{a.prompt_len}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
