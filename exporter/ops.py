"""The primitives the POP graphs are made of, in two forms that compute the same thing.

    plain   ONNX's standard operators, and what AOTInductor compiles: attention over the
            KV buffer spelled out, and the new tokens' K/V returned for the runtime to place
            in the buffer.  TensorRT's parser and AOTInductor take this form.
    fused   ONNX Runtime's contrib operators: GroupQueryAttention reads and writes the KV
            buffer in place (rotary embedding inside it), SimplifiedLayerNormalization and
            SkipSimplifiedLayerNormalization fold the residual add into the norm,
            RotaryEmbedding rotates the pruned layers' keys.

The fused primitives are torch custom ops (`torch.ops.pop.*`) whose eager bodies are the
plain math, so a fused graph module runs in PyTorch too; exporter/formats/contrib.py maps
them onto ONNX Runtime's operators when the graph is traced to ONNX.  What each contrib
operator does was measured against numpy: docs/research/ort_contrib_ops.md.

Shapes: q [B, T, Hq, D], k and v [B, T, Hkv, D] before RoPE; the KV buffer of one layer
[B, Hkv, S, D] (S = max_seq_len); per row b the step writes slots start[b]..start[b]+T-1.
"""
from dataclasses import dataclass, field

import torch

from .families.llama import apply_rope

NEG = torch.finfo(torch.float32).min


@dataclass
class Step:
    """One graph call's view of the batch: what every layer needs besides its own weights."""
    seqlens: torch.Tensor  # [B] int32: per row, the slot of its last real token after this step
    total: torch.Tensor  # [] int32: the longest row's valid slots after this step
    new: int  # T, the new tokens per row (right-padded rows hold fewer real ones)
    start: torch.Tensor  # [B] int64: the first slot this step writes, per row
    positions: torch.Tensor  # [B, T] (or [axes, B, T] for M-RoPE): the rotary positions of the new tokens
    groups: torch.Tensor | None = None  # [B, S] image number per slot (bidirectional images), else None
    slots: torch.Tensor | None = None  # plain decode graphs: cache_slots [total], the slots 0..total-1
    ropes: dict = field(default_factory=dict)  # rope kind -> (cos, sin): per token [B, T, D], or tables [S, D/2]
    past: object = 0  # P, the slots before this step that keys are read from (plain form)
    masks: dict = field(default_factory=dict)  # plain: window -> (past mask, new mask); fused: window -> bias
    hide: tuple = ((), 0)  # (layers, slots): pop-eval's "without KV projections" ablation; graphs never set it
    window: tuple | None = None  # fused decode: (seqlens, total) of sliding layers, counted from their bound past


def step_for(seqlens, total, new, positions=None, groups=None, slots=None):
    """The Step of a call over `new` tokens per row.  A first prompt (total == new) writes from slot 0;
    otherwise each row continues after its own past, as ONNX Runtime's GroupQueryAttention does."""
    seqlens64 = seqlens.long()
    first = total.long() == new
    start = torch.where(first, torch.zeros_like(seqlens64), seqlens64 + 1 - new)
    if positions is None:
        positions = start[:, None] + torch.arange(new, device=seqlens.device)[None]
    return Step(seqlens, total, new, start, positions, groups, slots)


