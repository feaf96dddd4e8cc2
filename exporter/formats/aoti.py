"""Compile the POP graphs with AOTInductor: prefill.pt2 and decode.pt2 over one weights file.

The same two wrapper modules as the ONNX path (exporter/pop.py), with the same
dynamic axes, go through torch.export and torch._inductor.aoti_compile_and_package.
The packages hold code only (aot_inductor.package_constants_in_so=False): every
weight is written once into weights.bin, and the manifest's `weights.tensors`
index says where each one lies under its state-dict name, which is the name
AOTInductor asks for (get_constant_fqns).  A runtime memory-maps weights.bin
and hands the same tensors to both packages (load_constants, user-managed), so
the weights are held once on disk and once in memory, as for ONNX.

Compiled for CUDA where torch sees a GPU, for the CPU otherwise: a package
runs only on the device it was compiled for, which the manifest records.
"""
import time
import warnings
from pathlib import Path

import torch

from pop.runtime.errors import PopError
from pop.runtime.manifest import Graph, TensorSpec, Weights, WeightTensor

from .onnx import ALIGN, WEIGHTS
from .plan import ROLES, plans

FORMAT = "aoti"
# The export runs size-oblivious (sizes 0 and 1 are not special-cased, as the ONNX
# exporter does), which leaves runtime asserts that the graph is not at such sizes.
# They hold for the trace sample only: past = 0 and T = 1 are exactly POP's
# boundary and decode steps, which verification runs, so the asserts are dropped.
INDUCTOR_CONFIGS = {"scalar_asserts": False, "aot_inductor.package_constants_in_so": False}


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def export_program(module, args, dynamic_shapes):
    """torch.export of one graph module as AOTInductor compiles it (also what the GPU check diagnoses)."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(module.eval(), tuple(args), dynamic_shapes=tuple(dynamic_shapes), strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)


def _describe(ep, input_names, output_names, axes_by_input):
    """{inputs, outputs} as the manifest writes them: symbolic axes by name."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in {s.arg.name for s in ep.graph_signature.input_specs
                                   if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}]
    symbols = {}
    for node, axes in zip(placeholders, axes_by_input):
        for i, dim in (axes or {}).items():
            symbols[str(node.meta["val"].shape[i])] = dim.__name__

    def one(name, val):
        shape = [int(s) if str(s).isdigit() else symbols.get(str(s), str(s)) for s in val.shape]
        return TensorSpec(name, str(val.dtype).removeprefix("torch."), shape)
    outputs = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    return {"inputs": [one(name, n.meta["val"]) for name, n in zip(input_names, placeholders)],
            "outputs": [one(name, n.meta["val"]) for name, n in zip(output_names, outputs)]}


def _write_weights(modules, out_dir: Path):
    """Every tensor the packages ask for, once, 64-byte aligned; returns the manifest's index."""
    tensors, by_storage = [], {}
    with open(out_dir / WEIGHTS, "wb") as f:
        for module in modules:
            for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
                if any(e.name == name for e in tensors):
                    continue
                t = t.detach().contiguous().cpu()
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
                if key not in by_storage:  # tied weights (embeddings = lm_head) are stored once
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    by_storage[key] = f.tell()
                    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                tensors.append(WeightTensor(name, by_storage[key], t.numel() * t.element_size(),
                                            str(t.dtype).removeprefix("torch."), list(t.shape)))
    stored = sum({e.offset: e.bytes for e in tensors}.values())
    return tensors, stored


class AotiFormat:
    """AOTInductor packages, one per graph, over one weights.bin; run by torch's loader or the C++ runtime.
    The plain form: ONNX Runtime's operators do not exist in PyTorch."""
    name = "aoti"
    default_form = "plain"
    forms = ("plain",)

    def check(self, adapter):
        if adapter.image_inputs:
            raise PopError("--format aoti exports text models only for now; export vision-language models with "
                           "--format onnx")

    def write(self, job):
        """Writes prefill.pt2, decode.pt2 and weights.bin into job.directory; returns ({name: Graph}, Weights,
        trace seconds)."""
        where = device()
        t = time.perf_counter()
        graphs = {}
        try:  # the plans move the model to the device; it goes back to the CPU whatever happens
            graph_plans = plans(job.adapter, job.prefill_layers, job.max_seq_len, job.hf.dtype, job.heads, where,
                                "plain")
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                for plan in graph_plans:
                    job.progress(f"exporting the {plan.name} graph ({plan.what}) with torch.export")
                    ep = export_program(plan.module, plan.args, plan.dynamic_shapes)
                    job.progress(f"compiling the {plan.name} graph with AOTInductor for the {where.upper()} (minutes)")
                    torch._inductor.aoti_compile_and_package(ep, package_path=str(job.directory / f"{plan.name}.pt2"),
                                                             inductor_configs=INDUCTOR_CONFIGS)
                    graphs[plan.name] = Graph(f"{plan.name}.pt2", FORMAT, "plain", device=where, torch=torch.__version__,
                                              **_describe(ep, plan.input_names, plan.output_names,
                                                          plan.axes_by_input), role=ROLES[plan.name])
                    del ep
            job.progress("writing one shared weights file for both packages")
            tensors, stored = _write_weights([p.module for p in graph_plans], job.directory)
        finally:
            job.adapter.hf.to("cpu")
        referenced = sum(e.bytes for e in tensors)
        weights = Weights(WEIGHTS, (job.directory / WEIGHTS).stat().st_size, len({e.offset for e in tensors}),
                          referenced, stored, tensors)
        return graphs, weights, time.perf_counter() - t

    def finish(self, job, manifest):
        return {}, None
