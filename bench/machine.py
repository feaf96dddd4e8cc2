"""What this machine can do, measured in the same run as the benchmark: the fp32 matrix-product rate
and the streaming read bandwidth, so that results can be read as fractions of the hardware.

    GEMM   numpy's float32 matmul (the BLAS it ships) of two 2048 x 2048 matrices, best of several,
           on the benchmark's thread count (set through threadpoolctl-free means: the BLAS reads its
           thread count at import, so the measurement runs in a subprocess with OMP/OPENBLAS set)
    read   summing a 512 MiB float32 array on that many threads, best of several: every byte read
           once from DRAM
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

GEMM_N = 2048
READ_BYTES = 512 << 20


def _gemm_gflops(repeats=5):
    a = np.random.default_rng(0).standard_normal((GEMM_N, GEMM_N), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((GEMM_N, GEMM_N), dtype=np.float32)
    a @ b  # warm
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * GEMM_N ** 3 / best / 1e9


def _read_gbs(threads, repeats=5):
    from concurrent.futures import ThreadPoolExecutor
    x = np.ones(READ_BYTES // 4, np.float32)
    parts = np.array_split(x, threads)  # numpy's sum runs on one thread: one part per thread (it frees the GIL)
    with ThreadPoolExecutor(threads) as pool:
        def read():
            return sum(pool.map(np.sum, parts))
        read()  # touch every page once
        best = min(_time(read) for _ in range(repeats))
    return READ_BYTES / best / 1e9


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(threads):
    """{"gemm_fp32_gflops", "read_gbs", "how"} on `threads` threads, in a fresh process."""
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    out = subprocess.run([sys.executable, "-m", "pop.bench.machine"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return {**json.loads(out.stdout), "threads": threads, "how": __doc__.strip()}


if __name__ == "__main__":
    threads = int(os.environ.get("OMP_NUM_THREADS", 1))
    print(json.dumps({"gemm_fp32_gflops": _gemm_gflops(), "read_gbs": _read_gbs(threads)}))
