"""--weights int8|int4: the block layout against ONNX Runtime's own MatMulNBits and GatherBlockQuantized
kernels, exports that verify against the reference holding the same (dequantized) weights, the tied table
stored once, greedy tokens equal to HF generate on the quantized model, and bad combinations refused."""
import json
import mmap
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_one_line_error, cli, forbid_model_loading, generate_json, hf_greedy
from pop.exporter import quantize, tiny
from pop.exporter.options import ExportOptions
from pop.runtime.backends import BackendOptions, derived
from pop.runtime.backends.ort import OrtBackend
from pop.runtime.errors import PopError
from pop.runtime.manifest import DerivedTensor, Manifest
from pop.runtime.memory import resident_bytes
from pop.runtime.session import PopSession

PROMPT_IDS = [1, 45, 67, 89, 23, 56, 78, 90, 12, 34, 11, 99]


def _run(node, inputs, initializers, out_shape):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, list(a.shape)) for n, t, a in inputs],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString()).run(None, {n: a for n, _, a in inputs})[0]


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False), (8, False)])
def test_layout_is_onnx_runtimes(bits, symmetric):
    """Our packing read by ONNX Runtime's kernels gives our dequantized matrix, for products and gathers, with
    and without zero points; K = 80 is not a multiple of the block, so the last block is padded, and the
    table's 3 blocks per row leave its packed 4-bit zero points a half byte of padding."""
    rng = np.random.default_rng(bits)
    s = quantize.Scheme(bits, 32, symmetric=symmetric)
    k, n = 80, 48
    w = rng.standard_normal((k, n)).astype(np.float32) + (0 if symmetric else 0.7)  # skewed: zero points matter
    codes, scales, zeros = quantize.quantize(np.ascontiguousarray(w.T), s)
    dq = quantize.dequantize(codes, scales, zeros, k).T
    assert 0 < np.abs(dq - w).max() <= scales.max() / 2 + 1e-6  # rounded to the nearest step, no further
    assert (zeros == s.zero).all() if symmetric else len(np.unique(zeros)) > 1
    packed = quantize.pack(codes, s)
    x = rng.standard_normal((3, k)).astype(np.float32)
    zp = {} if symmetric else {"z": quantize.pack_zeros(zeros, s).reshape(-1)}
    y = _run(helper.make_node("MatMulNBits", ["x", "b", "s", *zp], ["y"], domain="com.microsoft", K=k, N=n,
                              bits=bits, block_size=32, accuracy_level=1),
             [("x", TensorProto.FLOAT, x)], {"b": packed, "s": scales.reshape(-1), **zp}, [3, n])
    np.testing.assert_allclose(y, x @ dq, atol=2e-5)
    table = w[:, :40].T.copy()  # [40 rows, 80 values]: a table whose rows are gathered
    codes, scales, zeros = quantize.quantize(table, s)
    idx = np.array([3, 0, 39])
    zp = {} if symmetric else {"z": quantize.pack_zeros(zeros, s)}
    y = _run(helper.make_node("GatherBlockQuantized", ["d", "i", "s", *zp], ["y"], domain="com.microsoft",
                              gather_axis=0, quantize_axis=1, block_size=32, bits=bits),
             [("i", TensorProto.INT64, idx)], {"d": quantize.pack(codes, s).reshape(40, -1)[:, :80 * bits // 8],
                                                "s": scales, **zp}, [3, 80])
    np.testing.assert_array_equal(y, quantize.dequantize(codes, scales, zeros, 80)[idx])
    rounded = quantize.dequantize(codes, scales, zeros, 80)
    grids = dict(zip(quantize.digests(rounded), zip(scales, zeros)))  # what fake_quantize records
    found = quantize.known_grid(rounded, grids)
    assert found is not None and (quantize.codes_on(rounded, found[0], found[1], s) == codes).all()
    assert quantize.known_grid(table, grids) is None  # weights fake_quantize did not make are left alone


def test_a_grid_is_taken_as_made_not_derived_again():
    """With zero points, a block whose ends fall on half steps (weights that came from a 4-bit GGUF do) loses a
    code when its rounded values are quantized again: the rewrite must take the grid fake_quantize made."""
    s = quantize.Scheme(4, 32, symmetric=False)
    row = np.linspace(-0.65, 0.85, 32, dtype=np.float32)[None]  # lo / step = -6.5, hi / step = 8.5
    codes, scales, zeros = quantize.quantize(row, s)
    rounded = quantize.dequantize(codes, scales, zeros, 32)
    again = quantize.quantize(rounded, s)
    assert not np.allclose(quantize.dequantize(*again, 32), rounded)  # deriving it again moves the grid
    found = quantize.known_grid(rounded, dict(zip(quantize.digests(rounded), zip(scales, zeros))))
    assert (quantize.codes_on(rounded, found[0], found[1], s) == codes).all()


def test_zero_points_cut_the_rounding_error_of_skewed_blocks():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * 0.1 + 0.3).astype(np.float32)  # blocks far from centred on 0
    err = {}
    for symmetric in (True, False):
        s = quantize.Scheme(4, 32, symmetric=symmetric)
        err[symmetric] = np.abs(quantize.dequantize(*quantize.quantize(w, s), 256) - w).mean()
    assert err[False] < 0.7 * err[True]


