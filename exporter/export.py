"""pop-export end to end, as a short sequence of named steps over one ExportOptions and one Manifest.

    check options -> load the model -> plan K and the buffer -> [fit KV heads]
    -> format.write (graphs + weights.bin) -> describe (the Manifest, once)
    -> verify (the runtime's own step sequence against PyTorch) -> measure memory
    -> format.finish (TensorRT engines) -> provenance -> save, rename into place

Each step fills its own part of the manifest.  Everything is written into a
hidden `.partial-*` folder beside the target and renamed into place only when
complete, so an interrupted or failed export never leaves a folder that looks
finished.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pop.runtime.errors import PopError
from pop.runtime.manifest import (FILE, Encoder, Generation, KVCache, KVLayer, Manifest, Memory, Merge, ModelInfo,
                                  PopInfo, Positions, Provenance, Tokenizer, Verification, Vision)

from . import fitted_heads, quantize, sources
from .families import adapter_for
from .formats import format_for
from .formats.plan import io_names
from .options import DEFAULT_MAX_SEQ_LEN, ExportOptions, prefill_layers_for
from .pop import extra_inputs


@dataclass
class Job:
    """What the steps share: the options, and what earlier steps produced."""
    options: ExportOptions
    progress: object
    out: Path = None
    directory: Path = None  # the .partial-* folder being written
    loaded: object = None  # sources.Loaded
    adapter: object = None
    prefill_layers: int = None
    max_seq_len: int = None
    heads: object = None  # fitted KV heads, or None
    calibration: tuple = None  # (text, sha256) of fitted heads' calibration file
    scheme: object = None  # quantize.Scheme for --weights int8/int4, else None
    grids: dict = None  # quantize.fake_quantize's grids: what the graphs' rewrite may quantize

    @property
    def hf(self):
        return self.loaded.model


def export(options: ExportOptions, progress=print):
    """Returns (output folder, Manifest).  Raises PopError for anything a user can fix."""
    started = time.perf_counter()
    job = Job(options, progress, calibration=options.check())  # before any model loads
    fmt = format_for(options.format)
    load(job)
    fmt.check(job.adapter)
    plan(job)
    job.out = Path(options.out) if options.out else Path("artifacts") / f"{job.loaded.name}-{options.format}-pop"
    job.out.parent.mkdir(parents=True, exist_ok=True)
    job.directory = Path(tempfile.mkdtemp(dir=job.out.parent, prefix=f".partial-{job.out.name}-"))
    try:
        fit_heads(job)
        quantize_weights(job)
        graphs, weights, trace_s = fmt.write(job)
        manifest = describe(job, graphs, weights)
        manifest.save(job.directory)  # provisional, so the runtime can read the folder while we verify
        manifest.verification = verify(job, manifest)
        int8_compute(job, manifest)
        param_bytes = manifest.model.parameter_bytes
        job.loaded = job.adapter = job.heads = None  # the model's memory goes before the runtime measures its own
        manifest.memory = measure_memory(job.directory, manifest, param_bytes)
        manifest.engines, deferred = fmt.finish(job, manifest)
        manifest.provenance = provenance(job, trace_s, started)
        manifest.save(job.directory)
        _replace_dir(job.directory, job.out)
    finally:
        shutil.rmtree(job.directory, ignore_errors=True)
    progress(f"wrote {job.out} in {time.perf_counter() - started:.0f} s "
             f"({manifest.memory.artifact_bytes / 1e6:.1f} MB; parameters {param_bytes / 1e6:.1f} MB)")
    if deferred:
        raise PopError(deferred)
    return job.out, manifest


# --- the steps ---------------------------------------------------------------------------------

def load(job):
    job.progress(f"loading {job.options.model}")
    job.loaded = sources.load(job.options.model, job.options.torch_dtype, job.progress)
    job.adapter = adapter_for(job.hf)
    if job.options.dtype == "fp16" and job.adapter.fp16_warning:
        job.progress(f"warning: {job.adapter.fp16_warning}")


def plan(job):
    """K and the buffer's length, checked against this model."""
    o, ad = job.options, job.adapter
    job.prefill_layers = prefill_layers_for(ad.num_layers, o.prefill_layers, o.prune_ratio)
    if job.prefill_layers <= ad.deepstack_layers:
        raise PopError(f"this model adds visual features after layers 0..{ad.deepstack_layers - 1} (DeepStack); "
                       f"the prefill must keep them all and one more: --prefill-layers > {ad.deepstack_layers}")
    if job.calibration and job.prefill_layers == ad.num_layers:
        raise PopError("--kv-heads fitted needs pruned layers, but --prefill-layers keeps all of them")
    limit = getattr(ad.cfg, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
    job.max_seq_len = o.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, limit)
    if not 2 <= job.max_seq_len <= limit:
        raise PopError(f"--max-seq-len must be in 2..{limit} for this model, got {job.max_seq_len}")
    job.progress(f"POP: {ad.num_layers} layers, prefill keeps {job.prefill_layers}, prunes "
                 f"{ad.num_layers - job.prefill_layers} ({type(job.hf).__name__}, {o.torch_dtype}, "
                 f"max_seq_len {job.max_seq_len})")


