"""Backends run the manifest's graphs; the session owns every buffer.

The whole interface is `zeros(shape, dtype)`, where the KV buffer is
allocated, and `run(graph, inputs, outputs)`: both dicts map the manifest's IO
names to arrays that the session preallocated (views into the one KV buffer
among them).  A backend binds them where they lie and writes the outputs in
place; it never allocates a tensor the session will read.  `run` returns the
graph's GPU time in ms (CUDA events), or None on the CPU.

    ort       ONNX Runtime on the CPU (the default; pip install .[cpu])
    ort-cuda  ONNX Runtime's CUDA provider (pip install .[gpu])
    trt       TensorRT engines built by pop-export --backend trt (pip install .[trt])
"""
from ..errors import PopError

BACKENDS = ("ort", "ort-cuda", "trt")


def open_backend(name, directory, manifest, threads=None, prepack=False):
    if name in ("ort", "ort-cuda"):
        try:
            from .ort import OrtBackend
        except ImportError as e:
            raise PopError(f"ONNX Runtime is not installed ({e}): pip install .[cpu], or .[gpu] for CUDA") from None
        return OrtBackend(directory, manifest, threads, prepack, device="cpu" if name == "ort" else "cuda")
    if name == "trt":
        from .trt import TrtBackend
        return TrtBackend(directory, manifest, threads, prepack)
    raise PopError(f"unknown backend {name!r}; this runtime has: {', '.join(BACKENDS)}")