@pytest.mark.parametrize("family,weights", [("tiny-llama", "int4"), ("tiny-gemma3", "int8")])
def test_quantized_export_verifies_and_stores_the_table_once(family, weights, exports):
    """The export itself verified the graphs against the reference at fp32's tolerance (it raises
    otherwise); here: every text matrix reads quantized weights, the tied table is one tensor for the
    gather and the output product, and the folder shrinks."""
    q = exports(family, weights=weights)
    manifest = json.loads((q / "pop_manifest.json").read_text())
    record = manifest["weights"]["quantization"]
    assert record["scheme"] == weights and record["bits"] == quantize.BITS[weights]
    assert record["embedding"] == "quantized, shared with the output matrix"
    assert manifest["verification"]["passed"] and manifest["verification"]["tolerance"] == 1e-4
    for graph in ("prefill", "decode"):
        model = onnx.load(str(q / f"{graph}.onnx"), load_external_data=False)
        weights_of = {t.name: t for t in model.graph.initializer}
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulNBits") == record["operators"][graph]["MatMulNBits"] > 0
        assert ops.count("GatherBlockQuantized") == 1
        # no product against a float weight is left
        assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights_of]
    decode = onnx.load(str(q / "decode.onnx"), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data}["offset"] for t in decode.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL}
    gather = next(n for n in decode.graph.node if n.op_type == "GatherBlockQuantized")
    vocab = manifest["model"]["vocab_size"]
    [lm_head] = [n for n in decode.graph.node if n.op_type == "MatMulNBits"
                 and helper.get_attribute_value(next(a for a in n.attribute if a.name == "N")) == vocab]
    assert where[gather.input[0]] == where[lm_head.input[1]] and where[gather.input[2]] == where[lm_head.input[2]]
    fp32 = exports(family)
    assert (q / "weights.bin").stat().st_size < 0.6 * (fp32 / "weights.bin").stat().st_size