def fit_heads(job):
    if not job.calibration:
        return
    o = job.options
    job.progress(f"fitting the KV heads of layers {job.prefill_layers}..{job.adapter.num_layers - 1} on {o.calib}")
    job.heads = fitted_heads.calibrate(job.adapter, job.loaded.tokenizer, job.calibration[0], [job.prefill_layers],
                                       o.calib_tokens or fitted_heads.DEFAULT_TOKENS, o.ridge,
                                       sources.bos_for(job.loaded.tokenizer), o.calib, guard=o.guard,
                                       say=job.progress)[job.prefill_layers]
    job.progress(fitted_heads.gain_line(job.heads.calibration["gain"]))
    if job.heads.calibration["warning"]:
        print(f"pop-export: warning: {job.heads.calibration['warning']}", file=sys.stderr)


def quantize_weights(job):
    """--weights int8/int4: the text matrices onto the quantization grid, in place, before tracing, so that
    the graphs (which store them quantized) and the reference verification runs hold the same weights."""
    o = job.options
    job.scheme = s = o.scheme()
    if s is None:
        return
    count, values, job.grids = quantize.fake_quantize(quantize.text_modules(job.adapter, job.heads,
                                                                            s.keep_embedding), s)
    job.progress(f"{o.weights} weights: {count} matrices ({values / 1e6:.1f} M values) rounded to {s.bits} bits in "
                 f"blocks of {s.block}, {'symmetric' if s.symmetric else 'with zero points'}"
                 + ("; the output matrix and embedding kept in float32" if s.keep_embedding else ""))


def int8_compute(job, manifest):
    """--weights-compute int8, int8-decode or int8-gemm: the graphs were verified with fp32 products (exact up
    to rounding); now those chosen take int8 activations (MatMulNBits at accuracy_level 4, or integer GEMMs
    over int8 weights derived at load: quantize.integer_products), and how far that moves them from the
    reference is measured and recorded rather than held to fp32's tolerance, which it cannot meet."""
    s = job.scheme
    if not s or not (s.int8_graphs or s.integer_graphs):
        return
    q = manifest.weights.quantization
    for name in s.int8_graphs:
        quantize.set_accuracy_level(job.directory / manifest.graphs[name].file, quantize.INT8_LEVEL)
        q.accuracy_level[name] = quantize.INT8_LEVEL
    vocab = manifest.vocab_size
    for name in s.integer_graphs:
        skip = None
        if name == "prompt":
            # full mode's prompt: the decode graph, copied, whose products become integer GEMMs, but the output
            # matrix's (a few rows per call, and a vocabulary-sized int8 copy held for nothing)
            decode = manifest.graphs["decode"]
            shutil.copyfile(job.directory / decode.file, job.directory / "prompt.onnx")
            manifest.graphs["prompt"] = dataclasses.replace(
                decode, file="prompt.onnx", role="full mode's prompt: the decode graph with integer GEMMs, for calls "
                                                "of more than one token")
            q.operators[name], skip = dict(q.operators["decode"]), vocab
        derived, integer, kept = quantize.integer_products(job.directory / manifest.graphs[name].file, s,
                                                           manifest.weights.file, name, skip_n=skip)
        q.derived = (q.derived or []) + derived
        q.integer_graphs = (q.integer_graphs or []) + [name]
        q.accuracy_level.pop(name, None)
        q.operators[name].pop("MatMulNBits")
        q.operators[name] = {"MatMulInteger": integer, **({"MatMulNBits": kept} if kept else {}), **q.operators[name]}
        job.progress(f"{name} graph: {integer} products as integer GEMMs, over {len(derived)} int8 matrices "
                     f"derived at load" + (f"; {kept} left to MatMulNBits (the output matrix)" if kept else ""))
    manifest.save(job.directory)
    if job.options.skip_verify:
        return
    from .verify import verify as run_verification
    report = run_verification(job, manifest)
    q.int8_compute_error = {what: round(c.max_abs / c.scale, 6) for what, c in report.checks.items()}
    job.progress("int8 activations: max abs difference from the reference, relative to its scale: "
                 + ", ".join(f"{what} {v:.2g}" for what, v in q.int8_compute_error.items()))


def describe(job, graphs, weights) -> Manifest:
    """The manifest of what was written, built once from the model, the plan and the graphs."""
    hf, ad, k = job.hf, job.adapter, job.prefill_layers
    dtype = job.options.torch_dtype
    num_parameters = sum(p.numel() for p in hf.parameters())
    model = ModelInfo(job.loaded.name, type(hf).__name__, job.loaded.source, num_parameters,
                      sum(p.numel() * p.element_size() for p in hf.parameters()), ad.cfg.vocab_size,
                      ad.cfg.hidden_size, ad.num_heads, ad.cfg.intermediate_size)
    return Manifest(
        model=model,
        pop=PopInfo(ad.num_layers, k, list(range(k, ad.num_layers)), (ad.num_layers - k) / ad.num_layers),
        dtype=dtype, max_seq_len=job.max_seq_len, positions=_positions(ad), kv_cache=_kv_cache(ad, k, dtype),
        graphs=graphs, weights=weights, tokenizer=_tokenizer(job.loaded, job.directory), generation=Generation(),
        provenance=Provenance(), vision=_vision(ad, job.loaded.processor) if ad.image_inputs else None,
        kv_heads=None if job.heads is None else fitted_heads.manifest_section(
            job.heads, job.options.calib, job.calibration[1], num_parameters))


