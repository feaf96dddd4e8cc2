"""Resident memory of a session loaded for POP mode alone against one loaded for both modes: per fresh process,
the peak while loading (VmHWM after PopSession.load) and the peak of the run after it (VmHWM restarted,
then a --context-token prompt at --batch rows and --steps new tokens in each loaded mode, POP first), which is
what pop-bench's peak column measures for us and for onnxruntime-genai.

    .venv/bin/python benchmarks/capacity/modes.py artifacts/smollm2-135m-int4-b64a artifacts/gemma3-270m-int4-b64a
"""
import argparse
import json
import subprocess
import sys


def one(directory, modes, context, batch, steps, threads):
    import numpy as np

    from pop.bench.measure import reset_peak_rss
    from pop.runtime.memory import peak_rss_bytes
    from pop.runtime.session import PopSession
    session = PopSession.load(directory, threads=threads, modes=modes)
    load_peak = peak_rss_bytes()
    ids = [np.random.default_rng(7).integers(100, 1000, context).tolist()] * batch
    if not reset_peak_rss():
        raise SystemExit("this kernel cannot restart the peak (/proc/self/clear_refs)")
    for mode in modes:
        session.generate(ids, steps, mode, stop_at_eos=False)
    return {"modes": list(modes), "batch": batch, "load_peak_mb": load_peak / 1e6, "run_peak_mb": peak_rss_bytes() / 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("MODES", "BATCH"), help=argparse.SUPPRESS)  # a child process
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.artifacts[0], tuple(a.one[0].split(",")), a.context, int(a.one[1]), a.steps,
                             a.threads)))
        return
    print("| export | batch | modes | peak while loading, MB | peak of the run, MB |\n|---|---|---|---|---|")
    for directory in a.artifacts:
        for batch in a.batch:
            for modes in ("pop", "pop,full"):
                out = subprocess.run([sys.executable, __file__, directory, "--one", modes, str(batch), "--context",
                                      str(a.context), "--steps", str(a.steps), "--threads", str(a.threads)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {directory.rstrip('/').split('/')[-1]} | {batch} | {' + '.join(r['modes'])} | "
                      f"{r['load_peak_mb']:.0f} | {r['run_peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