def test_zero_points_and_a_float_embedding_export_and_verify(exports):
    """Zero points (int4's default, --weights-asymmetric): every product and the tied gather read them, the
    gather's and the output product's stored once; --keep-embedding: the output matrix and the embedding stay
    float32 (the export verified both against the reference, or it would have raised)."""
    asym = exports("tiny-gemma3", weights="int4")
    manifest = json.loads((asym / "pop_manifest.json").read_text())
    record = manifest["weights"]["quantization"]
    assert (record["symmetric"], record["block_size"]) == (False, quantize.DEFAULT_BLOCK["int4"])
    assert manifest["verification"]["passed"]
    decode = onnx.load(str(asym / "decode.onnx"), load_external_data=False)
    quantized = [n for n in decode.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert quantized and all(len(n.input) == 4 and n.input[3] for n in quantized)
    vocab = manifest["model"]["vocab_size"]
    gather = next(n for n in quantized if n.op_type == "GatherBlockQuantized")
    [lm_head] = [n for n in quantized if n.op_type == "MatMulNBits"
                 and helper.get_attribute_value(next(a for a in n.attribute if a.name == "N")) == vocab]
    values = {t.name: numpy_helper.to_array(t, base_dir=str(asym)) for t in decode.graph.initializer}
    # the same zero-point bytes, in the shapes each operator takes (weights.bin stores equal bytes once)
    assert values[gather.input[3]].tobytes() == values[lm_head.input[3]].tobytes()
    assert values[gather.input[3]].shape == (vocab, -(-manifest["model"]["hidden_size"] // record["block_size"] // 2))

    kept = exports("tiny-llama", weights="int4", keep_embedding=True)
    record = json.loads((kept / "pop_manifest.json").read_text())["weights"]["quantization"]
    assert record["embedding"] == "float32" and record["output_matrix"] == "float32"
    whole = json.loads((exports("tiny-llama", weights="int4") / "pop_manifest.json").read_text())
    for graph, ops in record["operators"].items():  # the prefill graph gathers embeddings, computes no logits
        assert ops == {"MatMulNBits": whole["weights"]["quantization"]["operators"][graph]["MatMulNBits"]
                       - (graph == "decode"), "GatherBlockQuantized": 0}
    sizes = [(d / "weights.bin").stat().st_size for d in (exports("tiny-llama", weights="int4"), kept,
                                                         exports("tiny-llama"))]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_fp16_graphs_take_fp16_scales(exports):
    """--dtype fp16 --weights int4 (the form a GPU runs): MatMulNBits and the gather read float16 scales and
    take float16 activations; the export verified them on the CPU at fp16's tolerance, or it would have raised."""
    q = exports("tiny-gemma3", weights="int4", dtype="fp16")
    manifest = json.loads((q / "pop_manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["verification"]["passed"]
    assert manifest["verification"]["tolerance"] == 2e-2
    decode = onnx.load(str(q / "decode.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in decode.graph.initializer}
    quantized = [n for n in decode.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert len(quantized) == sum(manifest["weights"]["quantization"]["operators"]["decode"].values())
    assert {types[n.input[2]] for n in quantized} == {TensorProto.FLOAT16}
    session = PopSession.load(q)
    assert len(session.generate(PROMPT_IDS, 6, "pop").output_ids[0]) >= 1


@pytest.mark.parametrize("options", [{}, {"weights_asymmetric": False}, {"keep_embedding": True}])
def test_int4_greedy_equals_hf_generate_on_the_quantized_model(exports, options):
    """An independent check: HF's own generate on the model with the same rounded weights gives full mode's
    tokens (int4's default grid, symmetric, a float32 output matrix), and POP mode runs end to end through
    the CLI."""
    q = exports("tiny-llama", weights="int4", **options)
    model = tiny.build("tiny-llama")[0]
    from pop.exporter.families import adapter_for
    s = ExportOptions("tiny-llama", weights="int4", weights_compute="fp32", **options).scheme()
    assert s.block == 64 and s.symmetric == (options.get("weights_asymmetric") is False)
    quantize.fake_quantize(quantize.text_modules(adapter_for(model), keep_embedding=s.keep_embedding), s)
    session = PopSession.load(q)
    assert session.generate(PROMPT_IDS, 12, "full").output_ids[0] == hf_greedy(model, PROMPT_IDS, 12,
                                                                                session.eos_ids)
    assert len(generate_json(q, PROMPT_IDS, 8)["output_ids"]) >= 1


def test_bad_combinations_fail_before_loading(tmp_path, refused, monkeypatch):
    """One line and exit 2 before any model loads. The installed command runs twice (a refused combination and
    argparse's own refusal); the others go through the same entry point in this process, so that eleven
    interpreter starts do not cost a minute."""
    forbid_model_loading(monkeypatch)
    for args, needle in ((("--weights", "int4", "--format", "trt"), "needs ONNX Runtime's MatMulNBits"),
                         (("--weights", "int8", "--graph-form", "plain"), "--graph-form plain"),
                         (("--weights", "int4", "--dtype", "bf16"), "not --dtype bf16"),
                         (("--weights", "int4", "--dtype", "fp16", "--weights-compute", "int8-decode"),
                          "is for fp32 exports on the CPU"),
                         (("--weights", "int4", "--weights-block", "48"), "--weights-block must be"),
                         (("--weights", "int4", "--weights-block", "0"), "--weights-block must be"),
                         (("--weights", "int4", "--dtype", "fp16", "--weights-compute", "int8-gemm"),
                          "is for fp32 exports on the CPU"),
                         (("--weights-compute", "int8",), "add --weights int8 or int4"),
                         (("--weights-compute", "int8-gemm",), "add --weights int8 or int4"),
                         (("--weights-asymmetric",), "--weights-asymmetric is for quantized weights"),
                         (("--keep-embedding",), "--keep-embedding is for quantized weights")):
        err = refused("pop-export", "--model", "tiny-llama", "--out", tmp_path / "o", *args)
        assert len(err) == 1 and needle in err[0], (args, err)
        assert not (tmp_path / "o").exists()
    run = cli("pop-export", "--model", "tiny-llama", "--out", tmp_path / "o", "--weights", "int4", "--format", "trt",
              timeout=120)
    assert_one_line_error(run, "needs ONNX Runtime's MatMulNBits", code=2)
    assert not (tmp_path / "o").exists()
    run = cli("pop-export", "--model", "tiny-llama", "--weights", "int3", timeout=120)
    assert run.returncode == 2 and "invalid choice: 'int3'" in run.stderr


def test_weights_compute_defaults_to_the_measured_faster_choice(tmp_path):
    """No --weights-compute: int8 activations in both graphs for 8-bit weights, and for 4-bit ones the decode
    graph's and integer GEMMs in POP's prefill graph, as measured faster (benchmarks/quantized,
    benchmarks/int8-gemm); fp16 graphs compute in fp16; an explicit choice wins."""
    def graphs(**options):
        s = ExportOptions("tiny-llama", tmp_path / "o", **options).scheme()
        return s.int8_graphs, s.integer_graphs
    assert graphs(weights="int8") == (("prefill", "decode"), ())
    assert graphs(weights="int4") == (("decode",), ("prefill", "prompt"))
    assert graphs(weights="int4", weights_compute="int8") == (("prefill", "decode"), ())
    assert graphs(weights="int4", weights_compute="int8-decode") == (("decode",), ())
    assert graphs(weights="int4", dtype="fp16") == ((), ())
    assert graphs(weights="int8", weights_compute="fp32") == ((), ())
    assert ExportOptions("tiny-llama", tmp_path / "o").scheme() is None
    with pytest.raises(PopError, match="unknown --weights 'int3'"):  # one line from the API too
        graphs(weights="int3")


def _logits(session, ids, n):
    """Full mode's logits at its first n steps, the same token fed to all (greedy from the first)."""
    got = []

    def sampler(logits):
        got.append(np.array(logits[0], np.float32))
        return [int(got[0].argmax())]
    for _ in session.steps(ids, n, "full", sampler):
        pass
    return got


def test_int8_compute_is_verified_first_then_measured(tmp_path, exports):
    """--weights int4 --weights-compute int8: the export verifies the fp32-compute graphs (it fails otherwise),
    then switches MatMulNBits to int8 activations and records their measured distance from the reference."""
    out = tmp_path / "q"
    run = cli("pop-export", "--model", "tiny-llama", "--out", out, "--weights", "int4", "--weights-compute", "int8",
              timeout=600)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "pop_manifest.json").read_text())
    record = manifest["weights"]["quantization"]
    assert manifest["verification"]["passed"] and record["accuracy_level"] == {"prefill": 4, "decode": 4}
    errors = record["int8_compute_error"]
    assert set(errors) == {"prefill_kv", "boundary_logits", "full_logits", "full_kv"}
    assert all(1e-4 < e < 0.2 for e in errors.values()), errors  # int8 rounding shows, and stays small
    decode = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    levels = {a.i for n in decode.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    assert len(generate_json(out, PROMPT_IDS, 6)["output_ids"]) >= 1
    mixed = tmp_path / "mixed"  # int8 activations in the decode graph only
    run = cli("pop-export", "--model", "tiny-llama", "--out", mixed, "--weights", "int4", "--weights-compute",
              "int8-decode", timeout=600)
    assert run.returncode == 0, run.stderr
    record = json.loads((mixed / "pop_manifest.json").read_text())["weights"]["quantization"]
    assert record["accuracy_level"] == {"prefill": 1, "decode": 4} and record["int8_compute_error"]
    # a manifest's prompt_accuracy_level 1 (not written by default: measured slower on gemma3-270m) runs full
    # mode's prompt through a second session of the decode graph in fp32 products, single-token steps in
    # int8: its first logits are the fp32-product export's, its next ones are not
    assert record.get("prompt_accuracy_level") is None
    opted = shutil.copytree(mixed, tmp_path / "opted")
    manifest = json.loads((opted / "pop_manifest.json").read_text())
    manifest["weights"]["quantization"]["prompt_accuracy_level"] = 1
    (opted / "pop_manifest.json").write_text(json.dumps(manifest))
    sessions = {name: PopSession.load(d) for name, d in (("mixed", opted), ("int8", out),
                                                          ("fp32", exports("tiny-llama", weights="int4")))}
    assert "decode (prompt)" in sessions["mixed"].backend.sessions
    assert "decode (prompt)" not in sessions["int8"].backend.sessions
    logits = {name: _logits(s, PROMPT_IDS, 3) for name, s in sessions.items()}
    np.testing.assert_allclose(logits["mixed"][0], logits["fp32"][0], atol=1e-4 * np.abs(logits["fp32"][0]).max())
    assert np.abs(logits["int8"][0] - logits["fp32"][0]).max() > 1e-4 * np.abs(logits["fp32"][0]).max()
    assert np.abs(logits["mixed"][1] - logits["fp32"][1]).max() > 1e-4 * np.abs(logits["fp32"][1]).max()
    for graph, level in record["accuracy_level"].items():
        model = onnx.load(str(mixed / f"{graph}.onnx"), load_external_data=False)
        assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "accuracy_level"} == {level}


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False), (8, False)])
def test_derived_int8_matrix_is_the_stored_weight_to_half_a_step(bits, symmetric):
    """The int8 matrix an int8-gemm prefill graph multiplies by, derived from a MatMulNBits weight's bytes, against
    that weight as ONNX Runtime's own MatMulNBits kernel reads it (the product with the identity): every value
    within half of its column's step, each column's largest at +-127.  K = 80 pads the last block; 3 blocks
    per row leave the packed 4-bit zero points half a byte of padding."""
    rng = np.random.default_rng(bits + 2 * symmetric)
    s = quantize.Scheme(bits, 32, symmetric=symmetric)
    k, n = 80, 48
    w = rng.standard_normal((k, n)).astype(np.float32) + (0 if symmetric else 0.7)
    w[:, 5] = 0  # a column of zeros: scale 1, codes 0
    codes, scales, zeros = quantize.quantize(np.ascontiguousarray(w.T), s)
    packed, zp = quantize.pack(codes, s), None if symmetric else quantize.pack_zeros(zeros, s).reshape(-1)
    extra = {} if symmetric else {"z": zp}
    stored = _run(helper.make_node("MatMulNBits", ["x", "b", "s", *extra], ["y"], domain="com.microsoft", K=k, N=n,
                                   bits=bits, block_size=32, accuracy_level=1),
                  [("x", TensorProto.FLOAT, np.eye(k, dtype=np.float32))],
                  {"b": packed, "s": scales.reshape(-1), **extra}, [k, n])
    weight, scale = derived.int8_per_channel(packed, scales.reshape(-1), zp, k, n, bits, 32)
    assert weight.shape == (k, n) and weight.dtype == np.int8 and scale.shape == (n,)
    assert np.abs(weight.astype(np.float32) * scale - stored).max(axis=0).max() <= scale.max() / 2 * 1.0001
    assert (np.abs(weight.astype(np.float32) * scale - stored) <= scale / 2 * 1.0001 + 1e-12).all()
    amax = np.abs(weight).max(axis=0)
    assert amax[5] == 0 and scale[5] == 1 and (np.delete(amax, 5) == 127).all()
    # and from the bytes of a weights file, at the offsets a manifest records
    file = np.concatenate([np.zeros(7, np.uint8), packed.reshape(-1), scales.reshape(-1).view(np.uint8),
                           *([] if symmetric else [zp])])
    entry = DerivedTensor("w.int8", "w.int8_scale", k, n, 7, 7 + packed.size,
                          None if symmetric else 7 + packed.size + scales.size * 4)
    again = derived.derive(entry, file, bits, 32)
    assert (again[0] == weight).all() and (again[1] == scale).all()
    with pytest.raises(ValueError, match="weights file"):
        derived.derive(DerivedTensor("w.int8", "w.int8_scale", k, n, len(file), 0), file, bits, 32)


def resident_pages(pages: mmap.mmap):
    """How many pages of a mapping are in memory (mincore(2))."""
    return resident_bytes(np.frombuffer(pages, np.uint8)) // mmap.PAGESIZE


def test_a_session_for_one_mode_opens_only_its_graphs(exports):
    """modes: a session for POP mode leaves full mode's prompt graph unopened, one for full mode the prefill
    graph (each ONNX Runtime session packs its own weights: on smollm2-135m int4 the prompt graph's session
    held about 180 MB, benchmarks/capacity), with the same tokens; a mode it was not loaded for is one line,
    from the session and from an engine."""
    from pop.runtime.engine import Engine
    out = exports("tiny-llama", weights="int4", weights_compute="int8-gemm", weights_asymmetric=False)
    both = PopSession.load(out)
    assert set(both.backend.sessions) == {"prefill", "decode", "prompt"}
    one = {"pop": PopSession.load(out, modes=("pop",)), "full": PopSession.load(out, modes=["full"])}
    assert set(one["pop"].backend.sessions) == {"prefill", "decode"}
    assert set(one["full"].backend.sessions) == {"decode", "prompt"}
    for mode, other in (("pop", "full"), ("full", "pop")):
        session = one[mode]
        assert session.generate(PROMPT_IDS, 8, mode).output_ids == both.generate(PROMPT_IDS, 8, mode).output_ids
        for refused in (lambda: session.generate(PROMPT_IDS, 2, other), lambda: Engine(session, mode=other)):
            with pytest.raises(PopError, match=f"loaded for {mode} mode only, without the graphs of {other} mode: "
                                               f"load it with modes including '{other}'"):
                refused()
    with pytest.raises(PopError, match="unknown mode 'fast'"):
        PopSession.load(out, modes=("pop", "fast"))
    with pytest.raises(PopError, match="no mode given"):
        PopSession.load(out, modes=())


def test_int8_gemm_prefill_multiplies_in_integers_over_weights_derived_at_load(tmp_path, exports):
    """--weights-compute int8-gemm: POP's prefill graph, and "prompt", the decode graph's copy that runs full mode's
    prompt, run their products as MatMulInteger over int8 matrices the folder does not hold (the runtime derives
    them at load from the 4-bit weights the decode graph reads; the output matrix stays MatMulNBits); the
    decode graph's single-token steps stay MatMulNBits with int8 activations.  The export verified with fp32
    products first and records how far the switch moved it; the runtime's POP and full-mode logits are near
    the fp32-product export's of the same weights (and not equal: the integer products run), after the runtime
    has given the pages of its own derived matrices back (ONNX Runtime holds its copies); a damaged manifest
    fails in one line."""
    # symmetric: a tiny model's zero points are small enough for the graph to hold them, and a weight whose
    # parts the graph holds gets its int8 form made at export, not derived at load (real models' are derived)
    out = exports("tiny-llama", weights="int4", weights_compute="int8-gemm", weights_asymmetric=False)
    exact = exports("tiny-llama", weights="int4", weights_asymmetric=False)  # the same weights, fp32 products
    manifest = json.loads((out / "pop_manifest.json").read_text())
    q = manifest["weights"]["quantization"]
    assert manifest["schema_version"] == 6 and manifest["verification"]["passed"]
    assert q["integer_graphs"] == ["prefill", "prompt"] and q["accuracy_level"] == {"decode": 4}
    assert all(1e-4 < e < 0.2 for e in q["int8_compute_error"].values()), q["int8_compute_error"]
    assert manifest["graphs"]["prompt"]["inputs"] == manifest["graphs"]["decode"]["inputs"]
    graphs = {g: onnx.load(str(out / f"{g}.onnx"), load_external_data=False) for g in ("prefill", "prompt", "decode")}
    ops = {g: [n.op_type for n in m.graph.node] for g, m in graphs.items()}
    assert "MatMulNBits" not in ops["prefill"] and ops["prompt"].count("MatMulNBits") == 1  # the output matrix
    for g in ("prefill", "prompt"):
        assert ops[g].count("MatMulInteger") == q["operators"][g]["MatMulInteger"] > 0
    assert ops["prompt"].count("MatMulInteger") + 1 == ops["decode"].count("MatMulNBits")
    assert ops["decode"].count("MatMulNBits") == q["operators"]["decode"]["MatMulNBits"]
    for g in ("prefill", "prompt"):
        at_load = {t.name for t in graphs[g].graph.initializer
                   if t.data_location == TensorProto.EXTERNAL and t.external_data[0].value == derived.DERIVED}
        assert at_load and at_load == {e[key] for e in q["derived"] if e["graph"] == g for key in ("weight", "scale")}
    assert (out / "weights.bin").stat().st_size == (exact / "weights.bin").stat().st_size  # nothing stored twice

    given_back = PopSession.load(out).backend._derived_pages
    assert given_back and not any(resident_pages(pages) for pages in given_back)

    def first_logits(directory, mode):
        session, got, graphs = PopSession.load(directory), [], []
        run = session.backend.run
        session.backend.run = lambda graph, *a: graphs.append(graph) or run(graph, *a)
        for _ in session.steps(PROMPT_IDS, 1, mode, lambda l: got.append(l[0].copy()) or [0]):
            pass
        return got[0], graphs
    for mode, graphs_run in (("pop", ["prefill", "decode"]), ("full", ["prompt"])):
        (ours, ran), (reference, _) = first_logits(out, mode), first_logits(exact, mode)
        scale = np.abs(reference).max()
        assert ran == graphs_run and 1e-4 * scale < np.abs(ours - reference).max() < 0.2 * scale, mode

    bad = shutil.copytree(out, tmp_path / "bad")
    edited = json.loads((bad / "pop_manifest.json").read_text())
    edited["weights"]["quantization"]["derived"][0]["codes_offset"] = 10 ** 12
    (bad / "pop_manifest.json").write_text(json.dumps(edited))
    with pytest.raises(PopError, match="weights.bin: .*derives from bytes .*: corrupt artifacts") as e:
        PopSession.load(bad)
    assert "\n" not in str(e.value)
    edited["weights"]["quantization"]["derived"] = edited["weights"]["quantization"]["derived"][1:]
    (bad / "pop_manifest.json").write_text(json.dumps(edited))
    with pytest.raises(PopError, match="prefill.onnx reads .*, which the manifest does not say how to derive"):
        PopSession.load(bad)
    with pytest.raises(PopError, match="multiplies in integers .*--backend ort"):  # before any CUDA is looked for
        OrtBackend(out, Manifest.load(out), BackendOptions(), device="cuda")
