"""Decode steps of several exports (and onnxruntime-genai builds), one process per measurement, alternated:
A, B, ..., A, B, ... for --rounds rounds, so that the machine's drift hits every one alike.  Each process
reads one --context-token prompt of seeded ids (POP mode), then times --steps greedy steps, three times,
and reports the median step; this prints, per export, the median and the rounds.  --batch rows (of different
seeded ids) decode together.

    .venv/bin/python benchmarks/int4-blocks/decode_ab.py artifacts/smollm2-135m-gemm-int4 \
        artifacts/smollm2-135m-int4-b64a --genai artifacts/genai/smollm2-135m-int4 --rounds 4

--genai folders run in the peer's virtualenv (scripts/genai_venv.sh), with the same threads and a KV cache
of the prompt and the steps (as pop-bench's peer).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def prompts(context, batch):
    return [np.random.default_rng(row).integers(100, 1000, context) for row in range(batch)]


def ours(directory, context, steps, threads, batch):
    from pop.runtime.session import PopSession
    s = PopSession.load(directory, threads=threads)
    rows = [p.tolist() for p in prompts(context, batch)]
    medians = []
    for _ in range(3):
        run = s.run(s.encode(rows), steps + 1, "pop")
        next(run)  # the first token: prefill and boundary
        times, last = [], time.perf_counter()
        for _ in run:
            now = time.perf_counter()
            times.append(now - last)
            last = now
        medians.append(np.median(times))
    return float(np.median(medians) * 1e3)


def genai(directory, context, steps, threads, batch):
    import onnxruntime_genai as og
    work = Path(tempfile.mkdtemp())
    copy = work / "model"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {}).update(intra_op_num_threads=threads,
                                                                         inter_op_num_threads=1)
    (copy / "genai_config.json").write_text(json.dumps(config))
    model = og.Model(str(copy))
    medians = []
    for _ in range(3):
        params = og.GeneratorParams(model)
        total = context + steps + 1
        params.set_search_options(batch_size=batch, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        generator.append_tokens(np.stack(prompts(context, batch)).astype(np.int32))
        generator.generate_next_token()  # the first token
        times, last = [], time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
            now = time.perf_counter()
            times.append(now - last)
            last = now
        medians.append(np.median(times))
        del generator
    shutil.rmtree(work)
    return float(np.median(medians) * 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="*", type=Path, help="pop-export folders")
    p.add_argument("--genai", action="append", default=[], type=Path, help="an onnxruntime-genai build (repeatable)")
    p.add_argument("--genai-python", default=str(ROOT / ".venv-genai/bin/python"))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--child", choices=("ours", "genai"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        measure = ours if a.child == "ours" else genai
        print(json.dumps(measure(a.artifacts[0], a.context, a.steps, a.threads, a.batch)))
        return
    runs = [(str(d), sys.executable, "ours") for d in a.artifacts]
    runs += [(str(d), a.genai_python, "genai") for d in a.genai]
    got = {name: [] for name, _, _ in runs}
    for r in range(a.rounds):
        for name, python, kind in runs:
            out = subprocess.run([python, __file__, name, "--child", kind, "--context", str(a.context), "--steps",
                                  str(a.steps), "--threads", str(a.threads), "--batch", str(a.batch)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name}: {out.stderr.strip().splitlines()[-1]}")
            got[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name} {got[name][-1]:.2f} ms/step", file=sys.stderr)
    print(f"decode ms/step at {a.context} tokens, batch {a.batch}, {a.threads} threads, median of {a.rounds} "
          f"alternated processes (each the median of 3 x {a.steps} steps)")
    for name, values in got.items():
        print(f"  {name}: {np.median(values):.2f}  (rounds: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
