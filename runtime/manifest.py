"""pop_manifest.json: the one contract between the exporter and every runtime.

A typed tree of dataclasses, written by pop.exporter and read by the runtime,
pop-bench and pop-eval; the C++ runtime reads the same JSON.  `Manifest.load`
is the one place that checks a file (format, schema version, required fields,
types, the files it names); nothing else reads the JSON.  The schema is
documented in docs/MANIFEST.md.  Bump SCHEMA_VERSION on any change that an
existing runtime would misread.

Serialisation is generic: a dataclass is a JSON object whose keys are its
fields, in order; a field whose default is None and whose value is None is left
out, so optional sections (vision, kv_heads, ...) appear only when present.
"""
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PopError

FILE = "pop_manifest.json"
FORMAT = "pop-manifest"
# 2: optional "vision" section and a vision graph; tokenizer.chat_template
# 3: a graph may be an AOTInductor package (format "aoti", its device, weights.tensors), which a
#    version-2 runtime would hand to ONNX Runtime
# 4: per-row cache lengths (seqlens_k, total_sequence_length) instead of attention_mask, the cache
#    [batch, kv_heads, slot, head_dim] per layer, graph forms (fused, plain) and outputs written in
#    place (alias): an older runtime would bind every input wrongly
# 5: a fused decode graph with sliding-window layers takes window_seqlens_k and
#    window_total_sequence_length, which a version-4 runtime would not feed.  Version 4 still reads:
#    its graphs are version 5's without those inputs.
# 6: weights.quantization.derived: int8 matrices a graph reads that the runtime derives at load from the
#    stored blocks (--weights-compute int8-gemm), which a version-5 runtime would look for in a file.
#    Versions 4 and 5 still read: they have none.
SCHEMA_VERSION = 6
READABLE = (4, 5, 6)


def np_dtype(name):
    """The numpy dtype of a manifest dtype name; bfloat16 comes from ml_dtypes (an onnx dependency)."""
    if str(name) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# --- the tree ---------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    name: str
    architecture: str
    source: dict  # where the weights came from (preset, path, GGUF sha256, cached conversion): provenance
    num_parameters: int
    parameter_bytes: int
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int | None = None  # the MLP width, for pop-bench's cost model


@dataclass
class PopInfo:
    num_layers: int  # L
    prefill_layers: int  # K: the layers the prefill graph runs
    pruned_layers: list
    prune_ratio: float


@dataclass
class Positions:
    axes: int = 1  # 3 for M-RoPE: position_ids is then [3, batch, seq]
    rule: str = ""
    decode: str | None = None


@dataclass
class KVLayer:
    index: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None
    prefill: str  # "full" or "kv_projection"
    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass
class KVCache:
    dtype: str
    layout: list
    slot_semantics: str
    layers: list[KVLayer]


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list  # ints, or symbolic axes by name ("batch", "seq", "image_tokens", ...)
    alias: str | None = None  # outputs only: the input whose buffer the graph writes this output into


@dataclass
class Graph:
    file: str
    format: str = "onnx"  # or "aoti"
    form: str = "plain"  # "fused": ONNX Runtime's contrib operators; "plain": standard ones (exporter/ops.py)
    opset: int | None = None  # ONNX only
    device: str | None = None  # AOTI only: a package runs on the device it was compiled for
    torch: str | None = None  # AOTI only: the torch that compiled it
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    token_input: str = "input_ids"
    role: str = ""

    def output(self, name) -> TensorSpec:
        return next(o for o in self.outputs if o.name == name)

    def input(self, name) -> TensorSpec:
        return next(i for i in self.inputs if i.name == name)


@dataclass
class WeightTensor:
    name: str
    offset: int
    bytes: int
    dtype: str
    shape: list


