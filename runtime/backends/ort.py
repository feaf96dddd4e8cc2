"""ONNX Runtime, on the CPU or CUDA, with weights held once and every tensor bound in place.

Weights: weights.bin is memory-mapped once, and each distinct tensor in it
becomes one OrtValue that both sessions receive through
SessionOptions.add_initializer, so neither session loads its own copy.  With
prepacking (the default), ONNX Runtime re-lays every matrix for its kernels,
one copy per session, and the mapped pages are given back: the resident set
holds the packed copies.  Without (prepack=False), the mapped file is the one
copy both graphs read; MLAS then packs each matrix at every call, which for a
decode step of more than one row costs about twice the time (README, "Memory").

Quantized exports whose manifest asks for it (quantization.prompt_accuracy_level; pop-export does not) get a
second session of the decode graph with fp32 products (MatMulNBits accuracy_level 1, patched in memory;
the same weights), which runs the calls of more than one token: full mode's prompt.  Measured here
(benchmarks/quantized) it made smollm2-135m's long full-mode prompts faster and gemma3-270m's slower, so
it is not the default.  It prepacks its own copy of the matrices.

Integer products (`--weights-compute int8-gemm`): the int8 matrices that POP's prefill graph and the prompt
graph (full mode's prompt) multiply by are not in weights.bin; they are derived here at load from the 4- or
8-bit weights beside them (backends/derived.py), once for both graphs, and given to each session with
add_external_initializers; each session packs its own copy.  On the CPU only.  ONNX Runtime copies them while
it builds a session and never reads ours again (overwriting ours after changes no logit, with prepacking or
without; the int8-gemm test checks the logits at every run), so ours are held in anonymous pages of their
own, given back to the system once the sessions exist: about 110 MB less resident on both real models.

IO: inputs and outputs are bound by pointer to the session's preallocated
arrays (IOBinding), so the graphs read past K/V from, and write new K/V into,
the one KV buffer.

CUDA (`ort-cuda`, needs onnxruntime-gpu and cuda-python: pip install .[gpu]):
the KV buffer is device memory (backends/cuda.py) bound by address, so the
cache never leaves the GPU; token ids and lengths are bound from the host and
the logits to pinned host memory, and ONNX Runtime copies those few bytes.
The weights file is copied once into one device allocation of ours, and each
float tensor is a DLPack view into it (backends/dlpack.py) that both sessions
take through add_initializer, which accepts only memory ONNX Runtime does not
own.  Both sessions run on one stream of ours (user_compute_stream), so CUDA
events on it time them.  onnxruntime-gpu falls back to the CPU, with only a
warning, when it cannot load CUDA or cuDNN: its wheel's CUDA and cuDNN
libraries are loaded first (preload_dlls) and the providers each session
really got are checked.  TF32 is off unless asked for (BackendOptions.tf32).
Fused fp32 graphs are refused: ONNX Runtime's CUDA GroupQueryAttention has
float16 and bfloat16 kernels only (contrib_ops/cuda/bert/group_query_attention.cc),
and a CPU fallback would copy the cache across the bus at every step.
"""
import mmap
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import PopError
from ..manifest import np_dtype
from ..memory import anonymous_pages, lazy_zeros
from . import BackendOptions, derived, dlpack


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
DEVICE_TYPES = FLOAT_TYPES + (onnx.TensorProto.UINT8,)


PROMPT = "decode (prompt)"  # the decode graph's session for calls of several tokens, when the manifest asks


def set_accuracy_level(model: onnx.ModelProto, level):
    """Every MatMulNBits of `model` at `level` (1: fp32 products, 4: int8 activations), in place."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    return model


def _with_accuracy_level(path: Path, level):
    """The graph at `path` as bytes, every MatMulNBits at `level`; its weights stay external, the sessions
    receive them through add_initializer."""
    return set_accuracy_level(onnx.load(str(path), load_external_data=False), level).SerializeToString()


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


def cuda_provider_options(stream_ptr, tf32):
    """The CUDA provider's options: our stream, and TF32 only when asked for (its default is on)."""
    return {"device_id": 0, "user_compute_stream": str(stream_ptr), "use_tf32": "1" if tf32 else "0"}


def refuse_fused_fp32(manifest):
    fused = [g for g, spec in manifest.graphs.items() if spec.form == "fused"]
    if fused and manifest.dtype == "float32":
        raise PopError(f"the {', '.join(fused)} graphs are fused fp32, and ONNX Runtime's CUDA GroupQueryAttention "
                       f"has float16 and bfloat16 kernels only: export with --dtype fp16 or bf16 for ort-cuda, or "
                       f"with --graph-form plain for fp32")


# Tokens per call in a prompt phase on the CPU: of 128, 256 and 512, the size measured best or near it on
# both real models, fp32 and int4 (benchmarks/chunked-prompt: up to 0.82-0.90 of one call's TTFT at 2048
# tokens in fp32; int4, whose products re-read their 4-bit blocks at every call, gains 0-6%).
PROMPT_CHUNK = 512


