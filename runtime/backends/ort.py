"""ONNX Runtime, on the CPU or CUDA, with weights held once and every tensor bound in place.

Weights: weights.bin is memory-mapped once, and each distinct tensor in it
becomes one OrtValue that both sessions receive through
SessionOptions.add_initializer, so neither session loads its own copy.  With
prepacking (the default), ONNX Runtime re-lays every matrix for its kernels,
one copy per session, and the mapped pages are given back: the resident set
holds the packed copies.  Without (prepack=False), the mapped file is the one
copy both graphs read; MLAS then packs each matrix at every call, which for a
decode step of more than one row costs about twice the time (README, "Memory").

IO: inputs and outputs are bound by pointer to the session's preallocated
arrays (IOBinding), so the graphs read past K/V from, and write new K/V into,
the one KV buffer.

CUDA (`ort-cuda`, needs onnxruntime-gpu and cuda-python: pip install .[gpu]):
the KV buffer is device memory (backends/cuda.py) bound by address, so the
cache never leaves the GPU; token ids, positions and the mask are bound from
the host and the logits to the host, and ONNX Runtime copies those few bytes.
The weights become CUDA OrtValues once, which both sessions use in place
(AddInitializer keeps a user's initializer where it lies when that is where
the graph plans it).  Both sessions run on one stream of ours
(user_compute_stream), so CUDA events on it time them.  onnxruntime-gpu falls
back to the CPU, with only a warning, when it cannot load CUDA or cuDNN, so
the providers each session really got are checked.
"""
import mmap
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import PopError
from ..manifest import np_dtype


def _external_initializers(model_path: Path):
    """(name, offset, length, onnx elem type, shape) of each initializer kept in weights.bin."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise PopError(f"{model_path.name} cannot be loaded: not a valid ONNX file ({type(e).__name__})") from None
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        yield t.name, info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type, tuple(t.dims)


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def require_provider(session, graph, provider):
    """onnxruntime-gpu hands a graph to the CPU, with only a warning, when CUDA or
    cuDNN cannot be loaded; what the session got is the only reliable answer."""
    got = session.get_providers()
    if got[0] != provider:
        hint = (" (onnxruntime-gpu is not installed, or cannot load the CUDA/cuDNN libraries: pip install .[gpu], "
                "and never onnxruntime beside it)" if provider == "CUDAExecutionProvider" else "")
        raise PopError(f"ONNX Runtime runs the {graph} graph on {', '.join(got)}, not {provider}{hint}")


def _installed(distribution):
    try:
        metadata.version(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def element_type(dtype):
    """What IOBinding takes: a numpy type, or ONNX's code where numpy has none (bfloat16)."""
    return onnx.TensorProto.BFLOAT16 if dtype == np_dtype("bfloat16") else dtype


class OrtBackend:
    def __init__(self, directory, manifest, threads=None, prepack=True, device="cpu"):
        directory = Path(directory)
        if device == "cpu" and manifest.dtype == "bfloat16":
            raise PopError("bf16 artifacts run on the GPU backends (--backend ort-cuda or trt): "
                           "ONNX Runtime's CPU provider has no bf16 kernels")
        self.device = device
        self.name = "ort" if device == "cpu" else "ort-cuda"
        self.weights_file = directory / manifest.weights.file
        self._mmap = np.memmap(self.weights_file, dtype=np.uint8, mode="r")
        self._values = {}  # (offset, length, type, shape) -> OrtValue, one per distinct tensor
        self.sessions, self._bindings = {}, {}
        if device == "cuda":
            from . import cuda
            if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
                raise PopError("both onnxruntime and onnxruntime-gpu are installed, and they provide the same module: "
                               "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install .[gpu]")
            cuda.runtime()  # a clear message when cuda-python or the GPU is missing, before any session
            self.stream = cuda.Stream()
            self.zeros = cuda.zeros
            provider = "CUDAExecutionProvider"
            providers = [(provider, {"device_id": 0, "user_compute_stream": str(self.stream.ptr)}),
                         "CPUExecutionProvider"]  # the CPU takes what CUDA has no kernel for
        else:
            self.zeros = np.zeros
            provider = "CPUExecutionProvider"
            providers = [provider]
        for graph, spec in manifest.graphs.items():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads or 0
            opts.inter_op_num_threads = 1
            if graph != "decode":
                # Each session has its own threads, which spin a while after a run for the next op.  After
                # a prefill they would spin while the boundary step's threads wake up, fighting over the
                # cores (the boundary step took twice a decode step on 2 cores).  The big graphs lose
                # nothing by sleeping at once; decode, whose ops are short, keeps spinning.
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if not prepack:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            for name, location, offset, length, elem, shape in _external_initializers(directory / spec.file):
                if location != manifest.weights.file:
                    raise PopError(f"{spec.file} points at {location}, not the manifest's weights file")
                opts.add_initializer(name, self._value(offset, length, elem, shape))
            try:
                sess = ort.InferenceSession(str(directory / spec.file), opts, providers=providers)
            except Exception as e:  # ORT raises its own exception types for corrupt graphs
                raise PopError(f"{spec.file} cannot be loaded by ONNX Runtime: {str(e).splitlines()[0]}") from None
            require_provider(sess, graph, provider)
            self.sessions[graph] = sess
            self._bindings[graph] = sess.io_binding()
        if prepack and device == "cpu":
            # The matrix products now read their own re-laid-out copies; the mapped file is read only
            # where nothing packed it (embedding rows, norms).  Give its pages back: they come back
            # from the page cache when touched, and the resident set keeps the packed copies only.
            self._mmap._mmap.madvise(mmap.MADV_DONTNEED)

    def _value(self, offset, length, elem, shape):
        key = (offset, length, elem, shape)
        if key not in self._values:
            if offset + length > len(self._mmap):
                raise PopError(f"{self.weights_file.name} is shorter than the graphs expect: corrupt artifacts")
            raw = self._mmap[offset:offset + length]
            if elem == onnx.TensorProto.BFLOAT16:
                array = raw.view(np.uint16).reshape(shape)
            else:
                array = raw.view(onnx.helper.tensor_dtype_to_np_dtype(elem)).reshape(shape)
            if self.device == "cuda" and elem in FLOAT_TYPES:
                # one device copy that both sessions use; integer constants stay on the host,
                # where ONNX Runtime plans the shape arithmetic that reads them
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, elem, "cuda", 0)
                value.update_inplace(np.ascontiguousarray(array))
            else:
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, elem)
            self._values[key] = value
        return self._values[key]

    def run(self, graph, inputs, outputs):
        """Runs one graph over the bound arrays; returns its GPU time in ms (CUDA events), or None on the CPU."""
        io = self._bindings[graph]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, array in inputs.items():
            io.bind_input(name, _device(array), 0, element_type(array.dtype), array.shape, _address(array, name))
        for name, array in outputs.items():
            io.bind_output(name, _device(array), 0, element_type(array.dtype), array.shape, _address(array, name))
        if self.device == "cpu":
            self.sessions[graph].run_with_iobinding(io)
            return None
        self.stream.start()
        self.sessions[graph].run_with_iobinding(io)
        return self.stream.stop()


def _device(array):
    """numpy arrays are host memory; the KV buffer's device views (backends/cuda.py) are not."""
    return "cpu" if isinstance(array, np.ndarray) else "cuda"


def _address(array, name):
    if isinstance(array, np.ndarray):
        assert array.flags.c_contiguous, name  # a strided view would bind the wrong bytes
        return array.ctypes.data
    return array.ptr