@dataclass
class DerivedTensor:
    """An int8 matrix [K, N] and its per-column scale [N], graph initializers at the external data location
    "derived", which the runtime computes at load from a MatMulNBits weight stored in the weights file: its
    codes, scales (float32) and zero points (None: symmetric) at these byte offsets, their sizes following
    from k, n and the quantization's bits and block size (runtime/backends/derived.py)."""
    weight: str  # the int8 [K, N] initializer's name
    scale: str  # the float32 [N] initializer's name
    k: int
    n: int
    codes_offset: int
    scales_offset: int
    zero_points_offset: int | None = None
    graph: str = "prefill"  # the graph that reads it (a runtime hands each session its own)


@dataclass
class Quantization:
    """Weight-only block quantization of the text graphs' matrices (exporter/quantize.py)."""
    scheme: str  # "int8" or "int4"
    bits: int
    block_size: int  # values per scale, along the input dimension
    symmetric: bool  # no zero-point tensors: the zero point is 2^(bits-1); else one per block
    accuracy_level: dict  # graph -> MatMulNBits' compute precision (1: fp32, 4: int8 activations)
    operators: dict  # graph -> {"MatMulNBits": n, "GatherBlockQuantized": n}
    embedding: str  # "quantized, shared with the output matrix" or "float32"
    # where a graph is at level 4: each check's max abs difference from the reference / its scale (the
    # graphs were verified at level 1 first)
    int8_compute_error: dict | None = None
    output_matrix: str = "quantized"  # or "float32" (--keep-embedding; a tied embedding with it)
    # the accuracy_level at which the runtime runs the decode graph's calls of more than one token (full
    # mode's prompt), in a second session of it; None: the graph's own level for every call
    prompt_accuracy_level: int | None = None
    # --weights-compute int8-gemm: the graphs whose products run as integer GEMMs (per-token int8 activations,
    # per-channel int8 weights derived at load) and the tensors derived for them
    integer_graphs: list | None = None
    derived: list[DerivedTensor] | None = None


@dataclass
class Weights:
    file: str
    bytes: int
    unique_tensors: int
    referenced_bytes: int
    stored_bytes: int
    tensors: list[WeightTensor] | None = None  # AOTI: where each tensor lies, by state-dict name
    quantization: Quantization | None = None  # absent: weights in the manifest's dtype


@dataclass
class Tokenizer:
    file: str
    config: str
    add_bos: bool
    bos_id: int | None
    eos_ids: list
    pad_id: int | None
    chat_template: str | None = None


@dataclass
class Generation:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Engine:
    file: str
    tensorrt: str
    gpu: dict
    profiles: list  # optimization profiles, each {axis: [min, opt, max]}; the runtime picks one per call
    tf32: bool = False  # whether fp32 layers could run in TF32 (off: true fp32)


@dataclass
class Merge:
    inputs: list  # the graphs' extra inputs after attention_mask, in order
    rule: str


@dataclass
class Encoder:
    """The vision tower's matmul shapes, for pop-bench's cost model."""
    layers: int
    hidden: int
    intermediate: int
    patch_dim: int
    merge: int  # patches per LLM token
    mergers: int
    out_hidden: int
    patches_per_image: int | None = None  # fixed-size towers (Gemma-3)
    tokens_per_image: int | None = None


@dataclass
class Vision:
    """What a runtime needs to turn images into the vision graph's inputs.  Keys a family
    does not use are absent; runtime/vision/<family>.py lists the ones it reads."""
    family: str
    image_token: str
    image_token_id: int
    image_mean: list
    image_std: list
    rescale_factor: float
    resample: str
    encoder: Encoder
    merge: Merge
    graph: str = "vision"
    bidirectional_images: bool = False
    # Qwen3-VL
    vision_start_token_id: int | None = None
    patch_size: int | None = None
    temporal_patch_size: int | None = None
    merge_size: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    num_grid_per_side: int | None = None
    deepstack_layers: int | None = None
    # Gemma-3
    full_image_sequence: str | None = None
    tokens_per_image: int | None = None
    image_size: int | None = None


@dataclass
class KVHeads:
    kind: str  # "fitted"
    graph: str
    method: str
    calibration: dict
    fitted_parameters: int
    fitted_parameters_share_of_model: float
    layers: list  # per pruned layer: index, and a report per kind


