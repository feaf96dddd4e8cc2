"""Trace the POP graphs (and a VLM's vision graph) with torch.onnx (dynamo) and store their weights once.

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

from .pop import PopDecode, PopPrefill, extra_inputs

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
    if adapter.position_axes > 1:
        pos = pos[None].expand(adapter.position_axes, batch, seq).contiguous()
    mask = torch.ones(past + seq, batch, dtype=torch.long)
    kv = [torch.zeros(past, batch, adapter.num_kv_heads, adapter.head_dim, dtype=dtype)
          for _ in range(2 * adapter.num_layers)]
    return ids, pos, mask, kv


def _extra_sample(adapter, batch, seq, total, dtype, dims):
    """Sample values and dynamic axes of the family's extra inputs (pop.extra_inputs)."""
    hidden = adapter.cfg.hidden_size
    image_tokens = 3  # placed in both rows and across the batch boundary of the flat index
    values, axes = [], []
    for name in extra_inputs(adapter):
        if name == "token_groups":
            groups = torch.zeros(total, batch, dtype=torch.long)
            groups[-seq + 1:-seq + 3, 0] = 1
            values.append(groups), axes.append({0: dims["total"], 1: dims["batch"]})
        elif name == "image_embeds":
            values.append(torch.randn(image_tokens, hidden, dtype=dtype)), axes.append({0: dims["image_tokens"]})
        elif name == "image_index":
            values.append(torch.tensor([1, 2, seq + 1])), axes.append({0: dims["image_tokens"]})
        elif name == "deepstack_embeds":
            values.append(torch.randn(adapter.deepstack_layers, image_tokens, hidden, dtype=dtype))
            axes.append({1: dims["image_tokens"]})
    return values, axes


def _quiet_tracer():
    import logging
    # the exporter lists every torchvision op it cannot register; pop uses none
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _export(module, args, input_names, output_names, dynamic_shapes):
    return torch.onnx.export(module.eval(), tuple(args), input_names=list(input_names),
                             output_names=list(output_names), dynamic_shapes=tuple(dynamic_shapes),
                             dynamo=True, opset_version=OPSET, optimize=True, verbose=False).model


def trace(adapter, keep_layers, max_seq_len, dtype, progress=print, heads=None):
    """Returns {graph name: onnx_ir.Model}: prefill and decode, and vision for VLMs.
    heads: fitted KV heads for the prefill graph (exporter/fitted_heads.py), or None."""
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=max_seq_len)
    past, total = Dim("past", min=0, max=max_seq_len), Dim("total", min=1, max=max_seq_len)
    image_tokens = Dim("image_tokens", min=1, max=1024 * max_seq_len)
    past_names, present_names = io_names(adapter.num_layers)
    ids, pos, mask, kv = _sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST, dtype)
    pos_axes = {0: batch, 1: seq} if adapter.position_axes == 1 else {1: batch, 2: seq}
    extra = extra_inputs(adapter)
    graphs = {}
    _quiet_tracer()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if adapter.image_inputs:
            vision = adapter.vision_graph()
            progress(f"tracing the vision graph ({type(vision).__name__})")
            sample = vision.sample()
            first = Dim("patches", min=1, max=1 << 20) if len(sample) > 1 else Dim("images", min=1, max=1024)
            graphs["vision"] = _export(vision, sample, vision.input_names, vision.output_names,
                                       [{0: first} for _ in sample])
        progress(f"tracing the prefill graph ({keep_layers} layers + {adapter.num_layers - keep_layers} KV heads)")
        dims = {"batch": batch, "total": seq, "image_tokens": image_tokens}
        values, axes = _extra_sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_SEQ, dtype, dims)
        graphs["prefill"] = _export(
            PopPrefill(adapter, keep_layers, heads), (ids, pos, mask[SAMPLE_PAST:], *values),
            ["input_ids", "position_ids", "attention_mask", *extra], present_names,
            ({0: batch, 1: seq}, pos_axes, {0: seq, 1: batch}, *([tuple(axes)] if axes else [])))  # *extra: one entry
        progress(f"tracing the decode graph ({adapter.num_layers} layers)")
        dims["total"] = total
        values, axes = _extra_sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_SEQ + SAMPLE_PAST, dtype, dims)
        graphs["decode"] = _export(
            PopDecode(adapter), (ids, pos, mask, *values, *kv),
            ["input_ids", "position_ids", "attention_mask", *extra, *past_names], ["logits", *present_names],
            ({0: batch, 1: seq}, pos_axes, {0: total, 1: batch}, (*axes, *({0: past, 1: batch} for _ in kv))))
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
