"""Two or more exports of one model, A/B, in alternating fresh processes: a graph change measured against the
graphs before it.  Each process loads one export and times POP and full mode (bench/measure.py) at every
prompt length, one warm-up pair first; processes of the exports alternate, so that a slow stretch of the
machine falls on all of them.  Fresh processes, because a decode step's time differs from process to
process on this machine (benchmarks/README.md, "Threads"): one process per export would be a coin toss.
Prints per export and length the median over all its processes of POP and full-mode TTFT and decode
ms/token, and each one's ratio to the first export's.

    .venv/bin/python benchmarks/ab.py artifacts/smollm2-135m-base artifacts/smollm2-135m-onnx-pop \
        --prompt-lens 128,512 --processes 4 --runs 3 --threads 2 --out benchmarks/packed-qkv/smollm2-135m.json
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

KEYS = ("pop_ttft", "full_ttft", "decode_per_token")


def child(a):
    from pop.bench.measure import measure_runtime, prompt_ids
    from pop.runtime.session import PopSession
    s = PopSession.load(a.artifacts[0], threads=a.threads)
    m = s.manifest
    got = {}
    for n in a.prompt_lens:
        ids = prompt_ids(m.model.vocab_size, s.eos_ids, a.batch, n, m.tokenizer.bos_id)
        r = measure_runtime(s, ids, a.new_tokens, a.runs, warmup=1)
        got[n] = {k: r[k]["median"] for k in KEYS}
    print(json.dumps(got))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path, nargs="+")
    p.add_argument("--prompt-lens", default="128,512", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="timed POP/full pairs per length and process")
    p.add_argument("--processes", type=int, default=4, help="processes per export, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    samples = {str(d): {n: {k: [] for k in KEYS} for n in a.prompt_lens} for d in a.artifacts}
    for i in range(a.processes):
        for d in a.artifacts:
            cmd = [sys.executable, __file__, str(d), "--child", "--prompt-lens", ",".join(map(str, a.prompt_lens)),
                   "--batch", str(a.batch), "--new-tokens", str(a.new_tokens), "--runs", str(a.runs),
                   "--threads", str(a.threads)]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            for n, row in got.items():
                for k, v in row.items():
                    samples[str(d)][int(n)][k].append(v)
            print(f"process {i + 1}/{a.processes} {d.name}: " + ", ".join(
                f"{n}: POP {r['pop_ttft']:.1f} full {r['full_ttft']:.1f} decode {r['decode_per_token']:.2f}"
                for n, r in got.items()), file=sys.stderr)
    base = samples[str(a.artifacts[0])]
    print(f"batch {a.batch}, {a.threads} threads, median over {a.processes} processes x {a.runs} runs; "
          f"ratio: to {a.artifacts[0].name}")
    print("| export | prompt | POP TTFT ms | full TTFT ms | decode ms/token | POP ratio | full ratio | decode ratio |")
    print("|---|---|---|---|---|---|---|---|")
    result = {"argv": sys.argv[1:] if argv is None else argv, "samples": samples, "medians": {}}
    for d in a.artifacts:
        for n in a.prompt_lens:
            med = {k: float(np.median(samples[str(d)][n][k])) for k in KEYS}
            ratio = {k: med[k] / float(np.median(base[n][k])) for k in KEYS}
            result["medians"].setdefault(str(d), {})[n] = {**med, **{k + "_ratio": v for k, v in ratio.items()}}
            print(f"| {d.name} | {n} | {med['pop_ttft']:.1f} | {med['full_ttft']:.1f} | "
                  f"{med['decode_per_token']:.2f} | {ratio['pop_ttft']:.3f} | {ratio['full_ttft']:.3f} | "
                  f"{ratio['decode_per_token']:.3f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
