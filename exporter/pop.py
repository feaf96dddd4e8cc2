"""The POP computation, written once for every family adapter.

Two modules, traced to two graphs:

* PopPrefill: prompt tokens 1..N-1.  Layers 0..K-1 run normally; every layer
  l >= K fills its cache from h (the output of layer K-1) through its own
  norm -> K/V projection -> k-norm -> RoPE.  No logits.
* PopDecode: the full model over T >= 1 new tokens after a past cache; logits
  for the last position only, and the new tokens' K/V.

Cache tensors are sequence-major, [seq, batch, kv_heads, head_dim], so that a
runtime can hand the graphs a prefix of one preallocated buffer and receive new
entries straight into it (see runtime/kv.py).  The graphs never concatenate the
cache: attention scores over the past and over the new tokens are computed
separately and joined only after the dot products, where they are small.
"""
import torch
from torch import nn

from .families.llama import apply_rope


def sink_mask(position_ids):
    """[B, T] bool, true at each row's first position-0 token: the attention sink.

    The one definition, used by the graphs, the references, pop-eval's methods and
    the fit (exporter/fitted_heads.py), which leaves the sink out of its data, so
    that fitted heads keep the layer's own matrices there.  Only the first: under
    M-RoPE ([3, B, T]) the tokens of an image that opens the prompt share
    temporal position 0 too, and are ordinary tokens."""
    zero = (position_ids if position_ids.dim() == 2 else position_ids[0]) == 0
    return zero & (zero.cumsum(-1) == 1)


def key_mask(attention_mask, past_len, new_len, window, groups=None):
    """[B, 1, 1, T, P+T] bool: causal, padding-aware, optionally sliding.

    attention_mask is [P+T, B] over cache slots (1 = a real token).  Slot indices
    are the distances HF uses for sliding windows, so left padding counts.
    groups, when given, is [P+T, B]: tokens of one image share a number > 0 and
    see each other in both directions, still within the window (HF's Gemma-3
    rule: sliding AND (causal OR same image)).
    """
    total = attention_mask.shape[0]
    q_idx = torch.arange(new_len, device=attention_mask.device) + past_len
    k_idx = torch.arange(total, device=attention_mask.device)
    allowed = (k_idx[None, :] <= q_idx[:, None])[None]  # [1, T, P+T]
    if groups is not None:
        gk = groups.transpose(0, 1)  # [B, P+T]
        gq = gk[:, past_len:]
        allowed = allowed | ((gq[:, :, None] == gk[:, None, :]) & (gq[:, :, None] > 0))
    if window is not None:
        allowed = allowed & (q_idx[:, None] - k_idx[None, :] < window)[None]
    real = attention_mask.transpose(0, 1).bool()
    return (allowed & real[:, None, :])[:, None, None]