def _allowed(step, q_pos, k_pos, k_groups, window):
    """[B, 1, 1, T, K] bool over keys at slots k_pos [B, K] for queries at q_pos [B, T]: causal, valid
    (at or before the row's last real slot), within the window; the tokens of one image see each other."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (k <= q) & (k <= step.seqlens.long()[:, None, None])
    if step.groups is not None:
        q_groups = step.groups.gather(1, q_pos.clamp(max=step.groups.shape[1] - 1))
        same = (q_groups[:, :, None] == k_groups[:, None, :]) & (q_groups[:, :, None] > 0)
        allowed = allowed | same
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed[:, None, None]


class PlainOps:
    """Standard operators: what TensorRT parses and AOTInductor compiles."""
    form = "plain"

    def prepare(self, graph, step, with_past):
        """Per-token rotary values, and the masks of every window kind, once per graph call."""
        step.ropes = {kind: _per_token(graph, kind, step.positions) for kind in graph.rope_kinds}
        if with_past:
            # P from an input's shape (cache_slots [total]), not from total_sequence_length's value: a
            # value would make every shape after it data-dependent, which AOTInductor's kernels refuse
            step.past = step.slots.shape[0] - step.new
        b = step.seqlens.shape[0]
        q_pos = step.start[:, None] + torch.arange(step.new, device=step.start.device)[None]
        past_slots = torch.arange(step.past, device=q_pos.device)[None].expand(b, -1)
        for window in graph.windows:
            past_groups = step.groups[:, :step.past] if step.groups is not None else None
            new_groups = step.groups.gather(1, q_pos.clamp(max=step.groups.shape[1] - 1)) \
                if step.groups is not None else None
            # past keys are this row's own past only: slots before its start
            past_mask = _allowed(step, q_pos, past_slots, past_groups, window) & \
                (past_slots < step.start[:, None])[:, None, None, None]
            step.masks[window] = (past_mask, _allowed(step, q_pos, q_pos, new_groups, window))

    def packed_attention(self, ad):
        """Whether attention takes a layer's packed Q/K/V product whole (k and v None)."""
        return False

    def norm(self, module, x):
        return module(x)

    def add_norm(self, h, branch, module):
        """(module(h + branch), h + branch)."""
        h = h + branch
        return module(h), h

    def attention(self, graph, l, q, k, v, past_k, past_v, step):
        """(out [B, T, Hq*D], new K [B, Hkv, T, D], new V) with past keys read from past_k[:, :, :P]."""
        ad = graph.ad
        cos, sin = step.ropes[ad.rope_kind(l)]
        q, k, v = split_heads(q, ad.num_heads), split_heads(k, ad.num_kv_heads), split_heads(v, ad.num_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        b, t, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        past_mask, new_mask = step.masks[ad.sliding_window(l)]
        if l in step.hide[0]:  # pop-eval's ablation: the prompt's entries of this layer are unseen
            past_mask = past_mask & (torch.arange(past_mask.shape[-1]) >= step.hide[1])
        qh = q.reshape(b, t, hkv, g, d).permute(0, 2, 3, 1, 4) * ad.attn_scale(l)  # [B, Hkv, G, T, D]
        nk, nv = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]: this step's presents
        scores = [qh @ nk[:, :, None].transpose(-1, -2)]  # [B, Hkv, G, T, T]
        masks = [new_mask]
        values = [nv[:, :, None]]
        if past_k is not None:
            pk, pv = past_k[:, :, :step.past], past_v[:, :, :step.past]
            # K @ Q^T, then the small result is transposed: each step reads the cached keys in their own
            # row order instead of transposing every layer's whole past K
            q_cols = qh.permute(0, 1, 4, 2, 3).reshape(b, hkv, 1, d, g * t)
            past_scores = (pk[:, :, None] @ q_cols).reshape(b, hkv, -1, g, t).permute(0, 1, 3, 4, 2)
            scores, masks, values = [past_scores, *scores], [past_mask, *masks], [pv[:, :, None], *values]
        scores = torch.cat(scores, -1).float()
        softcap = ad.attn_softcap()
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = torch.where(torch.cat(masks, -1), scores, NEG)  # masks [B, 1, 1, T, K]
        probs = torch.softmax(scores, -1).to(q.dtype)
        out = probs[..., :-t] @ values[0] + probs[..., -t:] @ values[-1] if past_k is not None else probs @ values[0]
        return out.permute(0, 3, 1, 2, 4).reshape(b, t, hq * d), nk, nv

    def rope_keys(self, graph, l, k, step):
        """[B, T, Hkv, D] keys, rotated."""
        cos, sin = step.ropes[graph.ad.rope_kind(l)]
        return apply_rope(split_heads(k, graph.ad.num_kv_heads), cos, sin)


