"""TensorRT engines on one CUDA stream, over the one device KV buffer.

Written against NVIDIA's documented Python API (TensorRT 10+): a Runtime
deserializes each graph's engine, tensors are bound with set_tensor_address and
run with execute_async_v3 on the session's stream.  The past K/V inputs are the
KV buffer's blocks (backends/cuda.py), and the new tokens' K/V are placed into
it on the device (cuda.place), so the cache stays on the GPU; the host tensors
(token ids, lengths) go through small staging buffers and the logits come back
to pinned host memory.

Profiles: an engine has one context per optimization profile (the decode engine
two: one new token, a whole prompt; exporter/formats/tensorrt.py), and each call
runs on the context whose profile fits it best (`choose`).  All the contexts
share one activation pool of ours (USER_MANAGED): the graphs run one after the
other on one stream, so the largest need is the only one.  A context keeps the
addresses and shapes it was last given, and only what changed is set again: a
decode step re-binds the token ids, lengths and logits, not the 2L past blocks.

A view is bound where it lies only when its address is 256-byte aligned, which
is what cudaMalloc returns and what TensorRT's own allocations keep; otherwise
it goes through a staging buffer and a device-to-device copy.  The KV blocks are
aligned when kv_heads x max_seq_len x head_dim x dtype size is a multiple of 256
bytes (any max_seq_len that is a multiple of 4 for the models we know), and the
runtime's staging for placed outputs is carved at 256-byte boundaries.

An engine is tied to the TensorRT version and GPU that built it; the manifest
records both and `check_engine` refuses a mismatch before deserializing.
Each engine holds its own weights, so the prefill and decode engines keep two
copies of the shared layers in device memory (ONNX Runtime CUDA keeps one).
"""
from pathlib import Path

import numpy as np

from ..errors import PopError
from . import BackendOptions, cuda

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


def choose(profiles, shapes, names):
    """The index of the profile to run a call on: every input axis within [min, max], and of those the
    one whose opt sequence length is nearest the call's (a one-token step runs on the step profile, a
    prompt on the prompt profile).  shapes: {input: shape}; names: {input: the manifest's axis names}."""
    best = None
    for i, profile in enumerate(profiles):
        axes = {}
        for name, shape in shapes.items():
            for axis, size in zip(names[name], shape):
                if isinstance(axis, str) and axis in profile:
                    axes[axis] = size
        if not all(profile[a][0] <= v <= profile[a][2] for a, v in axes.items()):
            continue
        seq = axes.get("seq")
        distance = abs(np.log(max(seq, 1) / max(profile["seq"][1], 1))) if seq is not None and "seq" in profile else 0
        if best is None or distance < best[0]:
            best = (distance, i)
    return None if best is None else best[1]


class _Context:
    """One execution context (one profile) and what it was last given."""

    def __init__(self, engine, index, stream):
        import tensorrt as trt
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        self.ctx = (engine.create_execution_context(strategy.USER_MANAGED) if strategy is not None
                    else engine.create_execution_context_without_device_memory())
        if engine.num_optimization_profiles > 1:
            self.ctx.set_optimization_profile_async(index, stream.ptr)
        self.addresses, self.shapes = {}, {}

    def shape(self, name, shape):
        if self.shapes.get(name) != shape:
            if not self.ctx.set_input_shape(name, shape):
                return False
            self.shapes[name] = shape
        return True

    def address(self, name, ptr):
        if self.addresses.get(name) != ptr:
            if not self.ctx.set_tensor_address(name, ptr):
                return False
            self.addresses[name] = ptr
        return True


class TrtBackend:
    name = "trt"
    device = "cuda"

    def __init__(self, directory, manifest, options: BackendOptions = BackendOptions()):
        directory = Path(directory)
        engines = manifest.engines
        graphs = manifest.graphs_for(options.modes)
        missing = [g for g in graphs if g not in engines]
        if missing:
            raise PopError(f"these artifacts have no TensorRT engine for {', '.join(missing)}: "
                           f"export with --format trt on a machine with an NVIDIA GPU")
        trt = _tensorrt()
        cuda.runtime()
        gpu = cuda.device_info()
        for graph in graphs:
            check_engine(graph, engines[graph], trt.__version__, gpu)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = cuda.Stream()
        self.staging = cuda.Staging()
        self.zeros = cuda.zeros
        self._pinned = cuda.PinnedHost()
        self.host_zeros = self._pinned.zeros
        self.place = lambda block, new, start: cuda.place(self.stream.copy2d, block, new, start)
        self.engines, self.contexts, self.profiles, self._axes = {}, {}, {}, {}
        for graph in graphs:
            spec = manifest.graphs[graph]
            path = directory / engines[graph].file
            if not path.is_file():
                raise PopError(f"{path} is missing: the artifact folder is incomplete")
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise PopError(f"TensorRT could not deserialize {path.name}: corrupt, or built for another version")
            self.engines[graph] = engine
            self.profiles[graph] = engines[graph].profiles
            self.contexts[graph] = [_Context(engine, i, self.stream) for i in range(len(engines[graph].profiles))]
            self._axes[graph] = {t.name: t.shape for t in [*spec.inputs, *spec.outputs]}
        # one activation pool for every context: they never run at the same time
        need = max(getattr(e, "device_memory_size_v2", None) or e.device_memory_size for e in self.engines.values())
        self._activations = cuda.Allocation(need)
        for contexts in self.contexts.values():
            for c in contexts:
                if hasattr(c.ctx, "set_device_memory"):
                    c.ctx.set_device_memory(self._activations.ptr, self._activations.nbytes)
                else:  # TensorRT before 10.1
                    c.ctx.device_memory = self._activations.ptr
        self.stream.sync()  # the profiles' selection was enqueued on the stream
        self.max_batch = self.profiles["decode"][0].get("batch", [None, None, None])[2]

    def _bind(self, context, name, array, graph, before, after, is_input):
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
        if not context.address(name, ptr):
            raise PopError(f"TensorRT refused the address of {name} in the {graph} engine")

    def run(self, graph, inputs, outputs):
        """Runs one engine; returns its GPU time in ms, from CUDA events on the session's stream."""
        shapes = {name: tuple(array.shape) for name, array in inputs.items()}
        index = choose(self.profiles[graph], shapes, self._axes[graph])
        if index is None:
            batch = f" (largest batch: {self.max_batch}; re-export with a larger --max-batch)" if self.max_batch else ""
            raise PopError(f"inputs of shapes {shapes} are outside every optimization profile of the {graph} "
                           f"engine{batch}")
        context = self.contexts[graph][index]
        before, after = [], []
        self.stream.start()  # the host tensors' copies, enqueued while binding, count too
        for name, array in inputs.items():
            if not context.shape(name, shapes[name]):
                raise PopError(f"{name} of shape {shapes[name]} is outside the {graph} engine's optimization profile")
            self._bind(context, name, array, graph, before, after, True)
        for name, array in outputs.items():
            self._bind(context, name, array, graph, before, after, False)
        for copy in before:
            copy()
        if not context.ctx.execute_async_v3(self.stream.ptr):
            raise PopError(f"TensorRT failed to run the {graph} engine (see its log above)")
        for copy in after:
            copy()
        return self.stream.stop()