def element_type(dtype):
    """What IOBinding takes: a numpy type, or ONNX's code where numpy has none (bfloat16)."""
    return onnx.TensorProto.BFLOAT16 if dtype == np_dtype("bfloat16") else dtype


class OrtBackend:
    def __init__(self, directory, manifest, options: BackendOptions = BackendOptions(), device="cpu"):
        directory = Path(directory)
        threads, prepack = options.threads, options.prepack
        if device == "cpu" and manifest.dtype == "bfloat16":
            raise PopError("bf16 artifacts run on the GPU backends (--backend ort-cuda or trt): "
                           "ONNX Runtime's CPU provider has no bf16 kernels")
        self.device = device
        self.name = "ort" if device == "cpu" else "ort-cuda"
        # Prompts in chunks measured faster on the CPU (PopSession.prompt_calls, benchmarks/chunked-prompt).
        # The plain form and CUDA's flash attention are left whole.
        fused = all(spec.form == "fused" for g, spec in manifest.graphs.items() if g != "vision")
        self.prompt_chunk = PROMPT_CHUNK if device == "cpu" and fused else None
        self.weights_file = directory / manifest.weights.file
        self._mmap = np.memmap(self.weights_file, dtype=np.uint8, mode="r")
        self._values = {}  # (offset, length, type, shape) -> OrtValue, one per distinct tensor
        self._views = []  # the DLPack structs of device weights, alive as long as the sessions
        self.sessions, self._bindings, self._bound = {}, {}, {}
        q = manifest.weights.quantization
        if q is not None and q.integer_graphs and device != "cpu":
            raise PopError(f"these artifacts' {' and '.join(q.integer_graphs)} graph multiplies in integers "
                           f"(--weights-compute int8-gemm), a form for ONNX Runtime's CPU provider: run them with "
                           f"--backend ort, or export with --weights-compute int8 for {self.name}")
        self._derived = {}  # (graph, initializer name) -> OrtValue over the array derived at load (kept alive here)
        self._derived_pages = []  # the anonymous mappings that hold the derived int8 matrices
        if device == "cuda":
            from . import cuda
            if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
                raise PopError("both onnxruntime and onnxruntime-gpu are installed, and they provide the same module: "
                               "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install .[gpu]")
            refuse_fused_fp32(manifest)
            if hasattr(ort, "preload_dlls"):  # the CUDA and cuDNN of onnxruntime-gpu[cuda,cudnn]'s nvidia wheels,
                ort.preload_dlls()  # which the provider does not find on its own without a system CUDA
            cuda.runtime()  # a clear message when cuda-python or the GPU is missing, before any session
            self.stream = cuda.Stream()
            self.zeros = cuda.zeros
            self._pinned = cuda.PinnedHost()
            self.host_zeros = self._pinned.zeros
            self.place = lambda block, new, start: cuda.place(self.stream.copy2d, block, new, start)
            self._device_weights = cuda.Allocation(len(self._mmap))  # one copy of the file, ours
            self.stream.h2d(self._device_weights.ptr, self._mmap)
            self.stream.sync()
            provider = "CUDAExecutionProvider"
            providers = [(provider, cuda_provider_options(self.stream.ptr, options.tf32)),
                         "CPUExecutionProvider"]  # the CPU takes what CUDA has no kernel for
        else:
            self.zeros = lazy_zeros  # the KV buffer: resident where written only
            provider = "CPUExecutionProvider"
            providers = [provider]
        prompt_level = q.prompt_accuracy_level if q is not None and device == "cpu" else None
        variants = [(g, manifest.graphs[g]) for g in manifest.graphs_for(options.modes)]
        if prompt_level is not None and q.accuracy_level.get("decode") != prompt_level and "full" in options.modes:
            variants.append((PROMPT, manifest.graphs["decode"]))
        # The graphs that multiply by derived matrices are opened one after the other, and the matrices given
        # back after the last of them (below), so that no other session's packing adds to theirs at the peak.
        integer = set(q.integer_graphs or ()) if q is not None else set()
        variants.sort(key=lambda v: v[0] not in integer)
        last_integer = ([g for g, _ in variants if g in integer] or [None])[-1]
        for graph, spec in variants:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads or 0
            opts.inter_op_num_threads = 1
            # Each session has its own threads, which by default spin a while after each op for the next
            # one, and go on spinning after the run has returned.  Then they fight the other session's
            # threads over the cores: after a prefill call, the boundary step took twice a decode step on
            # 2 cores; after decode steps, smollm2-135m's POP prompt of 1024 tokens took 552 ms against 530
            # with the decode session's threads stopped at the end of each run, whose decode steps were no
            # slower (benchmarks/README.md, "Threads").  So decode, whose ops are short, spins between its
            # ops and stops when its run returns; the big graphs never spin.
            opts.add_session_config_entry("session.force_spinning_stop", "1")
            if graph not in ("decode", PROMPT):
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if not prepack:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            to_derive = []
            for name, location, offset, length, elem, shape in _external_initializers(directory / spec.file):
                if location == derived.DERIVED:
                    to_derive.append(name)
                    continue
                if location != manifest.weights.file:
                    raise PopError(f"{spec.file} points at {location}, not the manifest's weights file")
                opts.add_initializer(name, self._value(offset, length, elem, shape))
            if to_derive:
                opts.add_external_initializers(to_derive,
                                               [self._derive(graph, name, spec.file, q) for name in to_derive])
            source = str(directory / spec.file)
            if graph == PROMPT:
                source = _with_accuracy_level(directory / spec.file, prompt_level)
                # a graph given as bytes finds its external data (here all given by add_initializer) from here
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(directory))
            try:
                sess = ort.InferenceSession(source, opts, providers=providers)
            except Exception as e:  # ORT raises its own exception types for corrupt graphs
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise PopError(f"{spec.file} cannot be loaded by ONNX Runtime: {why}") from None
            require_provider(sess, graph, provider)
            self.sessions[graph] = sess
            self._bindings[graph] = sess.io_binding()
            # Given back after each session rather than after all of them, which lowers the load's peak
            # (smollm2-135m int4: 608 -> 473 MB with both modes, 438 -> 356 for POP mode alone;
            # benchmarks/capacity).
            if prepack and device == "cpu":
                # The matrix products now read their own re-laid-out copies; the mapped file is read only
                # where nothing packed it (embedding rows, norms).  Give its pages back: they come back
                # from the page cache when touched, and the resident set keeps the packed copies only.
                self._mmap._mmap.madvise(mmap.MADV_DONTNEED)
            if graph == last_integer:
                for pages in self._derived_pages:  # every session that reads them holds its own copy now
                    pages.madvise(mmap.MADV_DONTNEED)
                self._derived.clear()  # zeros now: a later session would derive them again

    def _derive(self, graph, name, graph_file, q):
        """The OrtValue of a derived initializer of `graph` (the int8 matrices of integer products), computed once;
        by graph and name, since each graph names its initializers for itself."""
        if not self._derived and q is not None:
            made = {}  # a weight two graphs read (the prefill graph's layers are the prompt graph's too): once
            for entry in q.derived or []:
                key = (entry.codes_offset, entry.scales_offset, entry.zero_points_offset, entry.k, entry.n)
                if key not in made:
                    try:
                        weight, scale = derived.derive(entry, self._mmap, q.bits, q.block_size)
                    except ValueError as e:
                        raise PopError(f"{self.weights_file.name}: {e}: corrupt artifacts") from None
                    pages = anonymous_pages(weight.nbytes)  # which MADV_DONTNEED frees once sessions exist
                    self._derived_pages.append(pages)
                    held = np.frombuffer(pages, np.int8).reshape(weight.shape)
                    held[...] = weight
                    made[key] = [ort.OrtValue.ortvalue_from_numpy(held), ort.OrtValue.ortvalue_from_numpy(scale)]
                self._derived[entry.graph, entry.weight], self._derived[entry.graph, entry.scale] = made[key]
        if (graph, name) not in self._derived:
            raise PopError(f"{graph_file} reads {name}, which the manifest does not say how to derive: "
                           f"corrupt artifacts")
        return self._derived[graph, name]

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
            if self.device == "cuda" and elem in DEVICE_TYPES:
                # a view of our device copy, which both sessions use (floats, and the packed 4/8-bit
                # weights and zero points of quantized exports); integer constants stay on the host,
                # where ONNX Runtime plans the shape arithmetic that reads them
                view = dlpack.View(self._device_weights.ptr + offset, shape,
                                   "bfloat16" if elem == onnx.TensorProto.BFLOAT16 else array.dtype, "cuda")
                self._views.append(view)
                value = ort.OrtValue.from_dlpack(view)
            else:
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, elem)
            self._values[key] = value
        return self._values[key]

    def run(self, graph, inputs, outputs):
        """Runs one graph over the bound arrays; returns its GPU time in ms (CUDA events), or None on the CPU."""
        if graph == "decode" and PROMPT in self.sessions and inputs["input_ids"].shape[1] > 1:
            graph = PROMPT
        io = self._bindings[graph]
        # A decode step binds the same KV blocks as the step before (the same view objects, runtime/kv.py):
        # only what changed is bound again, which saves a Python call per layer and kind each step.
        # The arrays stay referenced here, so an object seen again is the same memory and shape.  The
        # same dicts as the call before (the session's steady decode steps) hold the same arrays: all bound.
        bound = self._bound.setdefault(graph, ({}, {}, None))
        if bound[2] is not None and bound[2][0] is inputs and bound[2][1] is outputs:
            return self._run_bound(graph, io)
        self._bound[graph] = bound = (bound[0], bound[1], (inputs, outputs))
        if inputs.keys() != bound[0].keys() or outputs.keys() != bound[1].keys():
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            bound[0].clear()
            bound[1].clear()
        for name, array in inputs.items():
            if bound[0].get(name) is not array:
                io.bind_input(name, _device(array), 0, element_type(array.dtype), array.shape, _address(array, name))
                bound[0][name] = array
        for name, array in outputs.items():
            if bound[1].get(name) is not array:
                io.bind_output(name, _device(array), 0, element_type(array.dtype), array.shape, _address(array, name))
                bound[1][name] = array
        return self._run_bound(graph, io)

    def _run_bound(self, graph, io):
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
