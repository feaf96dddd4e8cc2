"""A decode step's Python time outside ONNX Runtime's run, A/B in one process: steps that pass the step
before's inputs and outputs again (`PopSession._run`'s steady path, the default) against steps that build and
bind them anew (what every step did before).  Alternates the two, --reps pairs of one prompt of --context
random ids and --steps tokens each; prints each side's median step and its time outside the session run.

    .venv/bin/python benchmarks/int8-gemm/decode/bind_ab.py artifacts/smollm2-135m-gemm-int4 --context 1024
"""
import argparse
import time
from pathlib import Path

import numpy as np

from pop.runtime.session import PopSession


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    session = PopSession.load(a.artifacts, threads=a.threads)
    decode = session.backend.sessions["decode"]
    run, runs = decode.run_with_iobinding, []

    def timed(io, *args):
        t = time.perf_counter()
        run(io, *args)
        runs.append((time.perf_counter() - t) * 1e3)
    decode.run_with_iobinding = timed
    steady = session._run

    def anew(*args, **kwargs):
        session._steady = None
        return steady(*args, **kwargs)
    rows = np.random.default_rng(0).integers(100, 1000, (a.batch, a.context)).tolist()
    result, tokens = {"anew": [], "steady": []}, {}
    for _ in range(a.reps):
        for side in result:
            session._run = anew if side == "anew" else steady
            runs.clear()
            stats = {}
            out = [t.copy() for t in session.steps(rows, a.steps + 1, "pop", stats=stats)]
            tokens.setdefault(side, out)
            step, inside = np.array(stats["decode_ms"]), np.array(runs[-a.steps:])
            result[side].append((np.median(step), np.median(step - inside)))
    for side, r in result.items():
        r = np.array(r)
        print(f"{side}: step {np.median(r[:, 0]):.2f} ms, outside the session run {np.median(r[:, 1]):.3f} ms "
              f"(median of {a.reps} runs of {a.steps} steps)")
    same = all((x == y).all() for x, y in zip(tokens["anew"], tokens["steady"]))
    print(f"same tokens: {same}")


if __name__ == "__main__":
    main()