def attend(q, k, v, past_k, past_v, mask, scale, softcap=None):
    """Grouped-query attention over [past ; new] without joining the cache.

    q: [B,T,Hq,D]; k, v: [B,T,Hkv,D]; past_k, past_v: [P,B,Hkv,D].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    past_len = past_k.shape[0]
    qh = q.reshape(b, t, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4) * scale  # [B,Hkv,G,T,D]
    pk = past_k.permute(1, 2, 0, 3).unsqueeze(2)  # [B,Hkv,1,P,D]
    pv = past_v.permute(1, 2, 0, 3).unsqueeze(2)
    nk = k.transpose(1, 2).unsqueeze(2)  # [B,Hkv,1,T,D]
    nv = v.transpose(1, 2).unsqueeze(2)
    # Past scores are computed as K @ Q^T and the small [P, G*T] result is
    # transposed, not K: a step then reads the cached keys in their own row
    # order.  Q @ K^T made ONNX Runtime transpose every layer's whole past K,
    # element by element, each decode step (24-38% of a step at 1024 tokens).
    q_cols = qh.permute(0, 1, 4, 2, 3).reshape(b, hkv, 1, d, -1)  # [B,Hkv,1,D,G*T]
    past_scores = (pk @ q_cols).reshape(b, hkv, past_len, hq // hkv, t).permute(0, 1, 3, 4, 2)
    scores = torch.cat([past_scores, qh @ nk.transpose(-1, -2)], dim=-1).float()
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(mask, scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = probs[..., :past_len] @ pv + probs[..., past_len:] @ nv  # [B,Hkv,G,T,D]
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, hq * d)


def extra_inputs(adapter):
    """Graph inputs after ids, positions and mask, in order, for this family.

    token_groups      [P+T, B]   image number per slot, 0 for text (bidirectional images)
    image_embeds      [M, H]     vision features of the image tokens among the new ones
    image_index       [M]        where they go: flat index b*T + t into the new tokens
    deepstack_embeds  [n, M, H]  added after layers 0..n-1 at the same places
    Text-only steps pass M = 0.
    """
    names = ["token_groups"] if adapter.bidirectional_images else []
    if adapter.image_inputs:
        names += ["image_embeds", "image_index"]
    if adapter.deepstack_layers:
        names.append("deepstack_embeds")
    return names


def _scatter(h, index, rows, add=False):
    """h [B,T,H] with rows [M,H] written (or added) at flat token positions index [M].

    An add is a gather, a sum and a plain scatter: the positions are distinct,
    and TensorRT's ScatterND takes no `reduction` (its ONNX operator matrix)."""
    b, t, d = h.shape
    flat = h.reshape(b * t, d)
    rows = rows.to(h.dtype)
    return flat.index_copy(0, index, flat[index] + rows if add else rows).reshape(b, t, d)


class PopGraph(nn.Module):
    """The pieces every POP graph is made of, over one family adapter: embedding, rotary tables, masks,
    a full decoder layer and a pruned layer's KV head.  PopPrefill and PopDecode trace them into graphs;
    pop-eval and pop-analyze run them eagerly (quality/)."""

    def __init__(self, adapter):
        super().__init__()
        self.ad = adapter
        self.hf = adapter.hf  # registered so initializer names are the HF parameter names
        self.extras = extra_inputs(adapter)

    def _split(self, rest):
        """(extra inputs by name, the remaining positional inputs)."""
        n = len(self.extras)
        return dict(zip(self.extras, rest[:n])), rest[n:]

    def embed(self, input_ids, mm=None):
        h = self.ad.embed(input_ids)
        if mm and "image_embeds" in mm:
            h = _scatter(h, mm["image_index"], mm["image_embeds"])
        return h

    def deepstack(self, l, h, mm):
        if l < self.ad.deepstack_layers:
            h = _scatter(h, mm["image_index"], mm["deepstack_embeds"][l], add=True)
        return h

    def ropes(self, position_ids, like):
        """{rope kind: (cos, sin)} for every kind of layer, computed once per graph."""
        kinds = {self.ad.rope_kind(l) for l in range(self.ad.num_layers)}
        return {kind: self.ad.rope(kind, position_ids, like) for kind in sorted(kinds)}

    def masks(self, attention_mask, past_len, new_len, mm=None):
        """{sliding window (None: global): [B, 1, 1, T, P+T] bool} for every kind of layer."""
        mm = mm or {}
        windows = {self.ad.sliding_window(l) for l in range(self.ad.num_layers)}
        return {w: key_mask(attention_mask, past_len, new_len, w, mm.get("token_groups")) for w in windows}

    def layer(self, l, h, rope, masks, past_k, past_v, gate=None):
        """One full decoder layer; returns the new h and this layer's new K/V.

        gate (broadcast over h) scales both residual branches: the "virtual gate"
        of stage-importance analysis.  The exported graphs never pass one.
        """
        ad = self.ad
        cos, sin = rope[ad.rope_kind(l)]
        x = ad.attn_norm(l, h)
        q = apply_rope(ad.q(l, x), cos, sin)
        k = apply_rope(ad.k(l, x), cos, sin)
        v = ad.v(l, x)
        a = attend(q, k, v, past_k, past_v, masks[ad.sliding_window(l)], ad.attn_scale(l), ad.attn_softcap())
        a = ad.attn_branch(l, a)
        h = h + (a if gate is None else gate * a)
        m = ad.mlp_branch(l, h)
        h = h + (m if gate is None else gate * m)
        return h, k, v

    def kv_head(self, l, h, rope, heads=None, sink=None):
        """Independent KV projection of a pruned layer, from the kept hidden state.

        heads (exporter/fitted_heads.py), when given, replaces the layer's K/V
        matrices where it has a fitted one; norm, k-norm and RoPE stay the layer's.
        sink ([B, T, 1], 1.0 at each row's first token, sink_mask) keeps the
        layer's own matrices for the attention sink, which the fit never saw
        (fitted_heads.collect)."""
        ad = self.ad
        cos, sin = rope[ad.rope_kind(l)]
        x = ad.attn_norm(l, h)
        k_proj, v_proj = (None, None) if heads is None else (heads.proj("key", l), heads.proj("value", l))
        k, v = ad.k(l, x, k_proj), ad.v(l, x, v_proj)
        if k_proj is not None or v_proj is not None:
            # The own matrices are needed at the sink only, one token per sequence: projecting
            # all T rows twice would cost prefill a second head per pruned layer.
            x0 = (x * sink).sum(1, keepdim=True)
            at_sink = sink[..., None] > 0
            if k_proj is not None:
                k = torch.where(at_sink, ad.k(l, x0), k)
            if v_proj is not None:
                v = torch.where(at_sink, ad.v(l, x0), v)
        return apply_rope(k, cos, sin), v


