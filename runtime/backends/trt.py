"""TensorRT engines on one CUDA stream, over the one device KV buffer.

Written against NVIDIA's documented Python API (TensorRT 10+): a Runtime
deserializes each graph's engine, one execution context per engine, tensors
bound with set_tensor_address and run with execute_async_v3 on the session's
stream.  The past K/V inputs and the present K/V outputs are addresses inside
the KV buffer (backends/cuda.py), so the cache stays on the GPU; the host
tensors (token ids, positions, the mask, logits) go through small staging
buffers.  The stream is waited on once per graph, when its CUDA events are read.

A view is bound where it lies only when its address is 256-byte aligned, which
is what cudaMalloc returns and what TensorRT's own allocations keep; otherwise
it goes through a staging buffer and a device-to-device copy.  For models whose
kv_heads x head_dim x dtype size is a multiple of 256 bytes (Llama-3.1-8B,
Qwen3-VL-8B, Gemma-3-12B) every block is aligned; the tiny models are not.

An engine is tied to the TensorRT version and GPU that built it; the manifest
records both and `check_engine` refuses a mismatch before deserializing.
Each engine holds its own weights, so the prefill and decode engines keep two
copies of the shared layers in device memory (ONNX Runtime CUDA keeps one).
"""
from pathlib import Path

import numpy as np

from ..errors import PopError
from . import cuda

ALIGNMENT = 256


def check_engine(graph, entry, tensorrt_version, gpu):
    """PopError unless the engine recorded in the manifest fits this TensorRT and GPU."""
    if entry.tensorrt != tensorrt_version:
        raise PopError(f"{entry.file} was built by TensorRT {entry.tensorrt}; this machine has "
                       f"TensorRT {tensorrt_version}, which cannot load it: rebuild with pop-export --format trt here")
    built = entry.gpu or {}
    if (built.get("name"), built.get("compute_capability")) != (gpu["name"], gpu["compute_capability"]):
        raise PopError(f"{entry.file} was built for {built.get('name')} (compute capability "
                       f"{built.get('compute_capability')}); this GPU is {gpu['name']} ({gpu['compute_capability']}): "
                       f"rebuild with pop-export --format trt here")


def _tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the wheel's missing libraries
        raise PopError(f"the trt backend needs TensorRT 10+ (pip install .[trt] on a machine with an NVIDIA GPU); "
                       f"it cannot be imported here: {type(e).__name__}: {e}") from None
    return trt


class TrtBackend:
    name = "trt"
    device = "cuda"

    def __init__(self, directory, manifest, threads=None, prepack=True):
        directory = Path(directory)
        engines = manifest.engines
        missing = [g for g in manifest.graphs if g not in engines]
        if missing:
            raise PopError(f"these artifacts have no TensorRT engine for {', '.join(missing)}: "
                           f"export with --format trt on a machine with an NVIDIA GPU")
        trt = _tensorrt()
        cuda.runtime()
        gpu = cuda.device_info()
        for graph in manifest.graphs:
            check_engine(graph, engines[graph], trt.__version__, gpu)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = cuda.Stream()
        self.staging = cuda.Staging()
        self.zeros = cuda.zeros
        self.engines, self.contexts = {}, {}
        for graph in manifest.graphs:
            path = directory / engines[graph].file
            if not path.is_file():
                raise PopError(f"{path} is missing: the artifact folder is incomplete")
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise PopError(f"TensorRT could not deserialize {path.name}: corrupt, or built for another version")
            self.engines[graph], self.contexts[graph] = engine, engine.create_execution_context()
        self.max_batch = engines["decode"].profile.get("batch", [None, None, None])[2]

    def _bind(self, ctx, name, array, graph, before, after, is_input):
        """Sets name's address; host arrays and unaligned views go through staging."""
        if isinstance(array, np.ndarray):
            ptr = self.staging.get((graph, name), array.nbytes)
            if is_input:
                self.stream.h2d(ptr, array)
            else:
                after.append(lambda: self.stream.d2h(array, ptr))
        elif array.ptr % ALIGNMENT:
            ptr = self.staging.get((graph, name), array.nbytes)
            if is_input:
                before.append(lambda: self.stream.d2d(ptr, array.ptr, array.nbytes))
            else:
                after.append(lambda: self.stream.d2d(array.ptr, ptr, array.nbytes))
        else:
            ptr = array.ptr
        if not ctx.set_tensor_address(name, ptr):
            raise PopError(f"TensorRT refused the address of {name} in the {graph} engine")

    def run(self, graph, inputs, outputs):
        """Runs one engine; returns its GPU time in ms, from CUDA events on the session's stream."""
        ctx = self.contexts[graph]
        before, after = [], []
        self.stream.start()  # the host tensors' copies, enqueued while binding, count too
        for name, array in inputs.items():
            if not ctx.set_input_shape(name, tuple(array.shape)):
                batch = f" (largest batch: {self.max_batch}; re-export with a larger --max-batch)" if self.max_batch else ""
                raise PopError(f"{name} of shape {tuple(array.shape)} is outside the {graph} engine's optimization "
                               f"profile{batch}")
            self._bind(ctx, name, array, graph, before, after, True)
        for name, array in outputs.items():
            self._bind(ctx, name, array, graph, before, after, False)
        for copy in before:
            copy()
        if not ctx.execute_async_v3(self.stream.ptr):
            raise PopError(f"TensorRT failed to run the {graph} engine (see its log above)")
        for copy in after:
            copy()
        return self.stream.stop()
