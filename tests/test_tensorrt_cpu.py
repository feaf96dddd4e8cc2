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
def test_profile_covers_the_manifest(exports, model, max_batch):
    man, _ = _graph_files(exports(model, form="plain"))
    n = man.max_seq_len
    ranges = to_tensorrt.axis_ranges(max_batch, n, man.vision)
    for name, graph in man.graphs.items():
        for tensor in graph.inputs:
            for axis in tensor.shape:
                if isinstance(axis, str):
                    lo, opt, hi = ranges[axis]
                    assert 0 <= lo <= opt <= hi, (name, tensor.name, axis)
    assert ranges["seq"][2] == ranges["total"][2] == n
    assert ranges["batch"][2] == max_batch
    if man.vision is not None:
        assert ranges["image_tokens"][0] == 0  # decode steps pass no image tokens
    assert to_tensorrt.axis_ranges(max_batch, n)["batch"] == ranges["batch"]