def seq_major(x):
    return x.transpose(0, 1)  # [B,T,H,D] -> [T,B,H,D]


class PopPrefill(PopGraph):
    def __init__(self, adapter, prefill_layers: int, heads=None):
        super().__init__(adapter)
        # fitted KV heads, registered so that they become this graph's initializers only
        self.heads = heads
        if heads is not None and heads.prefill_layers != prefill_layers:
            raise ValueError(f"these fitted heads are for K={heads.prefill_layers}, not {prefill_layers}")
        if not 1 <= prefill_layers <= adapter.num_layers:
            raise ValueError(f"prefill_layers must be in 1..{adapter.num_layers}, got {prefill_layers}")
        if prefill_layers <= adapter.deepstack_layers:
            # the KV heads read h after layer K-1; every layer that takes visual input must run before it
            raise ValueError(f"prefill_layers must exceed the {adapter.deepstack_layers} DeepStack layers, "
                             f"got {prefill_layers}")
        self.prefill_layers = prefill_layers

    def forward(self, input_ids, position_ids, attention_mask, *extra):
        mm, _ = self._split(extra)
        h = self.embed(input_ids, mm)
        b, t = input_ids.shape
        rope = self.ropes(position_ids, h)
        masks = self.masks(attention_mask, 0, t, mm)
        empty = h.new_zeros(0, b, self.ad.num_kv_heads, self.ad.head_dim)
        presents = []
        for l in range(self.prefill_layers):
            h, k, v = self.layer(l, h, rope, masks, empty, empty)
            h = self.deepstack(l, h, mm)
            presents += [seq_major(k), seq_major(v)]
        sink = None
        if self.heads is not None:
            sink = sink_mask(position_ids).to(h.dtype)[..., None]
        for l in range(self.prefill_layers, self.ad.num_layers):
            k, v = self.kv_head(l, h, rope, self.heads, sink)
            presents += [seq_major(k), seq_major(v)]
        return tuple(presents)


class PopDecode(PopGraph):
    def forward(self, input_ids, position_ids, attention_mask, *rest):
        mm, past = self._split(rest)
        h = self.embed(input_ids, mm)
        past_len = past[0].shape[0]
        rope = self.ropes(position_ids, h)
        masks = self.masks(attention_mask, past_len, input_ids.shape[1], mm)
        presents = []
        for l in range(self.ad.num_layers):
            h, k, v = self.layer(l, h, rope, masks, past[2 * l], past[2 * l + 1])
            h = self.deepstack(l, h, mm)
            presents += [seq_major(k), seq_major(v)]
        return (self.ad.logits(h[:, -1]), *presents)
