"""The KV buffer in numpy's array (transparent huge pages, asked for by numpy on large arrays) against the
runtime's lazy_zeros (4 KiB pages, resident where written), A/B in alternating fresh processes: per process,
peak and final resident memory, the KV buffer's resident bytes, TTFT of POP and full mode, and decode ms/step,
on one seeded prompt of --context tokens at --batch rows.

    .venv/bin/python benchmarks/capacity/kv_pages.py artifacts/smollm2-135m-int4-b64a --batch 1 --processes 3
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = ("numpy", "lazy")


def one(directory, variant, context, batch, steps, threads):
    import numpy as np

    from pop.runtime.backends import ort as ort_backend
    from pop.runtime.memory import peak_rss_bytes, resident_bytes, rss
    from pop.runtime.session import PopSession
    if variant == "numpy":  # the runtime before lazy_zeros
        ort_backend.lazy_zeros = np.zeros
    session = PopSession.load(directory, threads=threads)
    ids = [np.random.default_rng(7).integers(100, 1000, context).tolist()] * batch
    out = {"variant": variant, "ttft_ms": {}, "decode_ms": None}
    for mode in ("pop", "full", "pop", "full"):  # the second of each is kept: the first warms up
        t0 = time.perf_counter()
        run = session.run(session.encode(ids), steps + 1, mode)
        next(run)
        out["ttft_ms"][mode] = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        for _ in run:
            pass
        out["decode_ms"] = (time.perf_counter() - t1) * 1e3 / steps
    out.update(peak_mb=peak_rss_bytes() / 1e6, final_mb=rss()[0] / 1e6,
               kv_resident_mb=resident_bytes(session.kv._storage) / 1e6, kv_mb=session.kv.nbytes / 1e6)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--processes", type=int, default=3, help="per variant, alternated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.artifacts, a.one, a.context, a.batch, a.steps, a.threads)))
        return
    rows = []
    for i in range(a.processes):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            run = subprocess.run([sys.executable, __file__, a.artifacts, "--one", variant, "--context", str(a.context),
                                  "--batch", str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{a.artifacts}, {a.context} tokens, batch {a.batch}, medians of {a.processes} processes")
    print("| KV pages | peak RSS MB | RSS after MB | KV resident / allocated MB | POP TTFT ms | full TTFT ms "
          "| decode ms/step |")
    print("|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        got = [r for r in rows if r["variant"] == variant]

        def med(f):
            return statistics.median(f(r) for r in got)
        print(f"| {variant} | {med(lambda r: r['peak_mb']):.0f} | {med(lambda r: r['final_mb']):.0f} | "
              f"{med(lambda r: r['kv_resident_mb']):.0f} / {got[0]['kv_mb']:.0f} | "
              f"{med(lambda r: r['ttft_ms']['pop']):.0f} | "
              f"{med(lambda r: r['ttft_ms']['full']):.0f} | {med(lambda r: r['decode_ms']):.2f} |")


if __name__ == "__main__":
    main()
