"""Where a decode step's time goes: ONNX Runtime's profiler on the decode session of an export, one prompt
then N steps, kernel time per operator type (median over steps).

    .venv/bin/python benchmarks/quantized/profile_decode.py artifacts/gemma3-270m-onnx-pop-int4-mixed \
        --context 1024 --steps 32 --threads 2
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pop.bench.measure import kernel_ms_by_operator, prompt_ids
from pop.runtime.session import PopSession


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    plain = ort.SessionOptions
    prefix = Path(tempfile.mkdtemp()) / "decode"

    def profiled():  # every session the runtime opens writes a profile
        opts = plain()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(prefix)
        return opts
    ort.SessionOptions = profiled
    try:
        session = PopSession.load(a.artifacts, threads=a.threads)
    finally:
        ort.SessionOptions = plain
    m = session.manifest
    ids = prompt_ids(m.model.vocab_size, session.eos_ids, 1, a.context, m.tokenizer.bos_id)
    stats = {}
    for _ in session.steps([list(map(int, ids[0]))], a.steps, "pop", stats=stats):
        pass
    path = session.backend.sessions["decode"].end_profiling()
    # its last steps - 1 runs: the boundary step, then the generated tokens'
    by_op, run_ms = kernel_ms_by_operator(path, a.steps - 1)
    rows = sorted(by_op.items(), key=lambda x: -x[1])
    print(f"{a.artifacts.name}: decode step at {a.context} tokens of context, median over {a.steps - 1} steps, "
          f"profiler on: model run {run_ms:.2f} ms, kernels {sum(v for _, v in rows):.2f} ms; wall per token "
          f"{np.median(stats['decode_ms']):.2f} ms")
    print("| operator | ms per step |\n|---|---|")
    for op, ms in rows:
        print(f"| {op} | {ms:.2f} |")
    for f in prefix.parent.glob("*.json"):
        os.remove(f)


if __name__ == "__main__":
    main()
