"""Time to first token of several exports of one model in one process, alternated: the same seeded prompt of
--context tokens, batch 1, POP and full mode, --rounds rounds whose order rotates so that each export goes
first in turn; prints the median per export and mode.  For exports that differ in one option (here
--max-seq-len, the KV buffer's length):

    for n in 4000 1100; do
      pop-export --model smollm2-135m --max-seq-len $n --out artifacts/smollm2-135m-onnx-pop-$n
    done
    .venv/bin/python benchmarks/capacity/ttft_ab.py artifacts/smollm2-135m-onnx-pop \
        artifacts/smollm2-135m-onnx-pop-4000 artifacts/smollm2-135m-onnx-pop-1100 --rounds 6
"""
import argparse
import time

import numpy as np

from pop.runtime.session import MODES, PopSession


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    sessions = [(d, PopSession.load(d, threads=a.threads)) for d in a.artifacts]
    ids = [np.random.default_rng(7).integers(100, 1000, a.context).tolist()]
    times = {(d, m): [] for d in a.artifacts for m in MODES}

    def first_token(session, mode):
        t0 = time.perf_counter()
        run = session.run(session.encode(ids), 1, mode)
        next(run)
        elapsed = time.perf_counter() - t0
        run.close()
        return elapsed
    for _, session in sessions:  # warm-up
        for mode in MODES:
            first_token(session, mode)
    for r in range(a.rounds):
        k = r % len(sessions)
        for d, session in sessions[k:] + sessions[:k]:
            for mode in MODES:
                times[d, mode].append(first_token(session, mode))
    for d in a.artifacts:
        print(f"{d}: " + ", ".join(f"{m} {np.median(times[d, m]) * 1e3:.1f} ms" for m in MODES))


if __name__ == "__main__":
    main()
