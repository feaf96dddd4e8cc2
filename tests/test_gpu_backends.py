"""The GPU backends (ort-cuda, trt).

Without a GPU, what can be checked for real is checked: the device KV buffer's
address arithmetic (over host memory, against numpy's own views), the guards
that turn a missing library, a missing GPU or ONNX Runtime's silent CPU
fallback into one clear line, the engine/version refusal, and bf16 graphs.
The runs themselves need an NVIDIA GPU (and TensorRT for trt); they skip with
the reason where that is missing, and run for real where it is not.
"""
import ctypes
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pop.exporter.formats import tensorrt as to_tensorrt
from pop.runtime import manifest as manifest_io
from pop.runtime.manifest import Engine, Manifest
from pop.runtime.backends import cuda
from pop.runtime.backends.ort import require_provider
from pop.runtime.backends.trt import ALIGNMENT, check_engine
from pop.runtime.errors import PopError
from pop.runtime.kv import KVBuffer
from pop.runtime.session import PopSession

from conftest import cli
from conftest import assert_one_line_error


def _host_zeros(shape, dtype):
    """A DeviceArray over host memory: the same arithmetic the device buffer uses, checkable here."""
    array = np.zeros(shape, dtype)
    return cuda.DeviceArray(array.ctypes.data, array.shape, array.dtype, owner=array)


@pytest.mark.parametrize("model,batch", [("tiny-llama", 1), ("tiny-llama", 3), ("tiny-gemma3", 3)])
def test_device_kv_blocks_are_numpys_blocks(exports, model, batch):
    """What a session binds (GraphIO) addresses the same bytes of a device buffer as of a host one, the
    sliding layers' past bound from a later slot (tiny-gemma3's decode graph) included."""
    from pop.runtime.kv import Staging
    from pop.runtime.session import GraphIO
    man = Manifest.load(exports(model))
    spec = man.kv_cache.layers[0]
    args = (len(man.kv_cache.layers), spec.kv_heads, spec.head_dim, 40, np.float32)
    host = KVBuffer(*args, batch=4)
    dev = KVBuffer(*args, batch=4, zeros=_host_zeros)
    host.use(batch)
    dev.use(batch)  # a smaller batch is a view of the first rows of each layer's block, on both
    host_base, dev_base = host._storage.ctypes.data, dev._storage.ptr
    ids, seqlens, total = np.zeros((batch, 5), np.int64), np.zeros(batch, np.int32), np.zeros((), np.int32)
    logits = np.zeros((batch, 7), np.float32)
    for graph in ("prefill", "decode"):
        io = GraphIO(man.graphs[graph], man)
        shift = 3 if io.windowed else 0
        h_in, h_out, _ = io.bind(host, Staging(np.float32), ids, seqlens, total, {}, logits, shift)
        d_in, d_out, _ = io.bind(dev, Staging(np.float32, _host_zeros), ids, seqlens, total, {}, logits, shift)
        assert io.windowed == (model == "tiny-gemma3" and graph == "decode")
        for name, (l, kind) in io.past:  # shifted by 3 slots of head_dim floats where the layer slides
            moved = h_in[name].ctypes.data - host.block(l, kind, batch).ctypes.data
            assert moved == (3 * spec.head_dim * 4 if shift and l in io.sliding else 0), name
        for h, d in [(h_in, d_in), (h_out, d_out)]:
            assert h.keys() == d.keys()
            for name in h:
                if isinstance(d[name], np.ndarray):  # ids, lengths, logits stay host arrays
                    assert d[name].shape == h[name].shape and not name.startswith(("past_", "present_")), name
                    continue
                assert d[name].shape == h[name].shape and d[name].dtype == h[name].dtype, name
                if name.startswith("past_") or name in dict(io.aliased):
                    assert d[name].ptr - dev_base == h[name].ctypes.data - host_base, name
                assert d[name].nbytes == h[name].nbytes, name


def test_device_array_refuses_strided_views():
    a = _host_zeros((4, 5, 6), np.float16)
    assert a[2, 1:3].ptr == a.ptr + (2 * 30 + 6) * 2 and a[2, 1:3].shape == (2, 6)
    assert a[-1].ptr == a.ptr + 3 * 30 * 2
    assert a[:0].nbytes == 0
    with pytest.raises(IndexError):
        a[1:2, 0]  # a slice before another index would be strided
    with pytest.raises(IndexError):
        a[::2]
    with pytest.raises(IndexError):
        a[4]
    with pytest.raises(ValueError):
        a.reshape(7, 7)


