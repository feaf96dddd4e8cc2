"""Build TensorRT engines from the exported ONNX graphs.

Written against NVIDIA's documented Python API (TensorRT 10+): strongly typed
networks (precision comes from the ONNX dtypes; TensorRT 11 dropped weakly
typed ones) and one explicit optimization profile per graph, whose min/opt/max
come from the symbolic axes the manifest records.  TensorRT cannot be
installed everywhere; `available()` says why it is missing, and nothing here
pretends to build an engine without it.
"""
from pathlib import Path

from pop.runtime.errors import PopError


def available():
    """(True, version) or (False, reason)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the wheel's missing CUDA libraries
        return False, f"the tensorrt Python package cannot be imported ({type(e).__name__}: {e})"
    return True, trt.__version__


def axis_ranges(max_batch, max_seq_len):
    """min/opt/max per symbolic axis.  opt is the common serving case: one
    prompt of a few hundred tokens for prefill, one token for decode."""
    return {
        "batch": (1, 1, max_batch),
        "seq": (1, min(512, max_seq_len), max_seq_len),
        "past": (0, min(512, max_seq_len - 1), max_seq_len - 1),
        "total": (1, min(513, max_seq_len), max_seq_len),
    }


def build_engine(onnx_path: Path, engine_path: Path, io: dict, ranges: dict, workspace_gib=4):
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
    for tensor in io["inputs"]:
        shapes = [[ranges[d][i] if isinstance(d, str) else d for d in tensor["shape"]] for i in range(3)]
        profile.set_shape(tensor["name"], *shapes)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise PopError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(engine))
    return {"file": engine_path.name, "tensorrt": trt.__version__, "profile": {k: list(v) for k, v in ranges.items()}}