@dataclass
class Check:
    max_abs: float
    scale: float
    argmax_equal: bool | None = None


@dataclass
class Verification:
    """The export's comparison with the PyTorch reference.  In JSON the checks are flat keys
    (`<what>_max_abs`, `<what>_scale`, `<what>_argmax_equal`) beside the facts of the test."""
    skipped: bool = False
    tolerance: float | None = None
    passed: bool | None = None
    checks: dict[str, Check] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)  # batch, prompt_lengths, image_tokens

    def to_json(self):
        if self.skipped:
            return {"skipped": True}
        out = {"tolerance": self.tolerance, **self.facts}
        for what, c in self.checks.items():
            out[f"{what}_max_abs"], out[f"{what}_scale"] = c.max_abs, c.scale
            if c.argmax_equal is not None:
                out[f"{what}_argmax_equal"] = c.argmax_equal
        out["passed"] = self.passed
        return out

    @classmethod
    def from_json(cls, data, where):
        if not isinstance(data, dict):
            raise PopError(f"{where}: verification should be an object")
        if data.get("skipped"):
            return cls(skipped=True)
        checks, facts = {}, {}
        for key, value in data.items():
            if key.endswith("_max_abs"):
                what = key[:-len("_max_abs")]
                checks[what] = Check(value, data.get(f"{what}_scale", 0.0), data.get(f"{what}_argmax_equal"))
            elif not key.endswith(("_scale", "_argmax_equal")) and key not in ("tolerance", "passed"):
                facts[key] = value
        return cls(False, data.get("tolerance"), data.get("passed"), checks, facts)


@dataclass
class Memory:
    parameter_bytes: int
    artifact_bytes: int
    weights_file_bytes: int
    weights_if_stored_per_graph_bytes: int
    # what the runtime holds, measured in a fresh process (pop.runtime.memory), or why not
    runtime_measured: bool | None = None
    why: str | None = None
    baseline_rss_bytes: int | None = None
    after_load_rss_bytes: int | None = None
    after_generate_rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    session_rss_bytes: int | None = None
    session_file_backed_rss_bytes: int | None = None
    session_anonymous_rss_bytes: int | None = None
    kv_buffer_bytes: int | None = None
    without_prepacking: dict | None = None  # the same measured with --no-prepack-weights (ONNX)


@dataclass
class Provenance:
    command: str | None = None
    versions: dict = field(default_factory=dict)
    created_unix: int | None = None
    trace_seconds: float | None = None
    files: dict | None = None  # sha256 of every file but the manifest
    export_seconds: float | None = None


