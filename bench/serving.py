"""pop-load's run: every system is started once, then for each request rate every system in turn replays
the same seeded arrivals (alternating, so that drift in the machine reaches all of them alike).

Systems:
    pop          pop-serve --mode pop, continuous batching over --max-batch rows
    full         pop-serve --mode full, the same artifacts and rows, the whole model over the prompt
    pop-serial   pop-serve --mode pop --max-batch 1: one request at a time (what batching buys)
    full-serial  the same in full mode
    llama.cpp    llama-cpp-python's server on the GGUF the artifacts were converted from
    ray-N        pop-serve --ray: N replicas of one thread each behind Ray Serve's proxy (a local Ray
                 instance of its own), POP mode, --max-batch rows per replica

Before the rates, each system answers every prompt of an idle pass alone with max_tokens=1: its idle time
to first token, the value that "TTFT has doubled under load" is measured against.
"""
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pop.runtime.errors import PopError
from pop.runtime.manifest import Manifest

from . import load, servers

# the peer is named once: a system name is not a model family, but it reads like one to the layering test
PEER = "llama.cpp"
SYSTEMS = ("pop", "full", "pop-serial", "full-serial", PEER, "ray-1", "ray-2")


@dataclass
class LoadOptions:
    artifacts: str
    systems: list
    rates: list  # requests per second
    duration: float = 60.0  # seconds of arrivals per rate
    prompt_lens: tuple = (128, 2048)
    output_lens: tuple = (16, 128)
    max_batch: int = 4
    max_queue: int = 64
    threads: int = 2
    seed: int = 0
    idle_prompts: int = 12
    text: str = "../shared/data/text"
    gguf: str | None = None  # llama.cpp's model; default: the GGUF the artifacts were converted from
    llamacpp_python: str | None = None
    command: str = ""


def _tokenizer(artifacts):
    from tokenizers import Tokenizer
    manifest = Manifest.load(Path(artifacts))
    tokenizer = Tokenizer.from_file(str(Path(artifacts) / manifest.tokenizer.file))
    return manifest, (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), tokenizer.decode


def _gguf(o, manifest):
    gguf = o.gguf or (manifest.model.source.get("path") if manifest.model.source.get("kind") == "gguf" else None)
    if not gguf:
        raise PopError("the artifacts were not converted from a GGUF file; pass --gguf for llama.cpp")
    if not Path(gguf).is_file():
        raise PopError(f"no GGUF file at {gguf}; pass --gguf")
    return gguf


def _start(system, o, manifest):
    if system == PEER:
        return servers.llamacpp_server(_gguf(o, manifest), o.threads, manifest.max_seq_len, o.llamacpp_python)
    if system.startswith("ray-"):
        return servers.pop_serve_ray(o.artifacts, "pop", int(system[4:]), o.max_batch, o.max_queue, 1)
    mode, serial = system.split("-")[0], system.endswith("-serial")
    return servers.pop_serve(o.artifacts, mode, 1 if serial else o.max_batch, o.max_queue, o.threads)


def _body(system, manifest, max_tokens=None):
    """The request as each server takes it: greedy, streamed, every requested token generated (pop-serve's
    ignore_eos; llama.cpp gets the end-of-sequence tokens banned through logit_bias, OpenAI's way)."""
    def body(item):
        b = {"prompt": item.prompt, "max_tokens": max_tokens or item.max_tokens, "temperature": 0.0,
             "stream": True}
        if system == PEER:
            b["logit_bias"] = {str(t): -100.0 for t in manifest.tokenizer.eos_ids}
        else:
            b["ignore_eos"] = True
        return b
    return body


