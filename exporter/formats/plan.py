"""What every artifact format traces: the POP graph modules, their IO names, a sample and the dynamic axes.

ONNX (torch.onnx, dynamo) and AOTInductor (torch.export) take the same plan, so
the graphs' contract (docs/MANIFEST.md) is written here once.  The sample's
shapes are deliberately unlike verification's, so that a shape frozen at trace
time shows up there.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from ..pop import PopDecode, PopPrefill, extra_inputs

SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 5, 7
ROLES = {"vision": "images -> embeddings of their placeholder tokens",
         "prefill": "prompt tokens 1..N-1: layers < K, KV heads for layers >= K",
         "decode": "full model over T >= 1 new tokens after a past cache"}


@dataclass
class GraphPlan:
    name: str
    module: nn.Module
    args: tuple  # the sample, one entry per input
    input_names: list
    output_names: list
    dynamic_shapes: tuple  # torch.export's form: one entry per forward() argument, varargs as one tuple
    what: str  # for progress lines

    @property
    def axes_by_input(self):
        """{axis index: Dim} for each input, in order (varargs flattened)."""
        out = []
        for entry in self.dynamic_shapes:
            out += list(entry) if isinstance(entry, tuple) else [entry]
        return out


def io_names(num_layers):
    cache = [f"{kv}_{l}" for l in range(num_layers) for kv in ("key", "value")]
    return [f"past_{c}" for c in cache], [f"present_{c}" for c in cache]


def _text_sample(adapter, batch, seq, past, dtype, device):
    ids = torch.randint(0, adapter.cfg.vocab_size, (batch, seq), device=device)
    pos = torch.arange(past, past + seq, device=device).repeat(batch, 1)
    if adapter.position_axes > 1:
        pos = pos[None].expand(adapter.position_axes, batch, seq).contiguous()
    mask = torch.ones(past + seq, batch, dtype=torch.long, device=device)
    kv = [torch.zeros(past, batch, adapter.num_kv_heads, adapter.head_dim, dtype=dtype, device=device)
          for _ in range(2 * adapter.num_layers)]
    return ids, pos, mask, kv


def _extra_sample(adapter, batch, seq, total, dtype, dims, device):
    """Sample values and dynamic axes of the family's extra inputs (pop.extra_inputs)."""
    hidden = adapter.cfg.hidden_size
    image_tokens = 3  # placed in both rows and across the batch boundary of the flat index
    values, axes = [], []
    for name in extra_inputs(adapter):
        if name == "token_groups":
            groups = torch.zeros(total, batch, dtype=torch.long, device=device)
            groups[-seq + 1:-seq + 3, 0] = 1
            values.append(groups), axes.append({0: dims["total"], 1: dims["batch"]})
        elif name == "image_embeds":
            values.append(torch.randn(image_tokens, hidden, dtype=dtype, device=device))
            axes.append({0: dims["image_tokens"]})
        elif name == "image_index":
            values.append(torch.tensor([1, 2, seq + 1], device=device)), axes.append({0: dims["image_tokens"]})
        elif name == "deepstack_embeds":
            values.append(torch.randn(adapter.deepstack_layers, image_tokens, hidden, dtype=dtype, device=device))
            axes.append({1: dims["image_tokens"]})
    return values, axes


def plans(adapter, prefill_layers, max_seq_len, dtype, heads=None, device="cpu"):
    """[GraphPlan] in export order: vision (VLMs), prefill, decode.
    heads: fitted KV heads for the prefill graph (exporter/fitted_heads.py), or None."""
    # past + seq <= max_seq_len and seq >= 1: the exporters want the bounds stated
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=max_seq_len)
    past, total = Dim("past", min=0, max=max_seq_len - 1), Dim("total", min=1, max=max_seq_len)
    image_tokens = Dim("image_tokens", min=1, max=1024 * max_seq_len)
    past_names, present_names = io_names(adapter.num_layers)
    ids, pos, mask, kv = _text_sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST, dtype, device)
    pos_axes = {0: batch, 1: seq} if adapter.position_axes == 1 else {1: batch, 2: seq}
    extra = extra_inputs(adapter)
    out = []
    if adapter.image_inputs:
        vision = adapter.vision_graph()
        sample = tuple(t.to(device) for t in vision.sample())
        first = Dim("patches", min=1, max=1 << 20) if len(sample) > 1 else Dim("images", min=1, max=1024)
        out.append(GraphPlan("vision", vision, sample, list(vision.input_names), list(vision.output_names),
                             tuple({0: first} for _ in sample), type(vision).__name__))
    dims = {"batch": batch, "total": seq, "image_tokens": image_tokens}
    values, axes = _extra_sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_SEQ, dtype, dims, device)
    prefill = PopPrefill(adapter, prefill_layers, heads).to(device)
    out.append(GraphPlan("prefill", prefill, (ids, pos, mask[SAMPLE_PAST:], *values),
                         ["input_ids", "position_ids", "attention_mask", *extra], present_names,
                         ({0: batch, 1: seq}, pos_axes, {0: seq, 1: batch}, *([tuple(axes)] if axes else [])),
                         f"{prefill_layers} layers + {adapter.num_layers - prefill_layers} KV heads"))
    dims["total"] = total
    values, axes = _extra_sample(adapter, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_SEQ + SAMPLE_PAST, dtype, dims, device)
    out.append(GraphPlan("decode", PopDecode(adapter), (ids, pos, mask, *values, *kv),
                         ["input_ids", "position_ids", "attention_mask", *extra, *past_names],
                         ["logits", *present_names],
                         ({0: batch, 1: seq}, pos_axes, {0: total, 1: batch},
                          (*axes, *({0: past, 1: batch} for _ in kv))), f"{adapter.num_layers} layers"))
    return out