def verify(job, manifest):
    if job.options.skip_verify:
        job.progress("verification skipped (--skip-verify)")
        return Verification(skipped=True)
    from .verify import verify as run_verification
    report = run_verification(job, manifest)
    lines = ", ".join(f"{what} {c.max_abs:.2g} (scale {c.scale:.3g})" for what, c in report.checks.items())
    if not report.passed:
        raise PopError(f"verification failed: the exported graphs differ from the PyTorch reference beyond "
                       f"{report.tolerance} x scale: max abs differences {lines}; nothing was written")
    job.progress(f"verified: {lines} (tolerance {report.tolerance} x scale)")
    return report


def measure_memory(directory, manifest, param_bytes) -> Memory:
    """What the runtime really holds, measured in a fresh process (pop.runtime.memory), not estimated."""
    artifact_bytes = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    memory = Memory(param_bytes, artifact_bytes, manifest.weights.bytes, manifest.weights.referenced_bytes)
    if manifest.dtype == "bfloat16":  # ONNX Runtime's CPU provider has no bf16 kernels
        memory.runtime_measured, memory.why = False, "bf16 graphs do not run on the CPU runtime"
        return memory
    def run(*flags):
        out = subprocess.run([sys.executable, "-m", "pop.runtime.memory", str(directory), *flags], capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise PopError(f"the runtime could not load the fresh export: {out.stderr.strip().splitlines()[-1]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    for key, value in run().items():  # the default: weights packed for ONNX Runtime's kernels, per graph
        setattr(memory, key, value)
    if manifest.graph_format == "onnx":  # held once, as the mapped file
        memory.without_prepacking = run("--no-prepack-weights")
    return memory


def provenance(job, trace_s, started) -> Provenance:
    files = {str(f.relative_to(job.directory)): sources.sha256_file(f) for f in sorted(job.directory.rglob("*"))
             if f.is_file() and f.name != FILE}
    return Provenance(job.options.command, _versions(), int(time.time()), trace_s, files,
                      time.perf_counter() - started)


# --- manifest sections ------------------------------------------------------------------------

def _versions():
    out = {}
    for n in ("pop", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers"):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def _positions(adapter) -> Positions:
    if adapter.position_axes == 3:
        return Positions(3, "M-RoPE (t, h, w): text advances all three; an image's tokens take its grid "
                            "coordinates offset by the text before it; see pop.runtime.vision.qwen3_vl",
                         "the largest prompt position + 1, then + 1 per token, the same on all axes")
    return Positions(1, "per row, the slot: token i of a row is at position i (the graphs derive it)")


def _vision(adapter, processor) -> Vision:
    if processor is None:
        raise PopError("this VLM was loaded without its processor (preprocessor_config.json), which runtimes need")
    spec = adapter.vision_spec(processor)
    return Vision(**{**spec, "encoder": Encoder(**spec["encoder"]), "graph": "vision",
                     "merge": Merge(extra_inputs(adapter),
                                    "image_embeds rows replace the embeddings of image_token_id tokens, in reading "
                                    "order; image_index holds their flat b*T+t positions among the new tokens"),
                     "bidirectional_images": adapter.bidirectional_images})


def _tokenizer(loaded, directory: Path) -> Tokenizer:
    tok, processor = loaded.tokenizer, loaded.processor
    sub = directory / "tokenizer"
    tok.save_pretrained(sub)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    if template:
        (sub / "chat_template.jinja").write_text(template)
    if not (sub / "tokenizer.json").exists():
        raise PopError("this model's tokenizer has no fast (tokenizer.json) form, which runtimes need")
    eos = loaded.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    return Tokenizer("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", sources.bos_for(tok) is not None,
                     tok.bos_token_id, eos, tok.pad_token_id,
                     "tokenizer/chat_template.jinja" if template else None)


def _kv_cache(adapter, prefill_layers, dtype) -> KVCache:
    past, present = io_names(adapter.num_layers)
    layers = [KVLayer(l, adapter.num_kv_heads, adapter.head_dim, adapter.sliding_window(l),
                      "full" if l < prefill_layers else "kv_projection",
                      past[2 * l], past[2 * l + 1], present[2 * l], present[2 * l + 1])
              for l in range(adapter.num_layers)]
    return KVCache(dtype, ["batch", "kv_heads", "slot", "head_dim"],
                   "per row: slot i holds the row's token i; seqlens_k[row] is the slot of its last real token",
                   layers)


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
