"""ONNX Runtime on the CPU, with weights held once and every tensor bound in place.

Weights: weights.bin is memory-mapped once, and each distinct tensor in it
becomes one OrtValue that both sessions receive through
SessionOptions.add_initializer, so neither session loads its own copy.
Weight prepacking is off by default for the same reason: it gives each
session a private, re-laid-out copy of every MatMul weight.  It is also ~12%
faster on gemma3-270m (README, "Memory"), so `prepack=True` offers that trade.

IO: inputs and outputs are bound by pointer to the session's preallocated
arrays (IOBinding), so the graphs read past K/V from, and write new K/V into,
the one KV buffer.
"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import PopError


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


class OrtBackend:
    name = "ort"
    device = "cpu"

    def __init__(self, directory, manifest, threads=None, prepack=False):
        directory = Path(directory)
        self.weights_file = directory / manifest["weights"]["file"]
        self._mmap = np.memmap(self.weights_file, dtype=np.uint8, mode="r")
        self._values = {}  # (offset, length, type, shape) -> OrtValue, one per distinct tensor
        self.sessions, self._bindings = {}, {}
        for graph, spec in manifest["graphs"].items():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads or 0
            opts.inter_op_num_threads = 1
            if not prepack:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            for name, location, offset, length, elem, shape in _external_initializers(directory / spec["file"]):
                if location != manifest["weights"]["file"]:
                    raise PopError(f"{spec['file']} points at {location}, not the manifest's weights file")
                opts.add_initializer(name, self._value(offset, length, elem, shape))
            try:
                sess = ort.InferenceSession(str(directory / spec["file"]), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types for corrupt graphs
                raise PopError(f"{spec['file']} cannot be loaded by ONNX Runtime: {str(e).splitlines()[0]}") from None
            if sess.get_providers()[0] != "CPUExecutionProvider":
                raise PopError(f"ONNX Runtime runs {graph} on {sess.get_providers()}, expected the CPU")
            self.sessions[graph] = sess
            self._bindings[graph] = sess.io_binding()

    def _value(self, offset, length, elem, shape):
        key = (offset, length, elem, shape)
        if key not in self._values:
            if offset + length > len(self._mmap):
                raise PopError(f"{self.weights_file.name} is shorter than the graphs expect: corrupt artifacts")
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            raw = self._mmap[offset:offset + length]
            if elem == onnx.TensorProto.BFLOAT16:
                array = raw.view(np.uint16).reshape(shape)
            else:
                array = raw.view(np_dtype).reshape(shape)
            self._values[key] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, elem)
        return self._values[key]

    def run(self, graph, inputs, outputs):
        io = self._bindings[graph]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, array in inputs.items():
            assert array.flags.c_contiguous, name  # a strided view would bind the wrong bytes
            io.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        for name, array in outputs.items():
            assert array.flags.c_contiguous, name
            io.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        self.sessions[graph].run_with_iobinding(io)
