#!/usr/bin/env python3
"""pop-bench's "onnxruntime-genai peer": Microsoft's model builder
(onnxruntime_genai.models.builder) exports the model, and onnxruntime-genai's
Generator API runs it greedily on the CPU.

Runs only in the venv made by scripts/genai_venv.sh, so it imports nothing from pop.

  genai_peer.py build --hf DIR --out DIR --precision fp32|int4 --threads N
  genai_peer.py serve --model DIR --new-tokens N --threads N

`serve` loads the model once, prints one JSON line describing it, then answers each
JSON line {"ids": [[...length ids...] x batch], "reset_rss": bool} on stdin with one
timed run as a JSON line on stdout; progress goes to stderr.

What a run times (the Generator is made before the clock starts,
its setup time is reported apart as setup_ms):
  ttft_ms   = Generator.append_tokens(prompt ids)   -- runs the prompt through the model;
                                                       the last position's logits are then computed
            + Generator.generate_next_token()        -- greedy pick from those logits, no model run
            + Generator.get_next_tokens()            -- the first new token ids, on the host
  decode_ms_per_token = mean over the following new_tokens-1 generate_next_token() calls, each
                        one model run on the previous token plus the greedy pick.
EOS cannot end a run early: min_length = max_length = prompt + new_tokens, which masks EOS
out of the choice as HF's min_new_tokens does in the other peers.
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

# inputs are always local folders; never wait on the Hugging Face hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The builder prints its progress on stdout and onnxruntime may too: keep fd 1 for
# our one JSON line and send everything else written to stdout to stderr.
_RESULT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

PEER = "onnxruntime-genai"
PRECISIONS = ("fp32", "int4")
EXTRA_OPTIONS = {"prune_lm_head": "true"}  # last-token logits only in prefill, like pop's pruning
INFO = "peer_info.json"  # written last into the build folder: its presence marks a finished build


def log(msg):
    print(f"[genai-peer] {msg}", file=sys.stderr, flush=True)


def emit(obj):
    _RESULT.write(json.dumps(obj) + "\n")
    _RESULT.flush()


def versions():
    pkgs = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir", "numpy")
    return {p: importlib.metadata.version(p) for p in pkgs}


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:  # restarts VmHWM, so each config has its own peak
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


# ---------------------------------------------------------------------------- build

def complete(out):
    """True when `out` is a finished build: peer_info.json (written last, before the
    rename), a genai_config.json that parses, and the decoder file it names."""
    try:
        cfg = json.loads((out / "genai_config.json").read_text())
        json.loads((out / INFO).read_text())
        return (out / cfg["model"]["decoder"]["filename"]).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def flat_gemma3_rope(config):
    """Express a transformers-5 Gemma-3 text config in the RoPE fields the 0.18 builder reads.

    transformers 5.x keeps Gemma-3's RoPE per layer type,
      rope_parameters = {"full_attention": {...}, "sliding_attention": {...}},
    while the builder's Gemma3Model (unchanged since transformers 4.x) reads a flat
    rope_parameters with "rope_type" for the global layers (base make_rope_init) and
    config.rope_local_base_freq for the sliding ones.  This sets exactly those two fields
    from the nested ones on the config object handed to create_model (the builder loads
    the weights again from the folder itself, with the folder's own config).  Anything the
    flat form cannot express is refused rather than approximated.  Returns what it set."""
    rope = getattr(config, "rope_parameters", None)
    if not (isinstance(rope, dict) and "full_attention" in rope):
        return None  # already flat, or no per-layer-type RoPE: nothing to do
    full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default" or set(local) - {"rope_type", "rope_theta"}:
        sys.exit(f"genai peer: the 0.18 builder gives Gemma-3 sliding layers a plain RoPE; cannot express {local}")
    if full.get("rope_type", "default") != "default" or set(full) - {"rope_type", "rope_theta"}:
        # the builder would apply a scaled RoPE to the sliding-layer caches too
        sys.exit(f"genai peer: cannot express Gemma-3 global-layer RoPE {full} for the 0.18 builder")
    flat = {"rope_type": "default", "rope_theta": float(full["rope_theta"])}
    config.rope_parameters = flat
    config.rope_local_base_freq = float(local.get("rope_theta", 10000.0))
    return {"rope_parameters": flat, "rope_local_base_freq": config.rope_local_base_freq}


def cmd_build(a):
    hf, out = Path(a.hf).resolve(), Path(a.out).resolve()
    if complete(out):
        log(f"{out} is already built; skipping")
        emit({**json.loads((out / INFO).read_text()), "skipped": True})
        return
    if not (hf / "config.json").is_file():
        sys.exit(f"genai peer: {hf} is not a Hugging Face folder (no config.json)")

    import torch
    torch.set_num_threads(a.threads)
    from onnxruntime_genai.models import builder

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # builds only ever appear here by a rename of a finished .partial folder
        sys.exit(f"genai peer: {out} exists and is not a finished build; remove it first")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted build left
    cache = partial / "_builder_cache"  # the builder's temporary files, removed before the rename
    cache.mkdir(parents=True)
    options = [f"{k}={v}" for k, v in EXTRA_OPTIONS.items()]
    command = (f"python -m onnxruntime_genai.models.builder -i {hf} -o {out} -p {a.precision} -e cpu "
               f"--extra_options {' '.join(options)}")
    t0 = time.perf_counter()
    # The same two calls as the builder's __main__, so the config can be adjusted between them.
    kw = builder.parse_extra_options(None, str(hf), str(partial), a.precision, "cpu", str(cache), options)
    config_fix = flat_gemma3_rope(kw["hf_details"]["hf_config"])
    if config_fix:
        log(f"Gemma-3: handing the builder the flat RoPE fields {config_fix}")
        command += "  (through the Python API, with config_fix applied to the loaded config)"
    log(f"building {hf} -> {partial} ({a.precision}, cpu)")
    builder.create_model(None, str(hf), str(partial), a.precision, "cpu", str(cache), **kw)
    shutil.rmtree(cache, ignore_errors=True)  # the builder may already have removed it
    build_s = time.perf_counter() - t0
    genai_cfg = json.loads((partial / "genai_config.json").read_text())
    info = {
        "peer": PEER,
        "versions": versions(),
        "precision": a.precision,
        "hf_dir": str(hf),
        "command": command,
        "extra_options": EXTRA_OPTIONS,
        "config_fix": config_fix,
        "build_seconds": round(build_s, 1),
        "model_type": genai_cfg["model"]["type"],
        "files": sorted(p.name for p in partial.iterdir()),
    }
    (partial / INFO).write_text(json.dumps(info, indent=2))
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    log(f"wrote {out} in {build_s:.0f}s")
    emit({**info, "skipped": False})


# ---------------------------------------------------------------------------- serve

def logits_shape(model_dir):
    """The decoder graph's declared logits shape (read without its weights)."""
    import onnx
    cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    graph = onnx.load(str(model_dir / cfg["filename"]), load_external_data=False).graph
    name = cfg.get("outputs", {}).get("logits", "logits")
    for o in graph.output:
        if o.name == name:
            return [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
    return None


def load(a):
    """(onnxruntime_genai, model, session options, process threads, smallest KV cache) for --model."""
    import onnxruntime_genai as og

    model_dir = Path(a.model).resolve()
    if not complete(model_dir):
        sys.exit(f"genai peer: {model_dir} is not a finished build; run `genai_peer.py build` first")
    session_options = {"intra_op_num_threads": a.threads, "inter_op_num_threads": 1}
    cfg = og.Config(str(model_dir))
    cfg.clear_providers()  # the CPU provider
    # documented runtime override of genai_config.json (same parser as the file)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
    t0 = time.perf_counter()
    model = og.Model(cfg)
    threads_now = len(os.listdir("/proc/self/task"))  # ORT's intra-op pool adds threads-1 to the process
    log(f"loaded {model_dir} in {time.perf_counter() - t0:.1f}s: type {model.type}, device {model.device_type}, "
        f"{threads_now} threads in the process")

    # max_length sizes the KV cache.  With a windowed cache for sliding-window layers (the
    # builder's default, windowed_kv_cache=true), 0.18's CPU GroupQueryAttention refuses a
    # cache smaller than the window ("KV cache capacity (N) must be at least
    # local_window_size (W)"), which happens when max_length < W.  So max_length is at least
    # what genai itself gives those layers at its default max_length (W + slack, slack 16 on
    # CPU): the cache a default user gets.  Generation still stops after new_tokens.
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    window = (decoder.get("sliding_window") or {}).get("window_size", 0)
    min_cache = window + ((decoder["sliding_window"].get("cache_slack") or 16) if window > 0 else 0)
    return og, model, session_options, threads_now, min_cache


def run_once(og, model, ids, new_tokens, min_cache):
    """One timed greedy generation of new_tokens after ids [batch, length] (the module docstring says what
    is timed).  Returns (setup ms, ttft ms, decode ms/token or None, first tokens, generated ids, max_length)."""
    batch, length = ids.shape
    params = og.GeneratorParams(model)
    total = length + new_tokens
    max_length = max(total, min_cache)
    params.set_search_options(do_sample=False, batch_size=batch, max_length=max_length, min_length=total)
    s0 = time.perf_counter()
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    first = gen.get_next_tokens()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        gen.generate_next_token()
    t2 = time.perf_counter()
    seqs = [gen.get_sequence(b)[length:].tolist() for b in range(batch)]
    del gen
    assert all(len(s) == new_tokens for s in seqs), [len(s) for s in seqs]
    decode = (t2 - t1) * 1e3 / (new_tokens - 1) if new_tokens > 1 else None
    return (t0 - s0) * 1e3, (t1 - t0) * 1e3, decode, [int(t) for t in first], seqs, max_length


def as_ids(value):
    import numpy as np
    ids = np.ascontiguousarray(np.asarray(value, dtype=np.int32))
    return ids[None] if ids.ndim == 1 else ids


def cmd_serve(a):
    """One model, many runs: a JSON line {"ids": [[...]], "reset_rss": bool} on stdin gets one timed run
    back as a JSON line.  pop-bench keeps this process alive and gives it its turn after each of its own
    run pairs, so that the machine's drift over minutes falls on both sides of the comparison alike."""
    og, model, session_options, threads_now, min_cache = load(a)
    model_dir = Path(a.model).resolve()
    shape = logits_shape(model_dir)
    emit({"ready": True, "peer": PEER, "versions": versions(), "model_dir": str(model_dir),
          "precision": json.loads((model_dir / INFO).read_text()).get("precision"), "threads": a.threads,
          "session_options": session_options, "process_threads_after_load": threads_now,
          "providers": ["CPUExecutionProvider"], "new_tokens": a.new_tokens,
          "logits_shape": shape, "logits_all_positions": bool(shape) and len(shape) == 3 and shape[1] != 1,
          "timed": {"ttft_ms": "append_tokens(prompt) + first generate_next_token() + get_next_tokens()",
                    "decode_ms_per_token": "mean of the next new_tokens-1 generate_next_token() calls",
                    "setup_ms": "og.Generator(model, params), before the clock; not in ttft_ms"},
          "batch_support": "batch_size search option; one append_tokens of batch x length ids (same length)"})
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("reset_rss"):
            reset_peak_rss()
        setup, ttft, decode, first, seqs, max_length = run_once(og, model, as_ids(req["ids"]), a.new_tokens,
                                                                 min_cache)
        emit({"setup_ms": setup, "ttft_ms": ttft, "decode_ms_per_token": decode, "first_token_ids": first,
              "generated_ids": seqs, "max_length": max_length, "peak_rss_bytes": peak_rss_bytes()})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="model-builder export of a Hugging Face folder (skipped when done)")
    b.add_argument("--hf", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--precision", required=True, choices=PRECISIONS)
    b.add_argument("--threads", type=int, default=1, help="torch threads for the build")
    v = sub.add_parser("serve", help="load once, then one timed run per JSON line on stdin (pop-bench's rotation)")
    v.add_argument("--model", required=True)
    v.add_argument("--new-tokens", type=int, required=True)
    v.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.threads < 1:
        p.error("--threads must be at least 1")
    if a.cmd == "serve" and a.new_tokens < 1:
        p.error("--new-tokens must be at least 1")
    (cmd_build if a.cmd == "build" else cmd_serve)(a)


if __name__ == "__main__":
    main()
