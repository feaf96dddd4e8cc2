"""Where a decode step's time goes: ONNX Runtime's profiler on the decode session of an export, one prompt
then N steps, kernel time per operator type (median over steps).  --graph prefill: the same for the prefill
graph's calls over --prompts POP prompts of --context tokens (median over their calls, after a warm-up prompt).

    .venv/bin/python benchmarks/quantized/profile_decode.py artifacts/gemma3-270m-onnx-pop-int4-mixed \
        --context 1024 --steps 32 --threads 2
    .venv/bin/python benchmarks/quantized/profile_decode.py artifacts/smollm2-135m-onnx-pop-int4 \
        --graph prefill --context 1024 --prompts 4 --threads 2

--profile FILE reads a profile another program wrote instead (onnxruntime-genai's, made by
benchmarks/int8-gemm/decode/profile_genai.py), over its last --steps - 1 runs, in the same table.
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pop.bench.measure import kernel_ms_by_operator, prompt_ids, settle
from pop.runtime.session import PopSession


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--graph", choices=("decode", "prefill"), default="decode")
    p.add_argument("--prompts", type=int, default=4, help="--graph prefill: timed POP prompts")
    p.add_argument("--profile", type=Path, default=None, help="an existing ONNX Runtime profile to read instead")
    a = p.parse_args(argv)
    if a.profile is not None:
        by_op, run_ms = kernel_ms_by_operator(a.profile, a.steps - 1)
        return table(a.profile.name, f"its last {a.steps - 1} runs", run_ms, by_op, "per step", "")
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
    prompt = list(map(int, ids[0]))
    if a.graph == "prefill":
        calls = len(session.prompt_calls(a.context - 1)) - 1  # the prefill graph's calls per prompt
        for _ in range(a.prompts + 1):
            settle()
            for _ in session.steps([prompt], 1, "pop"):
                pass
        by_op, run_ms = kernel_ms_by_operator(session.backend.sessions["prefill"].end_profiling(), a.prompts * calls)
        what = (f"prefill graph over a POP prompt of {a.context} tokens ({calls} calls), "
                f"median over {a.prompts * calls} calls")
        unit, wall = "per call", ""
    else:
        stats = {}
        for _ in session.steps([prompt], a.steps, "pop", stats=stats):
            pass
        # its last steps - 1 runs: the boundary step, then the generated tokens'
        by_op, run_ms = kernel_ms_by_operator(session.backend.sessions["decode"].end_profiling(), a.steps - 1)
        what, unit = f"decode step at {a.context} tokens of context, median over {a.steps - 1} steps", "per step"
        wall = f"; wall per token {np.median(stats['decode_ms']):.2f} ms"
    table(a.artifacts.name, what, run_ms, by_op, unit, wall)
    for f in prefix.parent.glob("*.json"):
        os.remove(f)


def table(name, what, run_ms, by_op, unit, wall):
    rows = sorted(by_op.items(), key=lambda x: -x[1])
    print(f"{name}: {what}, profiler on: model run {run_ms:.2f} ms, kernels {sum(v for _, v in rows):.2f} ms{wall}")
    print(f"| operator | ms {unit} |\n|---|---|")
    for op, ms in rows:
        print(f"| {op} | {ms:.2f} |")


if __name__ == "__main__":
    main()
