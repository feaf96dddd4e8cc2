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
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from pop.runtime.errors import PopError

from .pop import PopDecode, PopPrefill
from .to_onnx import ALIGN, SAMPLE_BATCH, SAMPLE_PAST, SAMPLE_SEQ, WEIGHTS, _sample, io_names

FORMAT = "aoti"
# The export runs size-oblivious (sizes 0 and 1 are not special-cased, as the ONNX
# exporter does), which leaves runtime asserts that the graph is not at such sizes.
# They hold for the trace sample only: past = 0 and T = 1 are exactly POP's
# boundary and decode steps, which verification runs, so the asserts are dropped.
INDUCTOR_CONFIGS = {"scalar_asserts": False, "aot_inductor.package_constants_in_so": False}


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _export(module, args, dynamic_shapes):
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
        for i, dim in axes.items():
            symbols[str(node.meta["val"].shape[i])] = dim.__name__

    def one(name, val):
        shape = [int(s) if str(s).isdigit() else symbols.get(str(s), str(s)) for s in val.shape]
        return {"name": name, "dtype": str(val.dtype).removeprefix("torch."), "shape": shape}
    outputs = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    return {"inputs": [one(name, n.meta["val"]) for name, n in zip(input_names, placeholders)],
            "outputs": [one(name, n.meta["val"]) for name, n in zip(output_names, outputs)]}


def _write_weights(modules, out_dir: Path):
    """Every tensor the packages ask for, once, 64-byte aligned; returns the manifest's index."""
    tensors, by_storage = [], {}
    with open(out_dir / WEIGHTS, "wb") as f:
        for module in modules:
            for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
                if any(e["name"] == name for e in tensors):
                    continue
                t = t.detach().contiguous().cpu()
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
                if key not in by_storage:  # tied weights (embeddings = lm_head) are stored once
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    by_storage[key] = f.tell()
                    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                tensors.append({"name": name, "offset": by_storage[key], "bytes": t.numel() * t.element_size(),
                                "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)})
    stored = sum({e["offset"]: e["bytes"] for e in tensors}.values())
    return tensors, stored


def export(adapter, keep_layers, max_seq_len, dtype, out_dir: Path, progress=print, heads=None):
    """Writes prefill.pt2, decode.pt2 and weights.bin into out_dir.

    Returns ({graph: manifest entry}, {"tensors", "stored_bytes", "referenced_bytes", "unique_tensors"}).
    """
    if adapter.image_inputs:
        raise PopError("--backend aoti exports text models only for now; export vision-language models with "
                       "--backend onnx")
    where = device()
    # past + seq <= max_seq_len, and seq >= 1: torch.export wants the bound stated
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=max_seq_len)
    past, total = Dim("past", min=0, max=max_seq_len - 1), Dim("total", min=1, max=max_seq_len)
    past_names, present_names = io_names(adapter.num_layers)
    ids, pos, mask, kv = (x.to(where) if torch.is_tensor(x) else [t.to(where) for t in x]
                          for x in _sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST, dtype))
    adapter.hf.to(where)
    prefill, decode = PopPrefill(adapter, keep_layers, heads), PopDecode(adapter)
    if heads is not None:
        prefill.to(where)
    plans = {
        "prefill": (prefill, (ids, pos, mask[SAMPLE_PAST:]), ["input_ids", "position_ids", "attention_mask"],
                    present_names, ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: seq, 1: batch}), ()),
        "decode": (decode, (ids, pos, mask, *kv), ["input_ids", "position_ids", "attention_mask", *past_names],
                   ["logits", *present_names], ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: total, 1: batch}),
                   tuple({0: past, 1: batch} for _ in kv)),
    }
    graphs = {}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            for name, (module, args, inputs, outputs, axes, rest) in plans.items():
                progress(f"exporting the {name} graph with torch.export")
                ep = _export(module, args, (*axes, rest) if rest else axes)
                progress(f"compiling the {name} graph with AOTInductor for the {where.upper()} (minutes)")
                torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / f"{name}.pt2"),
                                                         inductor_configs=INDUCTOR_CONFIGS)
                graphs[name] = {"file": f"{name}.pt2", "format": FORMAT, "device": where,
                                "torch": torch.__version__,
                                **_describe(ep, inputs, outputs, [*axes, *rest])}
                del ep
        progress("writing one shared weights file for both packages")
        tensors, stored = _write_weights([prefill, decode], out_dir)
    finally:
        adapter.hf.to("cpu")
    referenced = sum(e["bytes"] for e in tensors)
    return graphs, {"tensors": tensors, "stored_bytes": stored, "referenced_bytes": referenced,
                    "unique_tensors": len({e["offset"] for e in tensors})}