def test_kv_blocks_are_aligned_for_tensorrt():
    """Graphs bind whole [rows, kv_heads, max_seq_len, head_dim] blocks, so every address a GPU backend binds
    is a multiple of a block from cudaMalloc's 256-byte-aligned start: SmolLM2-135M's 3 x 64 heads included,
    which the old per-slot binding had to stage."""
    for heads, dim, seq in ((8, 128, 1000), (8, 256, 4096), (3, 64, 2048), (1, 256, 512)):
        kv = KVBuffer(4, heads, dim, seq, np.float16, batch=3, zeros=_host_zeros)
        base = kv._storage.ptr  # cudaMalloc's are 256-byte aligned; numpy's, used here, need not be
        assert all((kv.block(l, k, rows).ptr - base) % ALIGNMENT == 0
                   for l in range(4) for k in (0, 1) for rows in (1, 3))


def test_ort_cpu_fallback_is_refused():
    """onnxruntime without CUDA (as here) takes a CUDA request with only a warning; the check refuses it."""
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    with warnings.catch_warnings():  # the CPU build warns that it has no CUDA; a working onnxruntime-gpu does not
        warnings.simplefilter("ignore")
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if session.get_providers()[0] == "CUDAExecutionProvider":
        pytest.skip("ONNX Runtime really runs on CUDA here, so there is no fallback to refuse")
    with pytest.raises(PopError, match="not CUDAExecutionProvider.*onnxruntime-gpu"):
        require_provider(session, "decode", "CUDAExecutionProvider")
    require_provider(session, "decode", "CPUExecutionProvider")


def _gpu_missing():
    try:
        cuda.runtime()
    except PopError as e:
        return str(e)
    return None


@pytest.mark.parametrize("tool", ["pop-generate", "pop-bench"])
def test_ort_cuda_without_a_gpu_says_so(exports, tool):
    why = _gpu_missing()
    if why is None:
        pytest.skip("a CUDA device is usable here: the failure this test checks cannot happen")
    args = ["--prompt-ids", "1,2,3"] if tool == "pop-generate" else ["--prompt-lens", "8", "--batch", "1",
                                                                      "--runs", "1", "--peers", "none"]
    run = cli(tool, exports("tiny-llama", form="plain"), "--backend", "ort-cuda", *args)
    assert_one_line_error(run, "CUDA")
    assert why in run.stderr


def test_ort_cuda_refuses_fused_fp32_graphs(exports):
    """ONNX Runtime's CUDA GroupQueryAttention has no fp32 kernel: the node would fall back to the CPU and
    copy the cache across the bus every step.  Refused before any GPU is touched."""
    run = cli("pop-generate", exports("tiny-llama"), "--prompt-ids", "1,2,3", "--backend", "ort-cuda")
    assert_one_line_error(run, "fused fp32", "GroupQueryAttention", "--graph-form plain")


def test_trt_backend_refuses_fused_graphs(exports):
    run = cli("pop-generate", exports("tiny-llama"), "--prompt-ids", "1,2,3", "--backend", "trt")
    assert_one_line_error(run, "ONNX Runtime's contrib operators", "TensorRT cannot run", "--format trt")


