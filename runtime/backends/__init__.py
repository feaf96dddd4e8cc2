"""Backends run the manifest's graphs; the session owns every buffer.

The whole interface is `zeros(shape, dtype)`, where the KV buffer is
allocated, and `run(graph, inputs, outputs)`: both dicts map the manifest's IO
names to arrays that the session preallocated (views into the one KV buffer
among them).  A backend binds them where they lie and writes the outputs in
place; it never allocates a tensor the session will read.  `run` returns the
graph's GPU time in ms (CUDA events), or None on the CPU.

    ort       ONNX Runtime on the CPU (the default; pip install .[cpu])
    ort-cuda  ONNX Runtime's CUDA provider (pip install .[gpu])
    trt       TensorRT engines built by pop-export --format trt (pip install .[trt])
    aoti      AOTInductor packages built by pop-export --format aoti (torch only; CPU or CUDA,
              whichever they were compiled for)

None picks the artifacts' own: aoti for AOTInductor packages, ort for ONNX graphs.

Optional: `place(block, new, start)` where the KV buffer is device memory (the
runtime's own placement indexes host arrays), and `host_zeros(shape, dtype)`
for host arrays the device writes every step (the GPU backends' pinned memory), and `prompt_chunk`, the
tokens per call in which the session reads a prompt where that measured faster than one call (None: one call).
"""
from dataclasses import dataclass

from ..errors import PopError

BACKENDS = ("ort", "ort-cuda", "trt", "aoti")


@dataclass(frozen=True)
class BackendOptions:
    """How a backend runs the graphs; each backend reads what concerns it."""
    threads: int | None = None  # intra-op threads on the CPU (None: the library's default)
    prepack: bool = True  # ONNX Runtime on the CPU: re-laid-out weights per graph (faster) or held once
    tf32: bool = False  # GPU fp32 matrix products in TF32: faster, about 1e-3 relative error; off: true fp32
    modes: tuple = ("pop", "full")  # the prompt modes to serve: only their graphs are opened (Manifest.graphs_for)


def open_backend(name, directory, manifest, options: BackendOptions = BackendOptions()):
    if name is None:
        name = "aoti" if manifest.graph_format == "aoti" else "ort"
    if (name == "aoti") != (manifest.graph_format == "aoti"):
        raise PopError(f"these artifacts hold {manifest.graph_format.upper()} graphs, which --backend {name} "
                       f"cannot run: use " + ("--backend aoti" if name != "aoti" else "ort, ort-cuda or trt"))
    if name == "aoti":
        from .aoti import AotiBackend
        return AotiBackend(directory, manifest, options)
    if name in ("ort", "ort-cuda"):
        try:
            from .ort import OrtBackend
        except ImportError as e:
            raise PopError(f"ONNX Runtime is not installed ({e}): pip install .[cpu], or .[gpu] for CUDA") from None
        return OrtBackend(directory, manifest, options, device="cpu" if name == "ort" else "cuda")
    if name == "trt":
        fused = [g for g, spec in manifest.graphs.items() if spec.form == "fused"]
        if fused:
            raise PopError(f"the {', '.join(fused)} graphs use ONNX Runtime's contrib operators (the fused form), "
                           f"which TensorRT cannot run: export with --format trt")
        from .trt import TrtBackend
        return TrtBackend(directory, manifest, options)
    raise PopError(f"unknown backend {name!r}; this runtime has: {', '.join(BACKENDS)}")