class FusedOps(PlainOps):
    """ONNX Runtime's contrib operators, through the torch custom ops below."""
    form = "fused"

    def prepare(self, graph, step, with_past):
        if graph.ad.position_axes == 1:  # rotary tables by position: GroupQueryAttention and RotaryEmbedding index them
            step.ropes = {kind: graph.rope_table(kind) for kind in graph.rope_kinds}
        else:  # M-RoPE positions are not slot indices: rotate outside the attention operator
            step.ropes = {kind: _per_token(graph, kind, step.positions) for kind in graph.rope_kinds}
        if step.groups is not None:  # bidirectional images: the whole mask as an additive bias
            q_pos = step.start[:, None] + torch.arange(step.new)[None]
            slots = torch.arange(step.total.item())[None].expand(q_pos.shape[0], -1)
            k_groups = step.groups[:, :slots.shape[1]]
            step.masks = {w: torch.where(_allowed(step, q_pos, slots, k_groups, w)[:, 0], 0.0, NEG)
                          for w in graph.windows}

    def packed_attention(self, ad):
        # GroupQueryAttention reads Q, K and V from one packed [B, T, (Hq + 2 Hkv) * D] input, which spares
        # the Split that copies them apart (2% of a 128-token prompt on smollm2-135m: benchmarks/genai/
        # profile-128.md).  Only where it rotates them itself: M-RoPE rotates outside the operator.
        return ad.position_axes == 1

    def norm(self, module, x):
        gamma, eps = graph_norm(module)
        return torch.ops.pop.rms_norm(x, gamma, eps)

    def add_norm(self, h, branch, module):
        gamma, eps = graph_norm(module)
        return torch.ops.pop.skip_rms_norm(branch, h, gamma, eps)

    def attention(self, graph, l, q, k, v, past_k, past_v, step):
        ad = graph.ad
        window = ad.sliding_window(l)
        cos = sin = bias = None
        if ad.position_axes == 1:
            cos, sin = step.ropes[ad.rope_kind(l)]
        else:  # M-RoPE rotates here, so its Q, K and V come apart (packed_attention)
            cos_t, sin_t = step.ropes[ad.rope_kind(l)]
            q = apply_rope(split_heads(q, ad.num_heads), cos_t, sin_t)
            k = apply_rope(split_heads(k, ad.num_kv_heads), cos_t, sin_t)
        if step.groups is not None:
            bias, window = step.masks[window], None  # the bias holds the window (causal=0 refuses one)
        seqlens, total, positions = step.seqlens, step.total, None
        if window and step.window is not None:
            # A sliding layer's past may be bound from a later slot than the others' (the runtime skips
            # what has left every row's window: runtime/session.py), so its lengths count from there;
            # the rotary positions stay the tokens' own.
            (seqlens, total), positions = step.window, step.positions
        out, present_k, present_v = torch.ops.pop.gqa(
            _flat(q), _flat(k), _flat(v), past_k, past_v, seqlens, total, cos, sin, bias, positions,
            ad.num_heads, ad.num_kv_heads, float(ad.attn_scale(l)), float(ad.attn_softcap() or 0.0), window or -1)
        return out, present_k, present_v

    def rope_keys(self, graph, l, k, step):
        ad = graph.ad
        if ad.position_axes != 1:
            return super().rope_keys(graph, l, k, step)
        cos, sin = step.ropes[ad.rope_kind(l)]
        rotated = torch.ops.pop.rotary(_flat(k), step.positions, cos, sin, ad.num_kv_heads)
        return split_heads(rotated, ad.num_kv_heads)


def split_heads(x, n):
    """[B, T, n, D] of [B, T, n*D]; unchanged when it already is.  Heads are split only where something
    needs them: a reshape the fused form's operators do not need costs a copy in ONNX Runtime."""
    return x if x.dim() == 4 else x.reshape(*x.shape[:-1], n, -1)


def _flat(x):
    """[B, T, H*D] of [B, T, H, D]; unchanged when it already is (or None: K and V packed with Q)."""
    return x if x is None or x.dim() == 3 else x.reshape(*x.shape[:2], -1)


def _per_token(graph, kind, positions):
    """(cos, sin) [B, T, D] of the new tokens: gathered from the tables, or HF's module for M-RoPE."""
    if graph.ad.position_axes == 1:
        cos, sin = graph.rope_table(kind)
        c, s = cos[positions], sin[positions]
        return torch.cat([c, c], -1), torch.cat([s, s], -1)
    return graph.ad.rope(kind, positions, graph.hf.get_input_embeddings().weight)


def graph_norm(module):
    """(gamma, eps) of an RMSNorm module: norm(x) = x / sqrt(mean(x^2) + eps) * gamma.  Gemma's
    norms multiply by 1 + weight (they say so with `eps` and a zero-initialised weight)."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is not None:
        return module.weight, float(eps)
    return module.weight + 1.0, float(module.eps)


OPS = {"plain": PlainOps(), "fused": FusedOps()}


def encoder_attention(q, k, v, scale, bias=None):
    """A vision tower's attention in the fused form: q, k, v [B, S, H, D] (token-major, the layout
    MultiHeadAttention reads, so that no transpose is needed; rotated where the tower rotates), bias None
    or additive [B|1, H|1, S, S] -> [B, S, H, D].  The towers take it as an argument
    (adapter.vision_graph(attention)): families sit below this module and cannot import it."""
    b, s, h, d = q.shape
    out = torch.ops.pop.mha(*(x.reshape(b, x.shape[1], h * d) for x in (q, k, v)), bias, h, scale)
    return out.reshape(b, s, h, d)


# --- the fused primitives as torch custom ops: eager bodies are the plain math -------------------

def _rms(x, gamma, eps):
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()).to(x.dtype)


@torch.library.custom_op("pop::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms(x, gamma, eps)


@rms_norm.register_fake
def _(x, gamma, eps):
    return torch.empty_like(x)


@torch.library.custom_op("pop::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, eps: float) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + skip), x + skip): ONNX Runtime's SkipSimplifiedLayerNormalization, outputs 0 and 3."""
    h = x + skip
    return _rms(h, gamma, eps), h


