"""Trace the two POP graphs with torch.onnx (dynamo) and store their weights once.

Both graphs are traced with dynamic batch, sequence and past axes.  The
exporter's optimizer folds constants (transposed Linear weights, for example)
into new initializers with different names in each graph, so weights are
shared by content: every distinct tensor is written once into weights.bin, and
both graphs point at the same bytes through standard ONNX external data.
"""
import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch.export import Dim

from .pop import PopDecode, PopPrefill

OPSET = 21  # 18..21 work; at 23 a fused RotaryEmbedding breaks ORT for batch > 1
WEIGHTS = "weights.bin"
ALIGN = 64
INLINE_BELOW = 1024  # bytes; tiny constants stay inside the graph files

# The trace sample; verification later uses other shapes on purpose.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 5, 7


def io_names(num_layers):
    cache = [f"{kv}_{l}" for l in range(num_layers) for kv in ("key", "value")]
    return [f"past_{c}" for c in cache], [f"present_{c}" for c in cache]


def _sample(adapter, batch, seq, past, dtype):
    ids = torch.randint(0, adapter.cfg.vocab_size, (batch, seq))
    pos = torch.arange(past, past + seq).repeat(batch, 1)
    mask = torch.ones(past + seq, batch, dtype=torch.long)
    kv = [torch.zeros(past, batch, adapter.num_kv_heads, adapter.head_dim, dtype=dtype)
          for _ in range(2 * adapter.num_layers)]
    return ids, pos, mask, kv


def _quiet_tracer():
    import logging
    # the exporter lists every torchvision op it cannot register; pop uses none
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def trace(adapter, keep_layers, max_seq_len, dtype, progress=print):
    """Returns {graph name: onnx_ir.Model} for the prefill and decode graphs."""
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=max_seq_len)
    past, total = Dim("past", min=0, max=max_seq_len), Dim("total", min=1, max=max_seq_len)
    past_names, present_names = io_names(adapter.num_layers)
    ids, pos, mask, kv = _sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST, dtype)
    graphs = {}
    _quiet_tracer()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        progress(f"tracing the prefill graph ({keep_layers} layers + {adapter.num_layers - keep_layers} KV heads)")
        graphs["prefill"] = torch.onnx.export(
            PopPrefill(adapter, keep_layers).eval(), (ids, pos, mask[SAMPLE_PAST:]),
            input_names=["input_ids", "position_ids", "attention_mask"], output_names=present_names,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: seq, 1: batch}),
            dynamo=True, opset_version=OPSET, optimize=True, verbose=False).model
        progress(f"tracing the decode graph ({adapter.num_layers} layers)")
        graphs["decode"] = torch.onnx.export(
            PopDecode(adapter).eval(), (ids, pos, mask, *kv),
            input_names=["input_ids", "position_ids", "attention_mask", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: total, 1: batch},
                            tuple({0: past, 1: batch} for _ in kv)),
            dynamo=True, opset_version=OPSET, optimize=True, verbose=False).model
    return graphs


def save_shared(graphs: dict, out_dir: Path) -> dict:
    """Write weights.bin once for all graphs, then each graph's .onnx file.

    Returns {"stored_bytes", "referenced_bytes", "unique_tensors"} for the manifest.
    """
    by_digest, stored, referenced = {}, 0, 0
    with open(out_dir / WEIGHTS, "wb") as f:
        for model in graphs.values():
            for name, value in list(model.graph.initializers.items()):
                array = value.const_value.numpy()
                raw = np.ascontiguousarray(array).tobytes()
                if len(raw) < INLINE_BELOW:
                    continue
                referenced += len(raw)
                key = hashlib.sha1(raw).hexdigest() + str(array.dtype) + str(array.shape)
                if key not in by_digest:
                    pad = -f.tell() % ALIGN
                    f.write(b"\0" * pad)
                    by_digest[key] = f.tell()
                    f.write(raw)
                    stored += len(raw)
                value.const_value = ir.ExternalTensor(
                    WEIGHTS, by_digest[key], len(raw), value.const_value.dtype,
                    shape=value.const_value.shape, name=name, base_dir=out_dir)
    for graph_name, model in graphs.items():
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            node.metadata_props.clear()  # the tracer's per-node debug notes: most of the file, no use to runtimes
        ir.save(model, out_dir / f"{graph_name}.onnx")
    return {"stored_bytes": stored, "referenced_bytes": referenced, "unique_tensors": len(by_digest)}


def describe_io(path: Path) -> dict:
    """Names, dtypes and symbolic shapes of a saved graph, for the manifest."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return {"inputs": [one(v) for v in model.graph.input], "outputs": [one(v) for v in model.graph.output]}