def test_trt_backend_without_tensorrt_says_so(exports, tmp_path):
    ok, version = to_tensorrt.available()
    if ok:
        pytest.skip(f"TensorRT {version} is installed here: the failure this test checks cannot happen")
    art = tmp_path / "art"
    art.mkdir()
    src = exports("tiny-llama", form="plain")
    for f in src.rglob("*"):
        if f.is_file():
            (art / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (art / f.relative_to(src)).write_bytes(f.read_bytes())
    man = json.loads((art / manifest_io.FILE).read_text())
    man["engines"] = {g: {"file": f"{g}.engine", "tensorrt": "10.15.1", "profiles": [{"batch": [1, 1, 8]}],
                          "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}
                      for g in man["graphs"]}
    (art / manifest_io.FILE).write_text(json.dumps(man))
    run = cli("pop-generate", art, "--prompt-ids", "1,2,3", "--backend", "trt")
    assert_one_line_error(run, "TensorRT 10+", "pip install .[trt]")


def test_engine_built_elsewhere_is_refused():
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    entry = Engine("decode.engine", "10.15.1", dict(gpu), [])
    check_engine("decode", entry, "10.15.1", gpu)
    with pytest.raises(PopError, match="built by TensorRT 10.15.1; this machine has TensorRT 10.16.0"):
        check_engine("decode", entry, "10.16.0", gpu)
    with pytest.raises(PopError, match="built for NVIDIA H100 .* this GPU is NVIDIA L4"):
        check_engine("decode", entry, "10.15.1", {"name": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(PopError, match="built by TensorRT None"):
        check_engine("decode", Engine("decode.engine", None, {}, []), "10.15.1", gpu)


def test_bf16_graphs_are_written_for_the_gpu(tmp_path):
    out = tmp_path / "bf16"
    # the plain form, which TensorRT parses (the fused one is ONNX Runtime CUDA's)
    run = cli("pop-export", "--model", "tiny-llama", "--out", out, "--dtype", "bf16", "--skip-verify",
              "--graph-form", "plain")
    assert run.returncode == 0, run.stderr
    man = Manifest.load(out)
    assert man.dtype == man.kv_cache.dtype == "bfloat16"
    import onnx
    for name, g in man.graphs.items():
        graph = onnx.load(str(out / g.file), load_external_data=False).graph
        kv = [i for i in graph.input if i.name.startswith("past_")] + [o for o in graph.output if o.name.startswith("present_")]
        assert kv and all(t.type.tensor_type.elem_type == TensorProto.BFLOAT16 for t in kv), name
        assert to_tensorrt.unsupported(out / g.file) == [], name
    run = cli("pop-generate", out, "--prompt-ids", "1,2,3")
    assert_one_line_error(run, "bf16", "ort-cuda")


def _host_copy2d(dst, dst_pitch, src, src_pitch, width, height):
    """What cudaMemcpy2DAsync does, over host memory."""
    for i in range(height):
        ctypes.memmove(dst + i * dst_pitch, src + i * src_pitch, width)


@pytest.mark.parametrize("t", [1, 5])
def test_device_placement_writes_what_numpys_does(t):
    """cuda.place (one strided copy per row) puts new K/V exactly where the CPU runtime's indexing does."""
    rng = np.random.default_rng(t)
    rows, heads, slots, dim = 3, 2, 16, 4
    host = KVBuffer(2, heads, dim, slots, np.float16, batch=rows)
    dev = KVBuffer(2, heads, dim, slots, np.float16, batch=rows, zeros=_host_zeros,
                   place=lambda block, new, start: cuda.place(_host_copy2d, block, new, start))
    for layer, kv, start in ((0, 1, [0, 3, slots - t]), (1, 0, [2, 0, 7])):
        new = rng.standard_normal((rows, heads, t, dim)).astype(np.float16)
        staged = _host_zeros(new.shape, new.dtype)
        staged.owner[...] = new
        host.place(layer, kv, new, np.array(start))
        dev.place(layer, kv, staged, np.array(start))
        assert np.array_equal(dev._storage.owner, host._storage), (layer, kv, start)
    with pytest.raises(IndexError, match="outside the buffer"):
        dev.place(0, 0, staged, np.array([slots - t + 1, 0, 0]))


def test_staged_outputs_start_on_256_byte_boundaries():
    """TensorRT binds a tensor where it lies only at 256-byte alignment; the runtime's staging for the new
    K/V of a decode step (SmolLM2: 3 heads x 64 x 2 bytes = 384 per row) is carved at those boundaries."""
    from pop.runtime.kv import Staging
    staging = Staging(np.float16, _host_zeros)
    views = staging.views([(2, 3, 1, 64)] * 4)
    base = staging._storage.ptr
    assert all((v.ptr - base) % ALIGNMENT == 0 for v in views)
    assert all(b.ptr >= a.ptr + a.nbytes for a, b in zip(views, views[1:]))


def test_device_weights_are_views_onnxruntime_accepts():
    """The first review's certain failure: add_initializer refuses memory ONNX Runtime owns, which is what an
    OrtValue allocated on the device is.  A DLPack view of memory we own is accepted and used in place (shown
    on the CPU, where the same check applies; on a GPU the view says kDLCUDA)."""
    from pop.runtime.backends import dlpack
    from onnx import numpy_helper
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                          initializer=[numpy_helper.from_array(np.zeros((2, 3), np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    owned = ort.SessionOptions()
    with pytest.raises(Exception, match="must be owned by the user"):
        owned.add_initializer("w", ort.OrtValue.ortvalue_from_shape_and_type([2, 3], np.float32, "cpu", 0))
    view = dlpack.View(w.ctypes.data, w.shape, w.dtype, "cpu")
    opts = ort.SessionOptions()
    value = ort.OrtValue.from_dlpack(view)  # the caller keeps an initializer alive as long as its sessions
    opts.add_initializer("w", value)
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": np.ones((1, 2), np.float32)})[0], [[3, 5, 7]])
    assert value.data_ptr() == w.ctypes.data  # wrapped where it lies, not copied
    bits = np.array([[0x3F80, 0x4000]], np.uint16)  # bf16 1.0, 2.0: numpy has no bf16, DLPack does
    value = ort.OrtValue.from_dlpack(dlpack.View(bits.ctypes.data, bits.shape, "bfloat16", "cpu"))
    assert value.data_type() == "tensor(bfloat16)"


@pytest.mark.parametrize("tf32", [False, True])
def test_ort_cuda_session_setup(exports, monkeypatch, tf32):
    """What OrtBackend hands ONNX Runtime for CUDA, up to the session, with the GPU calls stood in for by host
    memory: the CUDA/cuDNN libraries preloaded first, TF32 as asked (off by default), our stream, and every
    float initializer a DLPack view into one copy of weights.bin that we own."""
    from pop.runtime.backends import BackendOptions, dlpack
    from pop.runtime.backends import ort as ort_backend
    art = exports("tiny-llama", form="plain")
    man = Manifest.load(art)
    calls, held = [], []

    class Stream:
        ptr = 12345

        def h2d(self, dst, array):
            ctypes.memmove(dst, array.ctypes.data, array.nbytes)

        def sync(self):
            pass

    def allocation(n):
        held.append(np.zeros(n, np.uint8))
        return SimpleNamespace(ptr=held[-1].ctypes.data, nbytes=n)

    class Stop(Exception):
        pass

    def session(path, opts, providers):
        calls.append(("session", providers))
        raise Stop("stopped before a CUDA session")
    monkeypatch.setattr(ort_backend.ort, "preload_dlls", lambda *a, **k: calls.append("preload"), raising=False)
    monkeypatch.setattr(cuda, "runtime", lambda: calls.append("cuda"))
    monkeypatch.setattr(cuda, "Stream", Stream)
    monkeypatch.setattr(cuda, "Allocation", allocation)
    monkeypatch.setattr(cuda, "PinnedHost", lambda: SimpleNamespace(zeros=np.zeros))
    host_view = dlpack.View
    monkeypatch.setattr(dlpack, "View", lambda ptr, shape, dtype, device: host_view(ptr, shape, dtype, "cpu"))
    added = {}
    real_add = ort.SessionOptions.add_initializer
    monkeypatch.setattr(ort.SessionOptions, "add_initializer",
                        lambda self, name, value: (added.__setitem__(name, value), real_add(self, name, value))[1])
    monkeypatch.setattr(ort_backend.ort, "InferenceSession", session)
    with pytest.raises(PopError, match="stopped before a CUDA session"):
        ort_backend.OrtBackend(art, man, BackendOptions(tf32=tf32), device="cuda")
    assert calls[:2] == ["preload", "cuda"]
    (provider, options), cpu = calls[2][1]
    assert provider == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert options["use_tf32"] == ("1" if tf32 else "0") and options["user_compute_stream"] == "12345"
    weights = np.fromfile(art / man.weights.file, np.uint8)
    assert np.array_equal(held[0], weights)  # one copy of the file, ours
    floats = [v for v in added.values() if v.data_type() in ("tensor(float)", "tensor(bfloat16)")]
    assert floats and all(held[0].ctypes.data <= v.data_ptr() < held[0].ctypes.data + held[0].nbytes
                          for v in floats)


def test_gpu_extras_share_one_cuda_major():
    """onnxruntime-gpu 1.31.1's wheels are CUDA 13 builds (PyPI metadata: nvidia-cuda-runtime~=13.0 under
    [cuda]); cuda-python and TensorRT must be CUDA 13 too, and the [cuda,cudnn] extras must come along so that
    preload_dlls finds the libraries without a system CUDA."""
    import tomllib
    from packaging.requirements import Requirement
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    gpu = {r.name: r for r in map(Requirement, extras["gpu"])}
    assert {"cuda", "cudnn"} <= gpu["onnxruntime-gpu"].extras
    assert str(gpu["onnxruntime-gpu"].specifier) == "==1.31.1"
    for extra in ("gpu", "trt", "test"):
        [cp] = [r for r in map(Requirement, extras[extra]) if r.name == "cuda-python"]
        assert cp.specifier.contains("13.4.4") and not cp.specifier.contains("12.9.0") \
            and not cp.specifier.contains("14.0.0"), (extra, str(cp))
    assert {r.name for r in map(Requirement, extras["trt"])} >= {"tensorrt-cu13"}


class _FakeTensorRT:
    """TensorRT's builder API as build_engine uses it, recording what it is asked (TensorRT cannot be
    installed here; NVIDIA's Python API documentation is the contract)."""
    __version__ = "11.4.0"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(TF32="tf32")

    def __init__(self):
        self.log = []

    def Builder(self, logger):
        log = self.log

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                pass

            def clear_flag(self, flag):
                log.append(("clear_flag", flag))

            def create_timing_cache(self, data):
                log.append(("new_cache",))
                return "cache"

            def set_timing_cache(self, cache, ignore_mismatch):
                log.append(("cache", cache))

            def add_optimization_profile(self, profile):
                log.append(("profile", profile.shapes))

            def get_timing_cache(self):
                return "cache"

        return SimpleNamespace(create_network=lambda flags: "network", create_builder_config=Config,
                               create_optimization_profile=Profile,
                               build_serialized_network=lambda network, config: b"engine")

    def OnnxParser(self, network, logger):
        return SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)


def test_engine_builds_ask_for_fp32_profiles_and_one_timing_cache(exports, tmp_path, monkeypatch):
    import sys
    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "device_info", lambda: {"name": "GPU", "compute_capability": "9.0"})
    art = exports("tiny-llama", form="plain")
    man = Manifest.load(art)
    graph = man.graphs["decode"]
    chosen = to_tensorrt.profiles("decode", 2, man.max_seq_len)
    entry, cache = to_tensorrt.build_engine(art / graph.file, tmp_path / "decode.engine", graph, chosen)
    assert ("clear_flag", "tf32") in fake.log and entry.tf32 is False
    profiles = [shapes for what, *rest in fake.log if what == "profile" for shapes in rest]
    assert len(profiles) == 2 and profiles[0]["input_ids"][1] == (1, 1)  # the step profile: one token
    assert profiles[0]["cache_slots"][1] == (chosen[0]["total"][1],)
    assert entry.profiles == [{k: list(v) for k, v in p.items()} for p in chosen]
    fake.log.clear()
    entry, _ = to_tensorrt.build_engine(art / graph.file, tmp_path / "d2.engine", graph, chosen, tf32=True,
                                        timing_cache=cache)
    assert ("clear_flag", "tf32") not in fake.log and entry.tf32 is True
    assert ("new_cache",) not in fake.log and ("cache", "cache") in fake.log  # the first build's timings


# --- on a GPU ------------------------------------------------------------------
def _gpu_backend_or_skip(backend):
    why = _gpu_missing()
    if why:
        pytest.skip(f"{backend} needs an NVIDIA GPU: {why}")
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("ort-cuda needs onnxruntime-gpu (pip install .[gpu]); this onnxruntime has no CUDA provider")
    if backend == "trt":
        ok, why = to_tensorrt.available()
        if not ok:
            pytest.skip(f"trt needs TensorRT: {why}")


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_ort_cuda_greedy_equals_the_cpu_runtime(exports, model):
    _gpu_backend_or_skip("ort-cuda")
    art = exports(model, 2, form="plain")  # fp32: the fused form's attention has no fp32 CUDA kernel
    ids = [[5, 9, 11, 3, 7, 21, 8], [4, 4, 13, 2]]
    cpu = PopSession.load(art).generate(ids, 12, stop_at_eos=False)
    gpu_session = PopSession.load(art, "ort-cuda")
    assert gpu_session.backend.device == "cuda"
    for mode in ("pop", "full"):
        gpu = gpu_session.generate(ids, 12, mode, stop_at_eos=False)
        assert gpu.output_ids == (cpu.output_ids if mode == "pop" else
                                  PopSession.load(art).generate(ids, 12, "full", stop_at_eos=False).output_ids)
        assert gpu.timings_ms["gpu_ms"]["prefill"] > 0


def test_trt_engines_greedy_equals_the_cpu_runtime(tmp_path):
    _gpu_backend_or_skip("trt")
    out = tmp_path / "trt"
    run = cli("pop-export", "--model", "tiny-llama", "--out", out, "--format", "trt", "--prefill-layers", "2",
              "--max-seq-len", "64", "--max-batch", "2")
    assert run.returncode == 0, run.stderr
    man = Manifest.load(out)
    assert set(man.engines) == set(man.graphs) and man.engines["decode"].gpu["name"]
    ids = [[5, 9, 11, 3, 7, 21, 8], [4, 4, 13, 2]]
    cpu = PopSession.load(out).generate(ids, 12, stop_at_eos=False)
    trt = PopSession.load(out, "trt").generate(ids, 12, stop_at_eos=False)
    assert trt.output_ids == cpu.output_ids
