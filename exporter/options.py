"""ExportOptions: everything a user chooses about an export, built by pop-export or by Python callers."""
import math
from dataclasses import dataclass
from pathlib import Path

from pop.runtime.errors import PopError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_MAX_SEQ_LEN = 4096
KV_HEADS = ("original", "fitted")


@dataclass
class ExportOptions:
    model: str  # a preset, a local HF folder, a .gguf file, or a hub id in the local HF cache
    out: Path | str | None = None  # default: artifacts/<model>-<format>-pop
    format: str = "onnx"  # an artifact format (exporter/formats): onnx, trt or aoti
    graph_form: str | None = None  # "fused" or "plain" (exporter/ops.py); None: the format's own
    prefill_layers: int | None = None  # K; default: prune the last third, rounded down
    prune_ratio: float | None = None
    dtype: str = "fp32"  # a key of DTYPES
    max_seq_len: int | None = None  # default: min(4096, the model's limit)
    max_batch: int = 8  # the largest batch of TensorRT profiles
    tf32: bool = False  # TensorRT engines: let fp32 layers run in TF32 (faster, about 1e-3 off)
    threads: int | None = None  # ONNX Runtime threads for verification
    skip_verify: bool = False
    kv_heads: str = "original"  # or "fitted": refit the pruned layers' K/V matrices on `calib`
    calib: Path | str | None = None
    calib_tokens: int | None = None
    ridge: str | float = "auto"
    guard: str = "samples"  # fitted heads: "samples", "off" or a text file (exporter/fitted_heads.py)
    weights: str = "fp32"  # or "int8", "int4": weight-only block quantization (exporter/quantize.py)
    weights_block: int | None = None  # values per scale; None: quantize.DEFAULT_BLOCK for the bits
    # "fp32", "int8" or "int8-decode": where MatMulNBits takes int8 activations; None: the faster one as
    # measured for the bits (quantize.default_compute)
    weights_compute: str | None = None
    weights_asymmetric: bool | None = None  # a zero point per block; None: quantize.DEFAULT_ASYMMETRIC for the bits
    keep_embedding: bool = False  # the output matrix (and a tied embedding) stays in float32
    command: str | None = None  # as typed, for the manifest's provenance

    def check(self):
        """One-line errors for everything that can be judged before a model loads.
        Returns the calibration text and its sha256 for fitted heads, else None."""
        from . import fitted_heads
        from .formats import format_for
        calib = fitted_heads.check_options(self.kv_heads, self.calib, self.calib_tokens, self.ridge, self.guard)
        fmt = format_for(self.format)
        if self.graph_form is not None and self.graph_form not in fmt.forms:
            raise PopError(f"--format {self.format} writes the {' or '.join(fmt.forms)} graph form, not "
                           f"{self.graph_form}" + (": TensorRT's parser knows no ONNX Runtime contrib operator"
                                                   if self.format == "trt" else ""))
        if self.dtype not in DTYPES:
            raise PopError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.scheme() is None:
            extra = [flag for flag, on in (("--weights-compute", self.weights_compute not in (None, "fp32")),
                                           ("--weights-asymmetric", self.weights_asymmetric),
                                           ("--keep-embedding", self.keep_embedding)) if on]
            if extra:
                raise PopError(f"{extra[0]} is for quantized weights: add --weights int8 or int4")
        else:
            if self.format != "onnx" or (self.graph_form or fmt.default_form) != "fused":
                raise PopError(f"--weights {self.weights} needs ONNX Runtime's MatMulNBits: --format onnx with the "
                               f"fused graph form, not --format {self.format}"
                               + (f" --graph-form {self.graph_form}" if self.graph_form else ""))
            if self.dtype == "bf16":
                raise PopError(f"--weights {self.weights} takes --dtype fp32 or fp16 (ONNX Runtime's MatMulNBits "
                               f"has no bf16 scales on the CPU, where the export is verified); not --dtype bf16")
            if self.dtype == "fp16" and self.weights_compute not in (None, "fp32"):
                raise PopError(f"--weights-compute {self.weights_compute} is for fp32 exports on the CPU; "
                               f"fp16 graphs (for the GPU) compute in fp16")
        if self.prefill_layers is not None and self.prune_ratio is not None:
            raise PopError("give --prefill-layers or --prune-ratio, not both")
        # ONNX Runtime's CPU provider has no bf16 kernels, so such graphs can only be
        # checked where a GPU backend runs them.
        if self.dtype == "bf16" and not self.skip_verify:
            raise PopError("bf16 graphs cannot run on ONNX Runtime's CPU provider, so they cannot be verified here; "
                           "use fp32 or fp16, or add --skip-verify to write them for a GPU backend")
        return calib

    def scheme(self):
        """The quantization scheme of --weights and its options (exporter/quantize.py), or None for fp32."""
        from .quantize import DEFAULT_ASYMMETRIC, DEFAULT_BLOCK, default_compute, scheme_for
        dtype = DTYPES.get(self.dtype, "float32")
        compute = self.weights_compute or default_compute(self.weights, dtype)
        block = DEFAULT_BLOCK.get(self.weights, 32) if self.weights_block is None else self.weights_block
        asymmetric = DEFAULT_ASYMMETRIC.get(self.weights, False) if self.weights_asymmetric is None \
            else self.weights_asymmetric
        return scheme_for(self.weights, block, compute, not asymmetric, self.keep_embedding, dtype)

    @property
    def torch_dtype(self) -> str:
        return DTYPES[self.dtype]


def prefill_layers_for(num_layers, prefill_layers=None, prune_ratio=None):
    """K, the layers prefill runs.  The default prunes the last third, rounded
    down as the paper does (Llama-3.1-8B: 10 of 32 pruned, K = 22)."""
    if prefill_layers is not None and prune_ratio is not None:
        raise PopError("give --prefill-layers or --prune-ratio, not both")
    if prefill_layers is None:
        ratio = 1 / 3 if prune_ratio is None else prune_ratio
        if not 0 <= ratio < 1:
            raise PopError(f"--prune-ratio must be in [0, 1), got {ratio}")
        prefill_layers = num_layers - math.floor(ratio * num_layers + 1e-9)
    if not 1 <= prefill_layers <= num_layers:
        raise PopError(f"--prefill-layers must be in 1..{num_layers} for this model, got {prefill_layers}")
    return prefill_layers
