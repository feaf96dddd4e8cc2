"""Trace the POP graphs (and a VLM's vision graph) with torch.onnx (dynamo) and store their weights once.

Both graphs are traced with dynamic batch, sequence and past axes.  The
exporter's optimizer folds constants (transposed Linear weights, for example)
into new initializers with different names in each graph, so weights are
shared by content: every distinct tensor is written once into weights.bin, and
both graphs point at the same bytes through standard ONNX external data.
"""
import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from pop.runtime.errors import PopError
from pop.runtime.manifest import Graph, Quantization, TensorSpec, Weights

from .. import quantize
from . import contrib
from .plan import ROLES, GraphPlan, plans

OPSET = 21  # 18..21 work; at 23 a fused RotaryEmbedding breaks ORT for batch > 1
WEIGHTS = "weights.bin"
ALIGN = 64
INLINE_BELOW = 1024  # bytes; tiny constants stay inside the graph files


def _quiet_tracer():
    import logging
    # the exporter lists every torchvision op it cannot register; pop uses none
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _export(plan: GraphPlan, table):
    return torch.onnx.export(plan.module.eval(), tuple(plan.args), input_names=list(plan.input_names),
                             output_names=list(plan.output_names), dynamic_shapes=tuple(plan.dynamic_shapes),
                             dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
                             custom_translation_table=table).model


def trace(adapter, prefill_layers, max_seq_len, dtype, progress=print, heads=None, form="fused"):
    """Returns ({graph name: onnx_ir.Model}, {graph name: GraphPlan}): prefill and decode, and vision
    for VLMs.  heads: fitted KV heads for the prefill graph (exporter/fitted_heads.py), or None.
    form: "fused" (ONNX Runtime's contrib operators) or "plain" (standard operators only)."""
    graphs, graph_plans = {}, {}
    _quiet_tracer()
    table = contrib.translations() if form == "fused" else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for plan in plans(adapter, prefill_layers, max_seq_len, dtype, heads, form=form):
            progress(f"tracing the {plan.name} graph ({plan.what}, {form} form)")
            graphs[plan.name], graph_plans[plan.name] = _export(plan, table), plan
    return graphs, graph_plans


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
                # by bytes and type, not shape: a quantized table is one tensor to the embedding's gather
                # and another shape to the output matrix's product, and is stored once
                key = hashlib.sha1(raw).hexdigest() + str(array.dtype)
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


def describe(path: Path, plan: GraphPlan, form: str) -> Graph:
    """The manifest's entry for a saved graph: names, dtypes and symbolic shapes of its IO, and which
    outputs the graph writes into an input's buffer."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        return TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                          [d.dim_param or d.dim_value for d in t.shape.dim], plan.aliases.get(v.name))
    return Graph(path.name, "onnx", form, OPSET,
                 inputs=[one(v) for v in model.graph.input], outputs=[one(v) for v in model.graph.output],
                 role=ROLES[plan.name])


def _quantize(graphs, job) -> Quantization:
    """The text graphs' on-grid matrices as MatMulNBits, a tied table as GatherBlockQuantized (vision
    graphs keep their precision)."""
    s, made, used = job.scheme, {}, set()
    for name in ("prefill", "decode"):
        n = quantize.rewrite(graphs[name], s, job.grids)
        made[name] = {"MatMulNBits": n["matmuls"], "GatherBlockQuantized": n["gathers"]}
        used |= n["weights"]
        job.progress(f"{name} graph: {n['matmuls']} matrix products and {n['gathers']} embedding gathers "
                     f"read {s.bits}-bit weights")
    if len(used) < len(job.grids):  # the folder would hold float weights it claims are quantized
        raise PopError(f"{len(job.grids) - len(used)} of {len(job.grids)} quantized weight rows were not found "
                       f"in the graphs' products: an exporter bug, nothing was written")
    tied = all(m["GatherBlockQuantized"] for m in made.values())
    return Quantization(job.options.weights, s.bits, s.block, s.symmetric, {name: 1 for name in made}, made,
                        "quantized, shared with the output matrix" if tied else "float32",
                        output_matrix="float32" if s.keep_embedding else "quantized")


class OnnxFormat:
    """ONNX graphs (torch.onnx, dynamo) over one weights.bin, run by ONNX Runtime: the fused form."""
    name = "onnx"
    default_form = "fused"
    forms = ("fused", "plain")

    def check(self, adapter):
        pass  # every family exports to ONNX

    def write(self, job):
        """Traces the graphs into job.directory; returns ({name: Graph}, Weights, trace seconds)."""
        t = time.perf_counter()
        form = job.options.graph_form or self.default_form
        graphs, graph_plans = trace(job.adapter, job.prefill_layers, job.max_seq_len, job.hf.dtype, job.progress,
                                    job.heads, form)
        trace_s = time.perf_counter() - t
        quantization = _quantize(graphs, job) if job.scheme else None
        job.progress("writing one shared weights file for both graphs")
        stored = save_shared(graphs, job.directory)
        specs = {name: describe(job.directory / f"{name}.onnx", graph_plans[name], form) for name in graphs}
        weights = Weights(WEIGHTS, (job.directory / WEIGHTS).stat().st_size, stored["unique_tensors"],
                          stored["referenced_bytes"], stored["stored_bytes"], quantization=quantization)
        return specs, weights, trace_s

    def finish(self, job, manifest):
        """Nothing beyond the graphs: ({} engines, no deferred error)."""
        return {}, None