@skip_rms_norm.register_fake
def _(x, skip, gamma, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("pop::rotary", mutates_args=())
def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """x [B, T, H*D] rotated (rotate-half) at positions [B, T] by tables [S, D/2]: RotaryEmbedding."""
    b, t, _ = x.shape
    c, s = cos[positions], sin[positions]  # [B, T, D/2]
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    return apply_rope(x.reshape(b, t, num_heads, -1), c, s).reshape(b, t, -1)


@rotary.register_fake
def _(x, positions, cos, sin, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("pop::gqa", mutates_args=())
def gqa(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, past_k: torch.Tensor, past_v: torch.Tensor,
        seqlens: torch.Tensor, total: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
        bias: torch.Tensor | None, positions: torch.Tensor | None, num_heads: int, kv_heads: int, scale: float,
        softcap: float, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention over a shared past/present buffer [B, Hkv, S, D]: each row's new tokens go to
    its slots start..start+T-1 (see step_for), then attend causally to everything the row holds.
    cos/sin: rotary tables to apply inside (None: q and k come rotated), at `positions` [B, T] (int64)
    where given, else at the slots written; bias: the whole mask as an additive bias (non-causal), else
    causal with an optional window; softcap 0 = none.  k and v None: q is the packed [B, T, (Hq + 2 Hkv) * D]."""
    b, t, _ = q.shape
    d = past_k.shape[-1]
    if k is None:
        q, k, v = q.split([num_heads * d, kv_heads * d, kv_heads * d], -1)
    step = step_for(seqlens, total, t)
    qh, kh, vh = q.reshape(b, t, num_heads, d), k.reshape(b, t, kv_heads, d), v.reshape(b, t, kv_heads, d)
    if cos is not None:
        at = step.positions if positions is None else positions
        c, s = cos[at], sin[at]
        c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
        qh, kh = apply_rope(qh, c, s), apply_rope(kh, c, s)
    present_k, present_v = past_k.clone(), past_v.clone()
    for r in range(b):  # eager only: the exported graphs call the ONNX Runtime operator
        first = int(step.start[r])
        present_k[r, :, first:first + t] = kh[r].transpose(0, 1)
        present_v[r, :, first:first + t] = vh[r].transpose(0, 1)
    n = int(total)
    keys, values = present_k[:, :, :n], present_v[:, :, :n]  # [B, Hkv, n, D]
    g = num_heads // kv_heads
    # query head i reads KV head i // g, as repeat_interleave lays them out
    scores = torch.einsum("bthd,bhnd->bhtn", qh, keys.repeat_interleave(g, 1)).float() * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = step.start[:, None] + torch.arange(t)[None]
    slots = torch.arange(n)[None].expand(b, -1)
    if bias is not None:
        scores = scores + bias.float()
        allowed = (slots <= step.seqlens.long()[:, None])[:, None, None]
    else:
        allowed = _allowed(Step(step.seqlens, total, t, step.start, q_pos), q_pos, slots, None,
                           window if window > 0 else None)[:, 0]
    scores = torch.where(allowed, scores, NEG)
    probs = torch.softmax(scores, -1).to(q.dtype)
    out = probs @ values.repeat_interleave(g, 1)  # [B, Hq, T, D]
    return out.transpose(1, 2).reshape(b, t, num_heads * d), present_k, present_v


@torch.library.custom_op("pop::mha", mutates_args=())
def mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
        scale: float) -> torch.Tensor:
    """Attention of every query over every key, no cache (vision towers): q, k, v [B, S, H*D], bias
    additive [B|1, H|1, S, S] or None -> [B, S, H*D].  ONNX Runtime's MultiHeadAttention."""
    b, s, _ = q.shape
    qh, kh, vh = (x.reshape(b, x.shape[1], num_heads, -1).transpose(1, 2) for x in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias.float()
    out = torch.softmax(scores, -1).to(v.dtype) @ vh
    return out.transpose(1, 2).reshape(b, s, -1)


@mha.register_fake
def _(q, k, v, bias, num_heads, scale):
    return torch.empty_like(q)


@gqa.register_fake
def _(q, k, v, past_k, past_v, seqlens, total, cos, sin, bias, positions, num_heads, kv_heads, scale, softcap,
      window):
    b, t, _ = q.shape
    return q.new_empty(b, t, num_heads * past_k.shape[-1]), torch.empty_like(past_k), torch.empty_like(past_v)
