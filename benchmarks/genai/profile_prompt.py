"""Where a full-mode prompt's time goes, ours against onnxruntime-genai's export of the same weights:
ONNX Runtime's profiler on our decode graph over the prompt (full mode) and on their model.onnx over the
same number of tokens, kernel time per operator type, median over runs after a warm-up.  Both in this
process, one after the other, on the same threads; their graph gets its shared past/present buffers
bound as onnxruntime-genai binds them (past_present_share_buffer), every layer's sized to our manifest's
length (onnxruntime-genai may size sliding-window layers' buffers otherwise: read Gemma-3 rows with that).

    .venv/bin/python benchmarks/genai/profile_prompt.py artifacts/smollm2-135m-onnx-pop \
        artifacts/genai/smollm2-135m-fp32 --prompt-len 128 --threads 2
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pop.bench.measure import SETTLE_S, kernel_ms_by_operator, prompt_ids
from pop.runtime.session import PopSession


PLAIN = ort.SessionOptions  # ours() swaps it for profiled_options while our sessions load


def profiled_options(prefix):
    opts = PLAIN()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    return opts


def ours(artifacts, ids, runs, threads, prefix):
    ort.SessionOptions = lambda: profiled_options(prefix / "ours")
    try:
        session = PopSession.load(artifacts, threads=threads, prompt_chunk=0)
    finally:
        ort.SessionOptions = PLAIN
    for _ in range(runs + 1):
        time.sleep(SETTLE_S)
        for _ in session.steps([ids], 1, "full"):
            pass
    return kernel_ms_by_operator(session.backend.sessions["decode"].end_profiling(), runs)


def theirs(build, ids, runs, threads, max_len, head_dim, prefix):
    opts = profiled_options(prefix / "theirs")
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(Path(build) / "model.onnx"), opts)
    io = session.io_binding()
    io.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
    io.bind_cpu_input("attention_mask", np.ones((1, len(ids)), np.int64))
    keep = []
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            buf = np.zeros((1, i.shape[1], max_len, head_dim), np.float32)
            keep.append(buf)
            io.bind_cpu_input(i.name, buf)
            out = i.name.replace("past_key_values", "present")
            io.bind_output(out, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
    io.bind_output("logits", "cpu")
    for _ in range(runs + 1):
        time.sleep(SETTLE_S)
        session.run_with_iobinding(io)
    return kernel_ms_by_operator(session.end_profiling(), runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path)
    p.add_argument("genai_build", type=Path)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    prefix = Path(tempfile.mkdtemp())
    session = PopSession.load(a.artifacts, threads=a.threads)
    m = session.manifest
    ids = list(map(int, prompt_ids(m.model.vocab_size, session.eos_ids, 1, a.prompt_len, m.tokenizer.bos_id)[0]))
    head_dim = m.kv_cache.layers[0].head_dim
    del session
    got = {"ours": ours(a.artifacts, ids, a.runs, a.threads, prefix)}
    got["theirs"] = theirs(a.genai_build, ids, a.runs, a.threads, int(m.max_seq_len), head_dim, prefix)
    print(f"{a.artifacts.name} against {a.genai_build.name}: full-mode prompt of {a.prompt_len} tokens, batch 1, "
          f"{a.threads} threads, median of {a.runs} profiled runs after a warm-up")
    print("| operator | ours ms | theirs ms |\n|---|---|---|")
    (o, o_run), (t, t_run) = got["ours"], got["theirs"]
    for op in sorted(set(o) | set(t), key=lambda k: -(o.get(k, 0) + t.get(k, 0))):
        if o.get(op, 0) + t.get(op, 0) >= 0.05:
            print(f"| {op} | {o.get(op, 0):.2f} | {t.get(op, 0):.2f} |")
    print(f"| all kernels | {sum(o.values()):.2f} | {sum(t.values()):.2f} |")
    print(f"| model run | {o_run:.2f} | {t_run:.2f} |")


if __name__ == "__main__":
    main()
