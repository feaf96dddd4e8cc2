"""Timing our runtime: POP against full, A/B interleaved in one process.

Each run times both modes back to back on the same prompt, alternating which
goes first, and the speedup is taken per run pair before the median: drift of
the machine (frequency, other load) hits both halves of a pair alike.
"""
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pop.runtime.memory import peak_rss_bytes


def prompt_ids(vocab_size, specials, batch, length, bos=None, seed=0):
    """Seeded token ids, [batch, length]: cost depends on shapes, not on content,
    so every method can be handed the same ids without a tokenizer."""
    rng = np.random.default_rng([seed, batch, length])
    ids = rng.integers(3, vocab_size, size=(batch, length), dtype=np.int64)
    for s in specials:  # an eos inside the prompt would be legal but odd
        ids[ids == s] = 3
    if bos is not None:
        ids[:, 0] = bos
    return ids


def reset_peak_rss():
    """Restart the kernel's high-water mark (VmHWM), so each configuration reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stat(values):
    """Median and spread of a list of numbers (None when empty)."""
    if not values:
        return None
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "p25": float(np.percentile(v, 25)), "p75": float(np.percentile(v, 75)),
            "min": float(v.min()), "max": float(v.max()), "runs": [float(x) for x in v]}


# Seconds every timed run waits before it starts.  ONNX Runtime's threads, ours and a peer's in its own
# process alike, spin for some milliseconds after a run (about 20 here) unless told not to; a run started
# at once shares the cores with them.  Each engine is timed as it would run alone on the machine.
SETTLE_S = 0.1


def settle():
    time.sleep(SETTLE_S)


def measure_runtime(session, ids, new_tokens, runs, warmup, tick=lambda: None, images=None, between=None):
    """POP and full mode on the same ids.  Full-mode runs stop at the first token:
    the decode steps after it are the same graph at the same shapes as in POP mode.
    With images (VLM artifacts), ids are chat texts and images one list per row.
    between(i, counted), when given, runs after pair i: the turn of peers measured in the same rotation."""
    rows = list(ids) if images is not None else [list(map(int, r)) for r in ids]
    samples = {k: [] for k in ("pop_ttft", "full_ttft", "speedup", "prefill", "boundary", "full_prefill",
                               "decode_step", "decode_per_token", "vision", "prepare")}
    gpu = {k: [] for k in ("pop_prefill", "pop_boundary", "full_prefill", "decode_step")}  # CUDA events
    first_tokens = {}
    reset = reset_peak_rss()
    for i in range(warmup + runs):
        pair = {}
        for mode in (("pop", "full") if i % 2 == 0 else ("full", "pop")):
            settle()
            stats = {}
            for n, token in enumerate(session.steps(rows, new_tokens if mode == "pop" else 1, mode, stats=stats,
                                                    images=images)):
                if n == 0:
                    first_tokens[mode] = [int(t) for t in token]
            pair[mode] = stats
            tick()
        if between is not None:
            between(i, i >= warmup)
        if i < warmup:
            continue
        pop, full = pair["pop"], pair["full"]
        samples["pop_ttft"].append(pop["ttft_ms"])
        samples["full_ttft"].append(full["ttft_ms"])
        samples["speedup"].append(full["ttft_ms"] / pop["ttft_ms"])
        samples["prefill"].append(pop["prefill_ms"])
        samples["boundary"].append(pop["boundary_ms"])
        samples["full_prefill"].append(full["prefill_ms"])
        samples["vision"] += [pop["vision_ms"], full["vision_ms"]]
        samples["prepare"] += [pop["prepare_ms"], full["prepare_ms"]]
        if pop["decode_ms"]:
            samples["decode_step"] += pop["decode_ms"]
            samples["decode_per_token"].append(float(np.mean(pop["decode_ms"])))
        if pop["gpu_ms"].get("prefill") is not None:
            gpu["pop_prefill"].append(pop["gpu_ms"]["prefill"])
            gpu["pop_boundary"].append(pop["gpu_ms"]["boundary"])
            gpu["full_prefill"].append(full["gpu_ms"]["prefill"])
            gpu["decode_step"] += pop["gpu_ms"]["decode"]
    out = {k: stat(v) for k, v in samples.items()}
    out["gpu"] = {k: stat(v) for k, v in gpu.items()} if gpu["pop_prefill"] else None
    out["peak_rss_bytes"] = peak_rss_bytes() if reset else None
    out["first_tokens"] = first_tokens
    out["prompt_tokens"] = len(stats["prompt_ids"][0])
    return out


def kernel_ms_by_operator(profile, runs):
    """ONNX Runtime profile file -> ({operator type: median kernel ms per run}, median ms of a run), over the
    last `runs` model runs in it (benchmarks' profiles of where a graph call's time goes)."""
    events = json.loads(Path(profile).read_text())
    timed = [e for e in events if e.get("name") == "model_run"][-runs:]
    per = [defaultdict(float) for _ in timed]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for i, r in enumerate(timed):
                if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                    per[i][e["args"]["op_name"]] += e["dur"] / 1e3
                    break
    ops = {op for p in per for op in p}
    return ({op: float(np.median([p.get(op, 0.0) for p in per])) for op in ops},
            float(np.median([r["dur"] / 1e3 for r in timed])))
