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

from ..ops import encoder_attention
from ..pop import PopDecode, PopPrefill, extra_inputs

SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 5, 7
WINDOW_INPUTS = ["window_seqlens_k", "window_total_sequence_length"]  # the decode graph's, where pop.windowed
ROLES = {"vision": "images -> embeddings of their placeholder tokens",
         "prefill": "prompt tokens 1..N-1: layers < K, KV heads for layers >= K",
         "decode": "full model over T >= 1 new tokens per row after each row's past"}


@dataclass
class GraphPlan:
    name: str
    module: nn.Module
    args: tuple  # the sample, one entry per input
    input_names: list
    output_names: list
    dynamic_shapes: tuple  # torch.export's form: one entry per forward() argument, varargs as one tuple
    what: str  # for progress lines
    aliases: dict  # output name -> the input whose buffer it is written into (the fused form's attention)

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


def _extra_sample(adapter, batch, seq, max_seq_len, dtype, dims, device):
    """Sample values and dynamic axes of the family's extra inputs (pop.extra_inputs)."""
    hidden = adapter.cfg.hidden_size
    image_tokens = 3  # placed in both rows and across the batch boundary of the flat index
    values, axes = [], []
    for name in extra_inputs(adapter):
        if name == "token_groups":
            groups = torch.zeros(batch, max_seq_len, dtype=torch.long, device=device)
            groups[0, 1:3] = 1
            values.append(groups), axes.append({0: dims["batch"]})
        elif name == "image_embeds":
            values.append(torch.randn(image_tokens, hidden, dtype=dtype, device=device))
            axes.append({0: dims["image_tokens"]})
        elif name == "image_index":
            values.append(torch.tensor([1, 2, seq + 1], device=device)), axes.append({0: dims["image_tokens"]})
        elif name == "deepstack_embeds":
            values.append(torch.randn(adapter.deepstack_layers, image_tokens, hidden, dtype=dtype, device=device))
            axes.append({1: dims["image_tokens"]})
    return values, axes


def plans(adapter, prefill_layers, max_seq_len, dtype, heads=None, device="cpu", form="plain"):
    """[GraphPlan] in export order: vision (VLMs), prefill, decode.
    heads: fitted KV heads for the prefill graph (exporter/fitted_heads.py), or None.
    form: "fused" (ONNX Runtime's operators) or "plain" (standard ones; exporter/ops.py)."""
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=max_seq_len)
    total_dim = Dim("total", min=1, max=max_seq_len)
    image_tokens = Dim("image_tokens", min=1, max=1024 * max_seq_len)
    dims = {"batch": batch, "image_tokens": image_tokens}
    b, t = SAMPLE_BATCH, SAMPLE_SEQ
    past_names, present_names = io_names(adapter.num_layers)
    ids = torch.randint(0, adapter.cfg.vocab_size, (b, t), device=device)
    buffers = [torch.zeros(b, adapter.num_kv_heads, max_seq_len, adapter.head_dim, dtype=dtype, device=device)
               for _ in range(2 * adapter.num_layers)]
    buffer_axes = {0: batch}
    extra = extra_inputs(adapter)
    values, axes = _extra_sample(adapter, b, t, max_seq_len, dtype, dims, device)
    head = ["input_ids", "seqlens_k", "total_sequence_length"]
    position_axes = []
    if adapter.position_axes > 1:
        head.append("position_ids")
        position_axes = [{1: batch, 2: seq}]
    out = []
    if adapter.image_inputs:
        vision = adapter.vision_graph(encoder_attention if form == "fused" else None)
        sample = tuple(x.to(device) for x in vision.sample())
        first = Dim("patches", min=1, max=1 << 20) if len(sample) > 1 else Dim("images", min=1, max=1024)
        out.append(GraphPlan("vision", vision, sample, list(vision.input_names), list(vision.output_names),
                             tuple({0: first} for _ in sample), type(vision).__name__, {}))

    def call(past, new, kv_layers, slots=False, window=False):
        """(args, dynamic shapes) of a call over `new` tokens after `past` ones, reading kv_layers' buffers;
        slots: the plain decode graph's cache_slots input; window: the sliding layers' lengths (pop.windowed),
        traced equal to seqlens and total, as a past bound where it lies gives them."""
        seqlens = torch.tensor([past + new - 1, past + new - 2], dtype=torch.int32, device=device)[:b]
        total = torch.tensor(past + new, dtype=torch.int32, device=device)
        pos = []
        if adapter.position_axes > 1:
            pos = [(torch.arange(past, past + new, device=device).repeat(b, 1)[None]
                    .expand(adapter.position_axes, b, new).contiguous())]
        kv = [buffers[i] for l in kv_layers for i in (2 * l, 2 * l + 1)]
        cache_slots = [torch.arange(past + new, device=device)] if slots else []
        lengths = [seqlens.clone(), total.clone()] if window else []
        rest = (*([{0: total_dim}] if slots else []), *([{0: batch}, None] if window else []), *position_axes, *axes,
                *({**buffer_axes} for _ in kv))
        return ((ids, seqlens, total, *cache_slots, *lengths, *pos, *values, *kv),
                ({0: batch, 1: seq}, {0: batch}, None, *([rest] if rest else [])))

    prefill = PopPrefill(adapter, prefill_layers, heads, form, max_seq_len).to(device)
    kept = list(prefill.in_place_layers())
    args, shapes = call(0, t, kept)
    aliases = {present_names[i]: past_names[i] for l in kept for i in (2 * l, 2 * l + 1)}
    out.append(GraphPlan("prefill", prefill, args, [*head, *extra, *(past_names[i] for l in kept
                                                                      for i in (2 * l, 2 * l + 1))],
                         present_names, shapes,
                         f"{prefill_layers} layers + {adapter.num_layers - prefill_layers} KV heads", aliases))
    decode = PopDecode(adapter, form, max_seq_len).to(device)
    everything = list(range(adapter.num_layers))
    plain = form == "plain"
    args, shapes = call(SAMPLE_PAST, t, everything, slots=plain, window=decode.windowed)
    aliases = {present_names[i]: past_names[i] for l in decode.in_place_layers() for i in (2 * l, 2 * l + 1)}
    decode_head = [*head[:3], *(["cache_slots"] if plain else []),
                   *(WINDOW_INPUTS if decode.windowed else []), *head[3:]]
    out.append(GraphPlan("decode", decode, args, [*decode_head, *extra, *past_names], ["logits", *present_names], shapes,
                         f"{adapter.num_layers} layers", aliases))
    return out