@dataclass
class Manifest:
    model: ModelInfo
    pop: PopInfo
    dtype: str  # weights and activations: float32, float16 or bfloat16
    max_seq_len: int
    kv_cache: KVCache
    graphs: dict[str, Graph]
    weights: Weights
    tokenizer: Tokenizer
    generation: Generation
    provenance: Provenance
    positions: Positions = field(default_factory=Positions)
    engines: dict[str, Engine] = field(default_factory=dict)  # TensorRT engines built beside the ONNX graphs
    vision: Vision | None = None
    kv_heads: KVHeads | None = None  # fitted KV heads; absent: each pruned layer's own W_k, W_v
    verification: Verification | None = None
    memory: Memory | None = None
    schema_version: int = SCHEMA_VERSION

    # --- what runtimes ask -------------------------------------------------------------------
    @property
    def graph_format(self) -> str:
        """"aoti" or "onnx": what every graph of these artifacts is."""
        return "aoti" if any(g.format == "aoti" for g in self.graphs.values()) else "onnx"

    @property
    def vocab_size(self) -> int:
        return int(self.graphs["decode"].output("logits").shape[-1])

    def graphs_for(self, modes) -> list:
        """The graphs a runtime opens to serve these prompt modes ("pop", "full"): decode always (every
        generated token, and POP's boundary), the prefill graph for POP, the prompt graph where there is one
        for full mode, vision where there is one.  A session for one mode leaves the other's graphs unopened,
        with the memory their sessions would hold (each ONNX Runtime session packs its own weights)."""
        wanted = {"decode", "vision"} | ({"prefill"} if "pop" in modes else set()) | (
            {"prompt"} if "full" in modes else set())
        return [g for g in self.graphs if g in wanted]

    def layer_names(self):
        """Per layer: (past_key, past_value, present_key, present_value) IO names."""
        return [(l.past_key, l.past_value, l.present_key, l.present_value) for l in self.kv_cache.layers]

    # --- files -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        body = _to_json(self)
        body.pop("schema_version")
        # key order as every version of pop has written it
        order = ("model", "pop", "dtype", "max_seq_len", "positions", "kv_cache", "graphs", "weights", "tokenizer",
                 "generation", "engines", "vision", "kv_heads", "provenance", "verification", "memory")
        return {"format": FORMAT, "schema_version": self.schema_version, **{k: body[k] for k in order if k in body}}

    def save(self, directory) -> Path:
        """Writes the manifest atomically (a reader never sees half a file)."""
        self.schema_version = SCHEMA_VERSION
        path = Path(directory) / FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, data: dict, where="manifest") -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PopError(f"{where} is not a pop manifest")
        version = data.get("schema_version")
        if version not in READABLE:
            raise PopError(f"{where} has manifest schema version {version}; this runtime reads versions "
                           f"{', '.join(map(str, READABLE))}: re-export with this version of pop")
        body = {k: v for k, v in data.items() if k != "format"}
        return _from_json(cls, body, where)

    @classmethod
    def load(cls, directory) -> "Manifest":
        """The manifest of an artifact folder, checked, and the files it names present and sized."""
        directory = Path(directory)
        path = directory / FILE
        if not directory.is_dir():
            raise PopError(f"{directory} is not a folder of pop artifacts")
        if not path.is_file():
            raise PopError(f"{path} is missing: not a complete pop export (re-run pop-export)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PopError(f"{path} is corrupt: {e}") from None
        manifest = cls.from_json(data, str(path))
        for rel in [g.file for g in manifest.graphs.values()] + [manifest.weights.file, manifest.tokenizer.file]:
            f = directory / rel
            if not f.is_file():
                raise PopError(f"{f} is missing: the artifact folder is incomplete")
        size = (directory / manifest.weights.file).stat().st_size
        if size != manifest.weights.bytes:
            raise PopError(f"{manifest.weights.file} has {size} bytes, the manifest says "
                           f"{manifest.weights.bytes}: corrupt or mismatched artifacts")
        return manifest


# --- generic (de)serialisation ------------------------------------------------------------------

def _to_json(value):
    if hasattr(value, "to_json") and not isinstance(value, Manifest):
        return value.to_json()
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and f.default is None:
                continue
            out[f.name] = _to_json(v)
        return out
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


_SIMPLE = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}


def _from_json(tp, data, where):
    """data (parsed JSON) as type tp; PopError naming the field for anything else."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(inner, data, where)
    if hasattr(tp, "from_json") and tp is not Manifest:
        return tp.from_json(data, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise PopError(f"{where} should be an object")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in dataclasses.fields(tp)}
        required = [n for n, f in known.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise PopError(f"{where} is missing fields: {', '.join(missing)}")
        return tp(**{n: _from_json(hints[n], v, f"{where}: {n}") for n, v in data.items() if n in known})
    if origin is list:
        if not isinstance(data, list):
            raise PopError(f"{where} should be a list")
        return [_from_json(args[0], v, where) for v in data]
    if origin is dict:
        if not isinstance(data, dict):
            raise PopError(f"{where} should be an object")
        return {k: _from_json(args[1], v, f"{where}.{k}") for k, v in data.items()}
    allowed = _SIMPLE.get(tp)
    if allowed and not isinstance(data, allowed):
        raise PopError(f"{where} should be {tp.__name__}, got {type(data).__name__}")
    return data
