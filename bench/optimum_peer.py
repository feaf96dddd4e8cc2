#!/usr/bin/env python3
"""pop-bench's "Optimum peer": the standard Hugging Face Optimum ONNX export of a
model, run in ONNX Runtime through optimum's ORTModelForCausalLM.generate().

Runs only in the venv made by scripts/optimum_venv.sh (optimum-onnx pins
transformers<4.58, pop needs 5.x), so it imports nothing from pop.

  optimum_peer.py export --hf-dir DIR --out DIR
  optimum_peer.py run --onnx-dir DIR --prompts FILE.json --new-tokens N --runs R --warmup W --threads T

Results go to stdout as one JSON object, progress to stderr.
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# inputs are always local folders; never wait on the Hugging Face hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASK = "text-generation-with-past"
# Fixed id prompt for the export check; valid in every vocab we use (< 49152) so
# the lead can feed the same ids to pop's runtime and compare the next token.
CHECK_IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 351, 2200, 30]
# tokenizer_config keys transformers 5.x writes that 4.57 would pass on as init kwargs
TOKENIZER_5X_KEYS = ("backend", "is_local", "local_files_only")


def log(msg):
    print(f"[optimum-peer] {msg}", file=sys.stderr, flush=True)


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # restarts VmHWM, so each config has its own peak
        f.write("5")


def peak_rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def versions():
    pkgs = ("optimum-onnx", "optimum", "transformers", "torch", "onnxruntime", "onnx")
    return {p: importlib.metadata.version(p) for p in pkgs}


def compat_config(cfg):
    """Translate a transformers 5.x config.json to the keys transformers 4.57 reads.

    5.x folds rope_theta/rope_scaling (and Gemma-3's rope_local_base_freq) into
    `rope_parameters`; 4.57 ignores that key and would silently use default thetas."""
    rope = cfg.pop("rope_parameters", None)
    if rope is None:
        return cfg
    if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma-3)
        local = rope.get("sliding_attention")
        if local is not None:
            # 4.57 Gemma-3 gives sliding layers a plain RoPE with rope_local_base_freq only
            if local.get("rope_type", "default") != "default":
                sys.exit(f"cannot express sliding-layer rope {local} in transformers 4.57")
            cfg["rope_local_base_freq"] = local["rope_theta"]
        rope = rope["full_attention"]
    rope = dict(rope)
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    return cfg


def write_compat_dir(hf_dir, dst):
    """dst = hf_dir with 4.57-readable config/tokenizer_config; other files symlinked."""
    for src in hf_dir.iterdir():
        if src.name not in ("config.json", "tokenizer_config.json"):
            (dst / src.name).symlink_to(src.resolve())
    cfg = compat_config(json.loads((hf_dir / "config.json").read_text()))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_path = hf_dir / "tokenizer_config.json"
    if tok_path.exists():
        tok = {k: v for k, v in json.loads(tok_path.read_text()).items() if k not in TOKENIZER_5X_KEYS}
        # 5.x names classes 4.57 lacks (TokenizersBackend) or maps to slow sentencepiece
        # ones (GemmaTokenizer); the generic fast class just loads tokenizer.json.
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))


def check_export(compat_dir, onnx_dir):
    """Next-token logits on CHECK_IDS: exported ONNX vs the 4.57 PyTorch model."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([CHECK_IDS])
    mask = torch.ones_like(ids)
    ref = AutoModelForCausalLM.from_pretrained(compat_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits[0, -1]
    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
    ort_logits = ort_model(input_ids=ids, attention_mask=mask).logits[0, -1]
    return {
        "prompt_ids": CHECK_IDS,
        "onnx_argmax": int(ort_logits.argmax()),
        "onnx_top5": ort_logits.topk(5).indices.tolist(),
        "torch457_argmax": int(ref_logits.argmax()),
        "max_abs_diff_vs_torch457": float((ort_logits - ref_logits).abs().max()),
    }


def cmd_export(a):
    from optimum.exporters.onnx import main_export

    hf_dir, out = Path(a.hf_dir).resolve(), Path(a.out).resolve()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="optimum-compat-") as tmp:
        compat = Path(tmp)
        write_compat_dir(hf_dir, compat)
        log(f"exporting {hf_dir} (via 4.57-compat config in {compat}) -> {partial}")
        t0 = time.perf_counter()
        # in-process equivalent of: optimum-cli export onnx --model DIR --task TASK --dtype fp32 OUT
        main_export(str(compat), output=partial, task=TASK, device="cpu", dtype="fp32")
        export_s = time.perf_counter() - t0
        log(f"export done in {export_s:.0f}s; checking logits against the 4.57 PyTorch model")
        check = check_export(compat, partial)
    info = {
        "versions": versions(),
        "command": f"optimum-cli export onnx --model <compat of {hf_dir}> --task {TASK} --dtype fp32 --device cpu {out}",
        "argv": sys.argv,
        "export_seconds": round(export_s, 1),
        "check": check,
    }
    (partial / "peer_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log(f"wrote {out}")
    print(json.dumps(info))


def cmd_run(a):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class StampStreamer(BaseStreamer):
        """Timestamps each put(): the first carries the prompt, each later one a new token."""

        def __init__(self):
            self.times, self.values = [], []

        def put(self, value):
            self.times.append(time.perf_counter())
            self.values.append(value)

        def end(self):
            pass

    torch.set_num_threads(a.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    model = ORTModelForCausalLM.from_pretrained(a.onnx_dir, provider="CPUExecutionProvider", session_options=so)
    # ORTModelForCausalLM wraps a single InferenceSession (decoder with past, merged)
    providers = model.session.get_providers()
    assert providers == ["CPUExecutionProvider"], providers
    logits_shape = model.session.get_outputs()[model.output_names["logits"]].shape
    log(f"loaded {a.onnx_dir}: providers {providers}, logits shape {logits_shape}")

    results = []
    for cfg in json.loads(Path(a.prompts).read_text())["configs"]:
        ids = torch.tensor(cfg["ids"], dtype=torch.int64)
        assert ids.shape == (cfg["batch"], cfg["length"]), (ids.shape, cfg["batch"], cfg["length"])
        ttft, decode = [], []
        reset_peak_rss()
        for i in range(a.warmup + a.runs):
            st = StampStreamer()
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                           min_new_tokens=a.new_tokens, do_sample=False, streamer=st)
            assert len(st.times) == a.new_tokens + 1, len(st.times)
            if i < a.warmup:
                continue
            ttft.append((st.times[1] - t0) * 1e3)
            if a.new_tokens > 1:
                decode.append((st.times[-1] - st.times[1]) * 1e3 / (a.new_tokens - 1))
        log(f"batch {cfg['batch']} length {cfg['length']}: ttft_ms {[round(x, 1) for x in ttft]}")
        # the token generate() picked: the argmax, except that min_new_tokens masks EOS
        first_ids = st.values[1].view(-1).tolist()
        results.append({"batch": cfg["batch"], "length": cfg["length"], "ttft_ms": ttft,
                        "decode_ms_per_token": decode, "first_token_ids": first_ids,
                        "peak_rss_bytes": peak_rss_bytes()})
    # a symbolic sequence dim means the graph computes logits for every prompt position
    all_positions = len(logits_shape) == 3 and logits_shape[1] != 1
    print(json.dumps({"peer": "optimum-onnx", "versions": versions(), "threads": a.threads,
                      "providers": providers, "logits_shape": logits_shape,
                      "logits_all_positions": all_positions, "results": results}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="Optimum ONNX export of a transformers 5.x model folder")
    e.add_argument("--hf-dir", required=True)
    e.add_argument("--out", required=True)
    r = sub.add_parser("run", help="time generate() of an exported model")
    r.add_argument("--onnx-dir", required=True)
    r.add_argument("--prompts", required=True)
    for flag, default in (("--new-tokens", None), ("--runs", 1), ("--warmup", 0), ("--threads", 1)):
        r.add_argument(flag, type=int, default=default, required=default is None)
    a = p.parse_args()
    if a.cmd == "run" and a.runs < 1:
        p.error("--runs must be at least 1")
    cmd_export(a) if a.cmd == "export" else cmd_run(a)


if __name__ == "__main__":
    main()
