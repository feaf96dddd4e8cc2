"""Build TensorRT engines from the exported ONNX graphs.

Written against NVIDIA's documented Python API (TensorRT 10+): strongly typed
networks (precision comes from the ONNX dtypes; TensorRT 11 dropped weakly
typed ones) and one explicit optimization profile per graph, whose min/opt/max
come from the symbolic axes the manifest records.  TensorRT cannot be
installed everywhere; `available()` says why it is missing, and nothing here
pretends to build an engine without it.
"""
import functools
import json
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


def axis_ranges(max_batch, max_seq_len, vision=None):
    """min/opt/max per symbolic axis.  opt is the common serving case: one
    prompt of a few hundred tokens for prefill, one token for decode.
    `vision` is the manifest's vision section (VLMs), whose encoder says how
    many patches make one token and, for fixed-size towers, tokens per image."""
    ranges = {
        "batch": (1, 1, max_batch),
        "seq": (1, min(512, max_seq_len), max_seq_len),
        "total": (1, min(513, max_seq_len), max_seq_len),  # the plain decode graph's cache_slots: total >= seq
    }
    if vision is None:
        return ranges
    tokens = max_batch * max_seq_len  # every new token of every row may be an image token
    per_token = vision.encoder.merge  # patches per LLM token
    per_image = vision.encoder.tokens_per_image or 1
    return {
        **ranges,
        # min 0: decode steps and text-only prompts pass empty image tensors.  opt 0 too: that is the
        # hot path, and the merge is a gather/scatter whose cost hardly depends on this axis.
        "image_tokens": (0, 0, tokens),
        # The vision graph runs once over the images of all rows together (runtime/multimodal.py), so
        # its bound follows the image tokens' bound; a smaller max would refuse legal requests.
        # opt: one image of 256 tokens.
        "patches": (per_token, per_token * min(256, tokens), per_token * tokens),
        "images": (1, 1, max(1, tokens // per_image)),
    }


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


def build_engine(onnx_path: Path, engine_path: Path, graph, ranges: dict, workspace_gib=4):
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves weights.bin next to the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PopError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    profile = builder.create_optimization_profile()
    for tensor in graph.inputs:
        shapes = [[ranges[d][i] if isinstance(d, str) else d for d in tensor.shape] for i in range(3)]
        profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise PopError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(engine))
    # an engine runs only under the TensorRT version and on the GPU that built it; the runtime checks both
    from pop.runtime.backends.cuda import device_info
    return Engine(engine_path.name, trt.__version__, device_info(), {k: list(v) for k, v in ranges.items()})


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
        ok, why = available()
        if not ok:
            return {}, (f"no TensorRT engine was built: {why}. The verified ONNX graphs are in {job.out}; build "
                        f"engines on a machine with an NVIDIA GPU and TensorRT 10+ (pip install .[trt])")
        ranges = axis_ranges(job.options.max_batch, job.max_seq_len, manifest.vision)
        engines = {}
        for name, graph in manifest.graphs.items():
            job.progress(f"building the TensorRT engine for {name}")
            engines[name] = build_engine(job.directory / graph.file, job.directory / f"{name}.engine", graph, ranges)
        return engines, None
