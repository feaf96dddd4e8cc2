"""pop's own runtimes as pop-bench peers, on the same model:

* cpp: the C++ runtime (libpop, `make cpp`) on the same AOTI artifacts, batch 1.
  Beside its TTFT and decode speed it reports the runtime overhead per decode
  step, C++ against Python: step wall time minus the time inside the backend's
  run, so what each runtime adds around the same compiled graphs.
* other: the same model exported another way (--other-artifacts DIR: ONNX Runtime against AOTInductor,
  or fp32 against quantized weights), through the Python runtime.
"""
import time
from pathlib import Path

import numpy as np

from pop.runtime.errors import PopError

from .measure import measure_runtime, stat

PEERS = ("cpp", "other")
NAMES = {"cpp": "pop-cpp", "other": "pop-other-backend"}


class _Timed:
    """Wraps a backend's run to add up the time spent inside it."""

    def __init__(self, backend):
        self.backend, self.ms = backend, 0.0

    def run(self, graph, inputs, outputs):
        t = time.perf_counter()
        result = self.backend.run(graph, inputs, outputs)
        self.ms += (time.perf_counter() - t) * 1e3
        return result


def python_overhead(session, ids, new_tokens, runs, warmup):
    """Per decode step of the Python runtime: (wall ms, ms inside backend.run)."""
    timed = _Timed(session.backend)
    session.backend = timed
    walls, inside = [], []
    try:
        for i in range(warmup + runs):
            stats = {}
            for n, _ in enumerate(session.steps([ids], new_tokens, stats=stats)):
                if n == 0:
                    timed.ms = 0.0  # count the decode steps only
            if i >= warmup:
                steps = len(stats["decode_ms"])
                walls.append(sum(stats["decode_ms"]) / steps)
                inside.append(timed.ms / steps)
    finally:
        session.backend = timed.backend
    return walls, inside


class CppRuntime:
    name = NAMES["cpp"]

    def __init__(self, artifacts, manifest, threads):
        from pop.runtime.native import NativeSession, library
        if manifest.graph_format != "aoti":
            raise PopError("the C++ peer runs AOTI artifacts (pop-export --format aoti); this libpop has no ONNX "
                           "Runtime backend")
        self.lib = library()
        self.artifacts, self.threads = artifacts, threads
        self.session = NativeSession(artifacts, threads=threads, lib=self.lib)
        self.versions = {"libpop_abi": self.lib.pop_abi_version()}

    def measure(self, ids, new_tokens, runs, warmup, tick=lambda: None):
        if ids.shape[0] != 1:
            raise PopError("the C++ runtime serves one request per session: batch 1 only")
        from pop.runtime.session import PopSession
        prompt = [int(t) for t in ids[0]]
        ttft, per_token, overhead = [], [], []
        for i in range(warmup + runs):
            _, s = self.session.generate(prompt, new_tokens, stop_at_eos=False)
            tick()
            if i >= warmup and s["decode_steps"]:
                ttft.append(s["ttft_ms"])
                per_token.append(s["decode_ms"] / s["decode_steps"])
                overhead.append((s["decode_ms"] - s["decode_backend_ms"]) / s["decode_steps"])
        first, _ = self.session.generate(prompt, 1, mode="full", stop_at_eos=False)
        py_wall, py_inside = python_overhead(PopSession.load(self.artifacts, threads=self.threads), prompt,
                                             new_tokens, runs, warmup)
        py_over = [w - b for w, b in zip(py_wall, py_inside)]
        backend = np.median(per_token) - np.median(overhead)
        return {"ttft": stat(ttft), "decode_per_token": stat(per_token), "peak_rss_bytes": None,
                "first_tokens": first,
                "overhead_per_decode_step_ms": {
                    "cpp": stat(overhead), "python": stat(py_over),
                    "cpp_share_of_backend": float(np.median(overhead) / backend) if backend > 0 else None,
                    "python_share_of_backend": float(np.median(py_over) / np.median(py_inside))}}


class OtherBackend:
    name = NAMES["other"]

    def __init__(self, artifacts, manifest, threads):
        from pop.runtime.manifest import Manifest
        from pop.runtime.session import PopSession
        if not artifacts:
            raise PopError("the other-backend peer needs --other-artifacts DIR: the same model exported with the "
                           "other format (pop-export --format onnx or aoti)")
        other = Manifest.load(artifacts)
        if other.model.name != manifest.model.name:
            raise PopError(f"--other-artifacts holds {other.model.name}, not {manifest.model.name}")
        self.session = PopSession.load(artifacts, threads=threads)
        # which export this is: another backend's, or (the same backend) other weights
        q = other.weights.quantization
        self.versions = {"backend": self.session.backend.name, "artifacts": Path(artifacts).name,
                         "weights": q.scheme if q else other.dtype}

    def measure(self, ids, new_tokens, runs, warmup, tick=lambda: None):
        r = measure_runtime(self.session, ids, new_tokens, runs, warmup, tick)
        return {"ttft": r["pop_ttft"], "decode_per_token": r["decode_per_token"],
                "peak_rss_bytes": r["peak_rss_bytes"], "first_tokens": r["first_tokens"].get("full")}
