"""Resident memory of one export in a fresh process: after load, and after one 300-token prompt and 8 tokens in
each mode; with the tokens and a digest of every logit, so that two runs (say before and after a runtime
change) can be shown to compute the same.

    .venv/bin/python benchmarks/int4-blocks/resident.py artifacts/smollm2-135m-int4-b64a
"""
import hashlib
import sys

import numpy as np

from pop.runtime.memory import rss
from pop.runtime.session import PopSession


def resident_mb():
    return rss()[0] / 1e6


def main():
    session = PopSession.load(sys.argv[1], threads=2)
    loaded = resident_mb()
    ids = np.random.default_rng(0).integers(3, 5000, 300).tolist()
    digest, tokens = hashlib.sha256(), []
    for mode in ("pop", "full"):
        run = session.run(session.encode([ids]), 8, mode,
                          observe=lambda phase, logits: digest.update(b"" if logits is None else logits.tobytes()))
        tokens.append([int(t[0]) for t in run])
    print(f"resident after load {loaded:.0f} MB, after both runs {resident_mb():.0f} MB; tokens {tokens}; "
          f"logits sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
