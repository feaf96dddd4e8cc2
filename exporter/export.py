"""pop-export end to end: load -> trace -> one weights file -> verify -> manifest.

Everything is written into a hidden `.partial-*` folder beside the target and
renamed into place only when complete, so an interrupted or failed export never
leaves a folder that looks finished.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from pop.runtime import manifest as manifest_io
from pop.runtime.errors import PopError

from . import fitted_heads, sources, to_aoti, to_onnx, to_tensorrt
from .families import adapter_for

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BACKENDS = ("onnx", "trt", "aoti")
DEFAULT_MAX_SEQ_LEN = 4096


def kept_layers(num_layers, prefill_layers=None, prune_ratio=None):
    """K, the layers prefill runs.  The default prunes the last third, rounded
    down as the paper does (Llama-3.1-8B: 10 of 32 pruned, K = 22)."""
    if prefill_layers is not None and prune_ratio is not None:
        raise PopError("give --prefill-layers or --prune-ratio, not both")
    if prefill_layers is not None:
        keep = prefill_layers
    else:
        ratio = 1 / 3 if prune_ratio is None else prune_ratio
        if not 0 <= ratio < 1:
            raise PopError(f"--prune-ratio must be in [0, 1), got {ratio}")
        keep = num_layers - math.floor(ratio * num_layers + 1e-9)
    if not 1 <= keep <= num_layers:
        raise PopError(f"--prefill-layers must be in 1..{num_layers} for this model, got {keep}")
    return keep


def _versions():
    names = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers")
    out = {}
    for n in ("pop", *names):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def _positions_section(adapter):
    if adapter.position_axes == 3:
        return {"axes": 3, "rule": "M-RoPE (t, h, w): text advances all three; an image's tokens take its grid "
                                   "coordinates offset by the text before it; see pop.runtime.vision.qwen3_vl",
                "decode": "the largest prompt position + 1, then + 1 per token, the same on all axes"}
    return {"axes": 1, "rule": "per row, cumsum(attention_mask) - 1; padded slots get 1"}


def _vision_section(adapter, processor):
    if processor is None:
        raise PopError("this VLM was loaded without its processor (preprocessor_config.json), which runtimes need")
    from .pop import extra_inputs
    return {**adapter.vision_spec(processor), "graph": "vision",
            "merge": {"inputs": extra_inputs(adapter),
                      "rule": "image_embeds rows replace the embeddings of image_token_id tokens, in reading "
                              "order; image_index holds their flat b*T+t positions among the new tokens"},
            "bidirectional_images": adapter.bidirectional_images}


def _tokenizer_section(tok, hf_model, directory: Path, processor=None):
    sub = directory / "tokenizer"
    tok.save_pretrained(sub)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    if template:
        (sub / "chat_template.jinja").write_text(template)
    if not (sub / "tokenizer.json").exists():
        raise PopError("this model's tokenizer has no fast (tokenizer.json) form, which runtimes need")
    add_bos = sources.bos_for(tok) is not None
    eos = hf_model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    return {"file": "tokenizer/tokenizer.json", "config": "tokenizer/tokenizer_config.json", "add_bos": add_bos,
            "bos_id": tok.bos_token_id, "eos_ids": eos, "pad_id": tok.pad_token_id,
            "chat_template": "tokenizer/chat_template.jinja" if template else None}


def _kv_section(adapter, keep, dtype):
    past, present = to_onnx.io_names(adapter.num_layers)
    layers = []
    for l in range(adapter.num_layers):
        layers.append({"index": l, "kv_heads": adapter.num_kv_heads, "head_dim": adapter.head_dim,
                       "sliding_window": adapter.sliding_window(l),
                       "prefill": "full" if l < keep else "kv_projection",
                       "past_key": past[2 * l], "past_value": past[2 * l + 1],
                       "present_key": present[2 * l], "present_value": present[2 * l + 1]})
    return {"dtype": dtype, "layout": ["slot", "batch", "kv_heads", "head_dim"],
            "slot_semantics": "slot i of every layer holds the token at sequence index i (left padding "
                              "included); attention_mask[slot, batch] = 1 marks real tokens",
            "layers": layers}


def _measure_runtime_memory(directory: Path):
    out = subprocess.run([sys.executable, "-m", "pop.runtime.memory", str(directory)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise PopError(f"the runtime could not load the fresh export: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fail_report(report):
    keys = [k[:-len("_max_abs")] for k in report if k.endswith("_max_abs")]
    return ", ".join(f"{k} {report[k + '_max_abs']:.2g} (scale {report[k + '_scale']:.3g})" for k in keys)


def export(model, out=None, backend="onnx", prefill_layers=None, prune_ratio=None, dtype="fp32",
           max_seq_len=None, skip_verify=False, max_batch=8, threads=None, progress=print, command=None,
           kv_heads="original", calib=None, calib_tokens=None, ridge="auto"):
    """Returns (output folder, manifest).  Raises PopError for anything a user can fix.

    kv_heads="fitted" refits the pruned layers' K/V matrices on the text in calib
    (exporter/fitted_heads.py); the prefill graph alone carries them."""
    calib_text = fitted_heads.check_options(kv_heads, calib, calib_tokens, ridge)  # before any model loads
    if backend not in BACKENDS:
        raise PopError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise PopError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    # ONNX Runtime's CPU provider has no bf16 kernels, so such graphs can only be
    # checked where a GPU backend runs them.
    cpu_runnable = dtype != "bf16"
    if not cpu_runnable and not skip_verify:
        raise PopError("bf16 graphs cannot run on ONNX Runtime's CPU provider, so they cannot be verified here; "
                       "use fp32 or fp16, or add --skip-verify to write them for a GPU backend")
    started = time.perf_counter()
    progress(f"loading {model}")
    loaded = sources.load(model, DTYPES[dtype], progress)
    hf = loaded.model
    adapter = adapter_for(hf)
    keep = kept_layers(adapter.num_layers, prefill_layers, prune_ratio)
    if keep <= adapter.deepstack_layers:
        raise PopError(f"this model adds visual features after layers 0..{adapter.deepstack_layers - 1} (DeepStack); "
                       f"the prefill must keep them all and one more: --prefill-layers > {adapter.deepstack_layers}")
    if calib_text and keep == adapter.num_layers:
        raise PopError("--kv-heads fitted needs pruned layers, but --prefill-layers keeps all of them")
    if dtype == "fp16" and type(hf).__name__.startswith("Gemma3"):
        progress("warning: Gemma-3 was trained in bf16 and its activations outgrow fp16's range; fp16 graphs may "
                 "lose accuracy (verification will say): prefer --dtype bf16 on a GPU, or fp32")
    limit = getattr(adapter.cfg, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
    max_seq_len = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, limit)
    if not 2 <= max_seq_len <= limit:
        raise PopError(f"--max-seq-len must be in 2..{limit} for this model, got {max_seq_len}")
    out = Path(out) if out else Path("artifacts") / f"{loaded.name}-{backend}-pop"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".partial-{out.name}-"))
    trt_missing = None
    try:
        progress(f"POP: {adapter.num_layers} layers, prefill keeps {keep}, prunes {adapter.num_layers - keep} "
                 f"({type(hf).__name__}, {DTYPES[dtype]}, max_seq_len {max_seq_len})")
        heads = None
        if calib_text:
            progress(f"fitting the KV heads of layers {keep}..{adapter.num_layers - 1} on {calib}")
            heads = fitted_heads.calibrate(adapter, loaded.tokenizer, calib_text[0], [keep],
                                           calib_tokens or fitted_heads.DEFAULT_TOKENS, ridge,
                                           sources.bos_for(loaded.tokenizer), calib)[keep]
        t = time.perf_counter()
        if backend == "aoti":  # AOTInductor packages instead of ONNX graphs, over the same kind of weights.bin
            graph_specs, stored = to_aoti.export(adapter, keep, max_seq_len, hf.dtype, tmp, progress, heads)
            trace_s = time.perf_counter() - t
        else:
            graphs = to_onnx.trace(adapter, keep, max_seq_len, hf.dtype, progress, heads)
            trace_s = time.perf_counter() - t
            progress("writing one shared weights file for both graphs")
            stored = to_onnx.save_shared(graphs, tmp)
            graph_specs = {name: {"file": f"{name}.onnx", "format": "onnx", "opset": to_onnx.OPSET,
                                  **to_onnx.describe_io(tmp / f"{name}.onnx")} for name in graphs}
            del graphs
        param_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        manifest = {
            "model": {"name": loaded.name, "architecture": type(hf).__name__, "source": loaded.source,
                      "num_parameters": sum(p.numel() for p in hf.parameters()), "parameter_bytes": param_bytes,
                      "vocab_size": adapter.cfg.vocab_size, "hidden_size": adapter.cfg.hidden_size,
                      "num_attention_heads": adapter.num_heads,
                      "intermediate_size": adapter.cfg.intermediate_size},
            "pop": {"num_layers": adapter.num_layers, "prefill_layers": keep,
                    "pruned_layers": list(range(keep, adapter.num_layers)),
                    "prune_ratio": (adapter.num_layers - keep) / adapter.num_layers},
            "dtype": DTYPES[dtype],
            "max_seq_len": max_seq_len,
            "positions": _positions_section(adapter),
            "kv_cache": _kv_section(adapter, keep, DTYPES[dtype]),
            "graphs": graph_specs,
            "weights": {"file": to_onnx.WEIGHTS, "bytes": (tmp / to_onnx.WEIGHTS).stat().st_size,
                        "unique_tensors": stored["unique_tensors"],
                        "referenced_bytes": stored["referenced_bytes"], "stored_bytes": stored["stored_bytes"],
                        **({"tensors": stored["tensors"]} if "tensors" in stored else {})},
            "tokenizer": _tokenizer_section(loaded.tokenizer, hf, tmp, loaded.processor),
            "generation": {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0},
            "engines": {},
        }
        for g in manifest["graphs"].values():
            g["token_input"] = "input_ids"
        manifest["graphs"]["prefill"]["role"] = "prompt tokens 1..N-1: layers < K, KV heads for layers >= K"
        manifest["graphs"]["decode"]["role"] = "full model over T >= 1 new tokens after a past cache"
        if adapter.image_inputs:
            manifest["graphs"]["vision"]["role"] = "images -> embeddings of their placeholder tokens"
            manifest["vision"] = _vision_section(adapter, loaded.processor)
        if heads is not None:
            manifest["kv_heads"] = fitted_heads.manifest_section(heads, calib, calib_text[1],
                                                                 manifest["model"]["num_parameters"])
        manifest["provenance"] = {"command": command, "versions": _versions(), "created_unix": int(time.time()), "trace_seconds": trace_s}
        manifest_io.write(tmp, manifest)  # provisional, so the runtime can read the folder while we verify

        if skip_verify:
            manifest["verification"] = {"skipped": True}
            progress("verification skipped (--skip-verify)")
        else:
            from .verify import verify
            report = verify(hf, adapter, keep, tmp, manifest, DTYPES[dtype], threads, progress, loaded.processor,
                            heads)
            manifest["verification"] = report
            if not report["passed"]:
                raise PopError(f"verification failed: the exported graphs differ from the PyTorch reference "
                               f"beyond {report['tolerance']} x scale: max abs differences {_fail_report(report)}; nothing was written")
            progress(f"verified: {_fail_report(report)} (tolerance {report['tolerance']} x scale)")
        del loaded, hf, adapter, heads

        if cpu_runnable:
            progress("measuring the runtime's resident memory in a fresh process")
            memory = _measure_runtime_memory(tmp)
        else:
            memory = {"runtime_measured": False, "why": "bf16 graphs do not run on the CPU runtime"}
        artifact_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        manifest["memory"] = {"parameter_bytes": param_bytes, "artifact_bytes": artifact_bytes,
                              "weights_file_bytes": manifest["weights"]["bytes"],
                              "weights_if_stored_per_graph_bytes": stored["referenced_bytes"], **memory}

        if backend == "trt":
            problems = [f"{g['file']}: {p}" for g in manifest["graphs"].values()
                        for p in to_tensorrt.unsupported(tmp / g["file"])]
            if problems:
                raise PopError("TensorRT cannot parse the exported graphs: " + "; ".join(problems))
            ok, why = to_tensorrt.available()
            if not ok:
                trt_missing = why
            else:
                ranges = to_tensorrt.axis_ranges(max_batch, max_seq_len, manifest.get("vision"))
                for name in manifest["graphs"]:
                    progress(f"building the TensorRT engine for {name}")
                    manifest["engines"][name] = to_tensorrt.build_engine(
                        tmp / f"{name}.onnx", tmp / f"{name}.engine", manifest["graphs"][name], ranges)

        manifest["provenance"]["files"] = {
            str(f.relative_to(tmp)): sources.sha256_file(f) for f in sorted(tmp.rglob("*"))
            if f.is_file() and f.name != manifest_io.FILE}
        manifest["provenance"]["export_seconds"] = time.perf_counter() - started
        manifest_io.write(tmp, manifest)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"wrote {out} in {time.perf_counter() - started:.0f} s "
             f"({manifest['memory']['artifact_bytes'] / 1e6:.1f} MB; parameters {param_bytes / 1e6:.1f} MB)")
    if trt_missing:
        raise PopError(f"no TensorRT engine was built: {trt_missing}. The verified ONNX graphs are in {out}; "
                       f"build engines on a machine with an NVIDIA GPU and TensorRT 10+ (pip install .[trt])")
    return out, manifest


def _replace_dir(new: Path, target: Path):
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)  # mkdtemp made it private
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