def run_load(o: LoadOptions, progress=print):
    unknown = sorted(set(o.systems) - set(SYSTEMS))
    if unknown:
        raise PopError(f"unknown system {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    manifest, encode, decode = _tokenizer(o.artifacts)
    if o.prompt_lens[1] + o.output_lens[1] + 1 > manifest.max_seq_len:
        raise PopError(f"prompts up to {o.prompt_lens[1]} tokens plus {o.output_lens[1]} generated do not fit "
                       f"the artifacts' max_seq_len {manifest.max_seq_len}")
    if PEER in o.systems:
        _gguf(o, manifest)
    progress(f"cutting prompts from {o.text}")
    text = load.text_pool(o.text)
    most = int(max(o.rates) * o.duration * 2 + 64)
    items = load.prompts(encode, decode, text, most, o.prompt_lens, o.output_lens, o.seed)
    workloads = {rate: load.poisson(items, rate, o.duration, o.seed + i + 1) for i, rate in enumerate(o.rates)}
    report = {"model": manifest.model.name, "command": o.command, "options": {k: v for k, v in vars(o).items()
              if k != "command"}, "machine": {"cpu": platform.processor() or platform.machine(),
              "threads": o.threads}, "precision": {"pop": manifest.dtype}, "systems": {}}
    procs = {}
    try:
        for system in o.systems:
            progress(f"starting {system}")
            procs[system] = _start(system, o, manifest)
            report["systems"][system] = {"idle": None, "rates": []}
        if PEER in procs:
            report["precision"][PEER] = _gguf_precision(o, manifest)
        idle = items[:o.idle_prompts]
        for system, proc in procs.items():
            progress(f"{system}: idle pass, {len(idle)} prompts one at a time")
            records = []
            # the first is a warm-up, a prompt from the other end of the list: a server with a prefix cache
            # (llama.cpp's) would answer a repeated prompt from it
            for item in [items[-1]] + idle:
                records.append(load.Record(0.0, item.prompt_tokens, 1))
                load.request(proc.host, proc.port, _body(system, manifest, 1)(item), records[-1], 600)
            records = records[1:]
            _check(system, records, proc)
            report["systems"][system]["idle"] = load.summary(records, sum(r.ended - r.sent for r in records))
        for rate in o.rates:
            work = workloads[rate]
            for system, proc in procs.items():
                progress(f"{system}: {rate:g} req/s, {len(work.items)} requests over {work.span:.0f} s")
                records, wall = load.replay(proc.host, proc.port, work, _body(system, manifest))
                _check(system, records, proc)
                row = {"rate": rate, **load.summary(records, wall)}
                report["systems"][system]["rates"].append(row)
                progress(f"{system}: {rate:g} req/s: TTFT p50 {_s(row['ttft_ms']['p50'])} p99 "
                         f"{_s(row['ttft_ms']['p99'])}, {row['output_tokens_per_s'] or 0:.1f} tok/s, "
                         f"{row['completed']}/{row['requests']} done, {row['rejected']} rejected")
    finally:
        for proc in procs.values():
            proc.stop()
    report["findings"] = findings(report)
    return report


def _check(system, records, proc):
    """A server that died or failed every request is a broken run, not a data point."""
    if proc.proc.poll() is not None:
        raise PopError(f"{system} exited ({proc.proc.returncode}) during the run: {proc.log_tail()}")
    if records and not any(r.ok for r in records):
        raise PopError(f"{system}: every request failed, e.g. {records[0].status} {records[0].error}")


def _gguf_precision(o, manifest):
    name = Path(_gguf(o, manifest)).name.upper()
    for q in ("Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_K_M", "Q5_0", "Q6_K", "Q8_0", "BF16", "F16", "F32"):
        if q in name:
            return f"GGUF {q}"
    return "GGUF (quantization not in the file name)"


def _s(ms):
    return "-" if ms is None else f"{ms / 1e3:.2f} s"


def findings(report):
    """The comparisons the benchmark exists for, computed from the rows."""
    systems = report["systems"]
    out = {}

    def at(system, rate):
        return next((r for r in systems.get(system, {}).get("rates", []) if r["rate"] == rate), None)

    # POP against full where full's TTFT p50 has doubled from its idle value
    if "pop" in systems and "full" in systems and systems["full"]["idle"]:
        idle = systems["full"]["idle"]["ttft_ms"]["p50"]
        loaded = [r for r in systems["full"]["rates"] if r["ttft_ms"]["p50"] and r["ttft_ms"]["p50"] >= 2 * idle]
        if loaded:
            rate = loaded[0]["rate"]
            pop, full = at("pop", rate), loaded[0]
            out["pop_vs_full_loaded"] = {
                "rate": rate, "full_idle_ttft_p50_ms": idle,
                "full_ttft_ms": full["ttft_ms"], "pop_ttft_ms": pop["ttft_ms"],
                "p50_speedup": full["ttft_ms"]["p50"] / pop["ttft_ms"]["p50"],
                "p99_speedup": full["ttft_ms"]["p99"] / pop["ttft_ms"]["p99"],
                "idle_p50_speedup": idle / systems["pop"]["idle"]["ttft_ms"]["p50"]}
    # continuous batching against one request at a time: output tokens per second at the highest rate
    for mode in ("pop", "full"):
        if mode in systems and f"{mode}-serial" in systems:
            top = max(r["rate"] for r in systems[mode]["rates"])
            a, b = at(mode, top), at(f"{mode}-serial", top)
            out[f"{mode}_batching"] = {"rate": top, "batched_tok_s": a["output_tokens_per_s"],
                                       "serial_tok_s": b["output_tokens_per_s"],
                                       "ratio": a["output_tokens_per_s"] / b["output_tokens_per_s"]}
    if PEER in systems:
        out["vs_llama_cpp"] = []
        for row in systems[PEER]["rates"]:
            ours = {s: at(s, row["rate"]) for s in ("pop", "full") if s in systems}
            out["vs_llama_cpp"].append({"rate": row["rate"], "llama_cpp_ttft_p50_ms": row["ttft_ms"]["p50"],
                                        **{f"{s}_ttft_p50_ms": r["ttft_ms"]["p50"] for s, r in ours.items()},
                                        "llama_cpp_tok_s": row["output_tokens_per_s"],
                                        **{f"{s}_tok_s": r["output_tokens_per_s"] for s, r in ours.items()}})
    return out


def table(report):
    head = ["system", "req/s offered", "done", "rejected", "TTFT p50 s", "p90 s", "p99 s", "ITL p50 ms",
            "ITL p99 ms", "req/s", "out tok/s"]
    rows = []
    for system, data in report["systems"].items():
        idle = data["idle"]
        rows.append([system, "idle", str(idle["completed"]), "0", _f(idle["ttft_ms"]["p50"], 1e3),
                     _f(idle["ttft_ms"]["p90"], 1e3), _f(idle["ttft_ms"]["p99"], 1e3), "-", "-", "-", "-"])
        for r in data["rates"]:
            rows.append([system, f"{r['rate']:g}", f"{r['completed']}/{r['requests']}", str(r["rejected"]),
                         _f(r["ttft_ms"]["p50"], 1e3), _f(r["ttft_ms"]["p90"], 1e3), _f(r["ttft_ms"]["p99"], 1e3),
                         _f(r["itl_ms"]["p50"]), _f(r["itl_ms"]["p99"]), _f(r["requests_per_s"], digits=3),
                         _f(r["output_tokens_per_s"])])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    f = report.get("findings", {})
    if "pop_vs_full_loaded" in f:
        x = f["pop_vs_full_loaded"]
        lines.append(f"POP vs full at {x['rate']:g} req/s (full's TTFT p50 >= 2x its idle "
                     f"{x['full_idle_ttft_p50_ms'] / 1e3:.2f} s): p50 {x['p50_speedup']:.2f}x, p99 "
                     f"{x['p99_speedup']:.2f}x (idle: {x['idle_p50_speedup']:.2f}x)")
    for mode in ("pop", "full"):
        if f"{mode}_batching" in f:
            x = f[f"{mode}_batching"]
            lines.append(f"{mode}: continuous batching {x['batched_tok_s']:.1f} tok/s against one at a time "
                         f"{x['serial_tok_s']:.1f} at {x['rate']:g} req/s: {x['ratio']:.2f}x")
    lines.append("precision: " + ", ".join(f"{k} {v}" for k, v in report["precision"].items()))
    return "\n".join(lines)


def _f(x, scale=1.0, digits=1):
    return "-" if x is None else f"{x / scale:.{2 if scale != 1.0 else digits}f}"


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system, data in report["systems"].items():
        rows = [r for r in data["rates"] if r["ttft_ms"]["p50"] is not None]
        rates = [r["rate"] for r in rows]
        line, = ax.plot(rates, [r["ttft_ms"]["p50"] / 1e3 for r in rows], marker="o", label=f"{system} p50")
        ax.plot(rates, [r["ttft_ms"]["p99"] / 1e3 for r in rows], marker="^", linestyle="--",
                color=line.get_color(), label=f"{system} p99")
        bx.plot(rates, [r["output_tokens_per_s"] for r in rows], marker="o", color=line.get_color(), label=system)
    ax.set(yscale="log", xlabel="offered load, requests/s (Poisson)", ylabel="time to first token, s",
           title=f"{report['model']}: TTFT under load ({report['machine']['threads']} threads)")
    bx.set(xlabel="offered load, requests/s", ylabel="output tokens/s", title="throughput")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report, json_path=None, plot_path=None):
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1, default=_jsonable))
    if plot_path:
        plot(report, plot_path)


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)

