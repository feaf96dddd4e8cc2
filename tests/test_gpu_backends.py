"""The GPU backends (ort-cuda, trt).

Without a GPU, what can be checked for real is checked: the device KV buffer's
address arithmetic (over host memory, against numpy's own views), the guards
that turn a missing library, a missing GPU or ONNX Runtime's silent CPU
fallback into one clear line, the engine/version refusal, and bf16 graphs.
The runs themselves need an NVIDIA GPU (and TensorRT for trt); they skip with
the reason where that is missing, and run for real where it is not.
"""
import json

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
from test_bad_input import assert_one_line_error


def _host_zeros(shape, dtype):
    """A DeviceArray over host memory: the same arithmetic the device buffer uses, checkable here."""
    array = np.zeros(shape, dtype)
    return cuda.DeviceArray(array.ctypes.data, array.shape, array.dtype, owner=array)


@pytest.mark.parametrize("batch", [1, 3])
def test_device_kv_blocks_are_numpys_blocks(exports, batch):
    """What a session binds (GraphIO) addresses the same bytes of a device buffer as of a host one."""
    from pop.runtime.kv import Staging
    from pop.runtime.session import GraphIO
    man = Manifest.load(exports("tiny-llama"))
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
        h_in, h_out, _ = io.bind(host, Staging(np.float32), ids, seqlens, total, {}, logits)
        d_in, d_out, _ = io.bind(dev, Staging(np.float32, _host_zeros), ids, seqlens, total, {}, logits)
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
    with pytest.warns(UserWarning):
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
    run = cli(tool, exports("tiny-llama"), "--backend", "ort-cuda", *args)
    assert_one_line_error(run, "CUDA")
    assert why in run.stderr


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
    man["engines"] = {g: {"file": f"{g}.engine", "tensorrt": "10.15.1", "profile": {"batch": [1, 1, 8]},
                          "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}
                      for g in man["graphs"]}
    (art / manifest_io.FILE).write_text(json.dumps(man))
    run = cli("pop-generate", art, "--prompt-ids", "1,2,3", "--backend", "trt")
    assert_one_line_error(run, "TensorRT 10+", "pip install .[trt]")


def test_engine_built_elsewhere_is_refused():
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    entry = Engine("decode.engine", "10.15.1", dict(gpu), {})
    check_engine("decode", entry, "10.15.1", gpu)
    with pytest.raises(PopError, match="built by TensorRT 10.15.1; this machine has TensorRT 10.16.0"):
        check_engine("decode", entry, "10.16.0", gpu)
    with pytest.raises(PopError, match="built for NVIDIA H100 .* this GPU is NVIDIA L4"):
        check_engine("decode", entry, "10.15.1", {"name": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(PopError, match="built by TensorRT None"):
        check_engine("decode", Engine("decode.engine", None, {}, {}), "10.15.1", gpu)


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
    art = exports(model, 2)
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
