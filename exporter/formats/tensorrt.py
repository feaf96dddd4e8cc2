"""Build TensorRT engines from the exported ONNX graphs.

Written against NVIDIA's documented Python API (TensorRT 10 and 11): strongly
typed networks (precision comes from the ONNX dtypes; TensorRT 11 dropped weakly
typed ones), explicit optimization profiles per graph (`profiles`), checked on
the CPU against the graph's own shape relations before any build, TF32 off
unless asked for, and one timing cache shared by the engines of an export.
TensorRT cannot be installed everywhere; `available()` says why it is missing,
and nothing here pretends to build an engine without it.
"""
import functools
import json
import logging
from pathlib import Path

from pop.runtime.errors import PopError
from pop.runtime.manifest import Engine

from .onnx import OnnxFormat

OPS_FILE = Path(__file__).with_name("tensorrt_onnx_ops.json")  # ONNX-TensorRT's operator matrix, with its source


def available():
    """(True, version) or (False, reason)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the wheel's missing CUDA libraries
        return False, f"the tensorrt Python package cannot be imported ({type(e).__name__}: {e})"
    return True, trt.__version__


def _vision_axes(vision, max_batch, max_seq_len):
    """min/opt/max of the image axes.  `vision` is the manifest's vision section: its encoder says how
    many patches make one token and, for fixed-size towers, tokens per image."""
    tokens = max_batch * max_seq_len  # every new token of every row may be an image token
    per_token = vision.encoder.merge  # patches per LLM token
    per_image = vision.encoder.tokens_per_image or 1
    return {
        # min 0: decode steps and text-only prompts pass empty image tensors.  opt 0 too: that is the
        # hot path, and the merge is a gather/scatter whose cost hardly depends on this axis.
        "image_tokens": (0, 0, tokens),
        # The vision graph runs once over the images of all rows together (runtime/multimodal.py), so
        # its bound follows the image tokens' bound; a smaller max would refuse legal requests.
        # opt: one image of 256 tokens.
        "patches": (per_token, per_token * min(256, tokens), per_token * tokens),
        "images": (1, 1, max(1, tokens // per_image)),
    }


def profiles(graph, max_batch, max_seq_len, vision=None):
    """The optimization profiles of one graph: [{axis: (min, opt, max)}].  TensorRT tunes each
    profile's kernels at its opt shapes, so each profile is one way the runtime calls the graph:

      prefill   a prompt of a few hundred tokens (prompt[:-1] in POP mode);
      decode    0: one new token per row over a past of about 1k slots (every step after the first:
                   the hot path);  1: a whole prompt from an empty past (full mode, --mode full).

    Every min, opt and max satisfies the graph's own shape relations (`check_relations`): the plain
    decode graph reads cache_slots [total] and its past is total - seq, so total >= seq."""
    n = max_seq_len
    extra = _vision_axes(vision, max_batch, n) if vision is not None else {}
    batch = {"batch": (1, 1, max_batch)}
    if graph == "decode":
        steps = {"seq": (1, 1, n), "total": (1, min(1024, n), n)}
        prompts = {"seq": (1, min(512, n), n), "total": (1, min(512, n), n)}
        return [{**batch, **steps, **extra}, {**batch, **prompts, **extra}]
    return [{**batch, "seq": (1, min(512, n), n), **extra}]


def _without_weights(model, folder):
    """The graph with its float weights turned into inputs of their fixed shape: shape inference needs
    their shapes, not their gigabytes.  Other external initializers (integer constants, small) are read."""
    import onnx
    from onnx import helper
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    keep = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            keep.append(t)
        elif t.data_type in floats:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(folder))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            keep.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def relations(onnx_path):
    """What a profile must satisfy for the graph's shapes to make sense, from the ONNX graph itself:
    ONNX Runtime's symbolic shape inference (sympy) propagates the inputs' symbolic axes through every
    node.  Returns (equal, nonnegative): pairs of input axes it found must be equal, and the expressions
    of every intermediate axis that is not a plain input axis, with what slices clamp at 0 (the plain
    decode graph's past, total - seq), none of which may be negative."""
    import onnx
    import sympy
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    model = _without_weights(onnx.load(str(onnx_path), load_external_data=False), Path(onnx_path).parent)
    axes = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    log = logging.getLogger(SymbolicShapeInference.__module__)
    level, log.level = log.level, logging.ERROR  # it warns of every slice whose sign it cannot decide
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
    finally:
        log.setLevel(level)
    equal = set()
    for before, after in zip(model.graph.input, inferred.graph.input):  # auto_merge renames an input axis
        for a, b in zip(before.type.tensor_type.shape.dim, after.type.tensor_type.shape.dim):  # it proved equal
            if a.dim_param and b.dim_param != a.dim_param:
                equal.add((a.dim_param, b.dim_param or str(b.dim_value)))
    expressions = set()
    for v in [*inferred.graph.value_info, *inferred.graph.output]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param and d.dim_param not in axes:
                try:
                    e = sympy.sympify(d.dim_param)
                except (sympy.SympifyError, TypeError, SyntaxError):
                    continue
                if e.free_symbols and {str(x) for x in e.free_symbols} <= axes:
                    expressions.add(e)
                    # a slice's length comes out as Max(0, end - start): the graph would silently read an
                    # empty or shorter range, so its argument is the relation (past = total - seq >= 0)
                    for m in e.atoms(sympy.Max):
                        if 0 in m.args:
                            expressions.update(a for a in m.args if a != 0)
    return equal, sorted(expressions, key=str)


def check_relations(onnx_path, profile):
    """[] when min, opt and max of the profile each satisfy the graph's relations; else one line each."""
    import sympy
    equal, expressions = relations(onnx_path)
    problems = []
    for i, point in enumerate(("min", "opt", "max")):
        values = {sympy.Symbol(axis): r[i] for axis, r in profile.items()}
        for a, b in equal:
            if profile[a][i] != profile[b][i]:
                problems.append(f"{point}: {a} = {profile[a][i]} but must equal {b} = {profile[b][i]}")
        for e in expressions:
            value = e.subs(values)
            if value.is_number and value < 0:
                problems.append(f"{point}: axis {e} = {value} is negative")
    return problems


@functools.cache
def support_matrix():
    return json.loads(OPS_FILE.read_text())


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def unsupported(onnx_path):
    """One line per reason TensorRT's ONNX parser would refuse this graph, judged on CPU from
    the operator matrix (types and per-op restrictions are not checked); [] when none."""
    import onnx
    matrix = support_matrix()
    source, ops = matrix["source"], matrix["operators"]
    where = f"ONNX-TensorRT's operator matrix for TensorRT {source['tensorrt']}"
    model = onnx.load(str(onnx_path), load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not source["opset_min"] <= opset <= source["opset_max"]:
        problems.append(f"default-domain opset {opset} is outside {source['opset_min']}..{source['opset_max']} ({where})")
    # TensorRT inlines model-local functions, so their bodies are what it must parse
    local = {(f.domain, f.name) for f in model.functions}
    nodes = [*_nodes(model.graph), *(n for f in model.functions for n in _nodes(f))]
    counts = {}
    for node in nodes:
        reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
        if node.op_type == "ScatterND" and reduction != "none":
            # the matrix's restriction: "`reduction` other than `none` is not supported"
            problems.append(f"{node.op_type} with reduction={reduction}: not supported ({where})")
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (node.domain, node.op_type) not in local:
            counts[domain, node.op_type] = counts.get((domain, node.op_type), 0) + 1
    for (domain, op), n in sorted(counts.items()):
        if domain:
            problems.append(f"{op} (domain {domain}, {n} nodes): not a standard ONNX operator; TensorRT needs a plugin")
        elif op not in ops:
            problems.append(f"{op} ({n} nodes): not listed in {where}")
        elif not ops[op]["supported"]:
            problems.append(f"{op} ({n} nodes): marked unsupported in {where}")
    return problems


def input_shapes(graph, profile):
    """{input name: (min, opt, max) shapes} of one manifest graph under one profile."""
    return {t.name: [[profile[d][i] if isinstance(d, str) else d for d in t.shape] for i in range(3)]
            for t in graph.inputs}


def build_engine(onnx_path: Path, engine_path: Path, graph, graph_profiles: list, tf32=False, timing_cache=None,
                 workspace_gib=4):
    """Builds one engine with every profile; returns (Engine, the timing cache to pass to the next build)."""
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: precision comes from the ONNX dtypes (TensorRT 11 has no other kind, and no flag for it)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves weights.bin next to the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PopError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 layers would round to 10 bits
        config.clear_flag(trt.BuilderFlag.TF32)
    # one timing cache for all the engines of an export: the decode engine's layers are timed once
    cache = timing_cache or config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for one in graph_profiles:
        profile = builder.create_optimization_profile()
        for name, shapes in input_shapes(graph, one).items():
            profile.set_shape(name, *shapes)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise PopError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(engine))
    # an engine runs only under the TensorRT version and on the GPU that built it; the runtime checks both
    from pop.runtime.backends.cuda import device_info
    entry = Engine(engine_path.name, trt.__version__, device_info(),
                   [{k: list(v) for k, v in one.items()} for one in graph_profiles], tf32)
    return entry, config.get_timing_cache()


class TensorRTFormat(OnnxFormat):
    """The ONNX graphs in the plain form (TensorRT's parser knows no contrib operator), verified in ONNX
    Runtime, then a TensorRT engine per graph beside them."""
    name = "trt"
    default_form = "plain"
    forms = ("plain",)

    def finish(self, job, manifest):
        """({graph: Engine}, None), or ({}, why) when TensorRT is missing here: the verified ONNX graphs are
        still written, and the export fails after writing them."""
        problems = [f"{g.file}: {p}" for g in manifest.graphs.values() for p in unsupported(job.directory / g.file)]
        if problems:
            raise PopError("TensorRT cannot parse the exported graphs: " + "; ".join(problems))
        chosen = {name: profiles(name, job.options.max_batch, job.max_seq_len, manifest.vision)
                  for name in manifest.graphs}
        for name, graph in manifest.graphs.items():  # checked here too: no GPU is needed to find a bad profile
            bad = [p for one in chosen[name] for p in check_relations(job.directory / graph.file, one)]
            if bad:
                raise PopError(f"the {name} graph's optimization profile breaks its shape relations: {bad[0]}")
        ok, why = available()
        if not ok:
            return {}, (f"no TensorRT engine was built: {why}. The verified ONNX graphs are in {job.out}; build "
                        f"engines on a machine with an NVIDIA GPU and TensorRT 10+ (pip install .[trt])")
        engines, cache = {}, None
        for name, graph in manifest.graphs.items():
            job.progress(f"building the TensorRT engine for {name}")
            engines[name], cache = build_engine(job.directory / graph.file, job.directory / f"{name}.engine", graph,
                                                chosen[name], job.options.tf32, cache)
        return engines, None
