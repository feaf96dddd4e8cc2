"""The TensorRT backend's checks that need neither TensorRT nor a GPU: operator
support of every exported graph, and optimization profiles that cover every
symbolic axis the manifest records."""
import onnx
import pytest
from onnx import TensorProto, helper

from pop.exporter.formats import onnx as to_onnx
from pop.exporter.formats import tensorrt as to_tensorrt
from pop.runtime.manifest import Manifest

MODELS = ["tiny-llama", "tiny-gemma3", "tiny-qwen3-vl", "tiny-gemma3-vl"]


def _graph_files(art):
    man = Manifest.load(art)
    return man, {name: art / g.file for name, g in man.graphs.items()}


def test_matrix_source():
    matrix = to_tensorrt.support_matrix()
    source, ops = matrix["source"], matrix["operators"]
    for key in ("repository", "path", "commit", "tensorrt", "opset_min", "opset_max"):
        assert key in source
    assert source["repository"] == "onnx/onnx-tensorrt" and source["tensorrt"].startswith("10.")
    assert source["opset_min"] <= to_onnx.OPSET <= source["opset_max"]
    assert ops["MatMul"]["supported"] and not ops["Unique"]["supported"]


@pytest.mark.parametrize("model", MODELS)
def test_exported_graphs_are_supported(exports, model):
    """The plain form (--format trt) holds only operators TensorRT's parser takes; the fused form holds ONNX
    Runtime's, by design, which the parse check names."""
    man, files = _graph_files(exports(model, form="plain"))
    assert {g.form for name, g in man.graphs.items() if name != "vision"} == {"plain"}
    assert {"prefill", "decode"} <= set(files) and ("vision" in files) == (man.vision is not None)
    for name, path in files.items():
        assert to_tensorrt.unsupported(path) == [], name


def _save(tmp_path, node, opsets):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x], [y])
    path = tmp_path / f"{node.op_type}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]), path)
    return path


def test_unsupported_ops_are_named(tmp_path):
    unique = _save(tmp_path, helper.make_node("Unique", ["x"], ["y"]), [("", 21)])  # marked N
    [line] = to_tensorrt.unsupported(unique)
    assert "Unique" in line and "unsupported" in line
    custom = _save(tmp_path, helper.make_node("FancyAttention", ["x"], ["y"], domain="com.example"),
                   [("", 21), ("com.example", 1)])
    [line] = to_tensorrt.unsupported(custom)
    assert "FancyAttention" in line and "com.example" in line
    add = _save(tmp_path, helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add"), [("", 21)])
    [line] = to_tensorrt.unsupported(add)
    assert "ScatterND with reduction=add" in line  # a restriction, not a missing op
    old = _save(tmp_path, helper.make_node("Relu", ["x"], ["y"]), [("", 7)])
    [line] = to_tensorrt.unsupported(old)
    assert "opset 7" in line


def test_unsupported_op_inside_a_subgraph(tmp_path):
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Unique", ["x"], [name])], name, [],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("a"), else_branch=branch("b"))
    [line] = to_tensorrt.unsupported(_save(tmp_path, node, [("", 21)]))
    assert line.startswith("Unique (2 nodes)")


@pytest.mark.parametrize("max_batch", [1, 8])
@pytest.mark.parametrize("model", MODELS)
def test_profiles_satisfy_the_graphs_shape_relations(exports, model, max_batch):
    """Every profile's min, opt and max satisfy the relations ONNX Runtime's symbolic shape inference finds
    in the graph (the plain decode graph's past is total - seq, so total >= seq), and decode is tuned for
    its hot path: one new token over a real past."""
    art = exports(model, form="plain")
    man, files = _graph_files(art)
    n = man.max_seq_len
    for name, graph in man.graphs.items():
        chosen = to_tensorrt.profiles(name, max_batch, n, man.vision)
        for profile in chosen:
            for tensor in graph.inputs:
                for axis in tensor.shape:
                    if isinstance(axis, str):
                        lo, opt, hi = profile[axis]
                        assert 0 <= lo <= opt <= hi, (name, tensor.name, axis)
            assert profile["batch"][2] == max_batch and profile["seq"][2] == n
            assert to_tensorrt.check_relations(files[name], profile) == [], (name, profile)
    steps, prompts = to_tensorrt.profiles("decode", max_batch, n, man.vision)
    assert steps["seq"][1] == 1 and steps["total"][1] > 1 and steps["total"][2] == n
    assert prompts["seq"][1] > 1 and prompts["total"][1] >= prompts["seq"][1]
    if man.vision is not None:
        assert steps["image_tokens"][0] == 0  # decode steps pass no image tokens


def test_relations_catch_a_profile_that_breaks_them(exports):
    """The relation the first review found broken, past = total - seq >= 0, is found in the graph itself."""
    man, files = _graph_files(exports("tiny-llama", form="plain"))
    equal, expressions = to_tensorrt.relations(files["decode"])
    assert any({str(s) for s in e.free_symbols} == {"seq", "total"} for e in expressions), expressions
    bad = {"batch": (1, 1, 2), "seq": (1, 512, man.max_seq_len), "total": (1, 300, man.max_seq_len)}
    problems = to_tensorrt.check_relations(files["decode"], bad)
    assert problems and all(p.startswith("opt:") for p in problems), problems


def _zeros(spec, sizes):
    import numpy as np
    from pop.runtime.manifest import np_dtype
    shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
    if spec.name == "seqlens_k":
        return np.full(shape, sizes.get("total", sizes["seq"]) - 1, np.int32)  # each row's last slot
    if spec.name == "total_sequence_length":
        return np.array(sizes.get("total", sizes["seq"]), np.int32)
    if spec.name == "cache_slots":
        return np.arange(sizes["total"], dtype=np.int64)
    return np.zeros(shape, np_dtype(spec.dtype))


def test_plain_graphs_run_at_every_profile_point(exports):
    """ONNX Runtime runs the plain graphs (TensorRT's input) at each profile's min, opt and max shapes, and
    every output has the shape the manifest gives it there."""
    import onnxruntime as ort
    art = exports("tiny-llama", form="plain")
    man, files = _graph_files(art)
    for name, graph in man.graphs.items():
        session = ort.InferenceSession(str(files[name]), providers=["CPUExecutionProvider"])
        for profile in to_tensorrt.profiles(name, 2, man.max_seq_len):
            for i, point in enumerate(("min", "opt", "max")):
                sizes = {axis: r[i] for axis, r in profile.items()}
                feeds = {t.name: _zeros(t, sizes) for t in graph.inputs}
                outputs = session.run(None, feeds)
                for spec, value in zip(graph.outputs, outputs):
                    want = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
                    assert list(value.shape) == want, (name, point, spec.name)


def test_calls_run_on_the_profile_made_for_them():
    from pop.runtime.backends.trt import choose
    profiles = to_tensorrt.profiles("decode", 4, 2048)
    names = {"input_ids": ["batch", "seq"], "cache_slots": ["total"]}
    assert choose(profiles, {"input_ids": (1, 1), "cache_slots": (700,)}, names) == 0  # a decode step
    assert choose(profiles, {"input_ids": (2, 900), "cache_slots": (900,)}, names) == 1  # a full-mode prompt
    assert choose(profiles, {"input_ids": (5, 1), "cache_slots": (9,)}, names) is None  # beyond --max-batch
    assert choose(to_tensorrt.profiles("prefill", 4, 2048), {"input_ids": (1, 1)}, {"input_ids": ["batch", "seq"]}) == 0
