"""The POP computation, written once for every family adapter and both graph forms.

Two modules, traced to two graphs:

* PopPrefill: prompt tokens 1..N-1 (a first prompt: every row from slot 0).
  Layers 0..K-1 run normally; every layer l >= K fills its cache from h (the
  output of layer K-1) through its own norm -> K/V projection -> k-norm -> RoPE.
  No logits.
* PopDecode: the full model over T >= 1 new tokens per row after each row's
  past; logits at each row's last real token.

The KV cache is one buffer per layer and kind, [batch, kv_heads, max_seq_len,
head_dim], in which every row keeps its own length (the graphs' `seqlens_k`
input).  Graph forms differ in how new entries get there (exporter/ops.py):
the fused form's attention writes them in place; the plain form returns them,
[batch, kv_heads, T, head_dim], for the runtime to place at each row's slots.
The pruned layers' KV heads always return theirs.  docs/MANIFEST.md is the
contract.
"""
import torch
from torch import nn

from .ops import OPS, split_heads, step_for


def sink_mask(position_ids):
    """[B, T] bool, true at each row's first position-0 token: the attention sink.

    The one definition, used by the graphs, the references, pop-eval's methods and
    the fit (exporter/fitted_heads.py), which leaves the sink out of its data, so
    that fitted heads keep the layer's own matrices there.  Only the first: under
    M-RoPE ([3, B, T]) the tokens of an image that opens the prompt share
    temporal position 0 too, and are ordinary tokens."""
    zero = (position_ids if position_ids.dim() == 2 else position_ids[0]) == 0
    return zero & (zero.cumsum(-1) == 1)


def extra_inputs(adapter):
    """Graph inputs after the cache lengths (and M-RoPE positions), in order, for this family.

    token_groups      [B, S]     image number per slot, 0 for text (bidirectional images)
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


def windowed(adapter, form):
    """Whether the decode graph takes window_seqlens_k and window_total_sequence_length (docs/MANIFEST.md):
    the fused form of a family with sliding-window layers.  ONNX Runtime's CPU attention scores every
    slot a row holds before it masks the window, so at long contexts those layers would cost what
    global ones do; given these, the runtime binds a sliding layer's past from a later slot instead,
    past what has left every row's window.  Not where the operator cannot index the rotary tables by
    slot (M-RoPE) or the mask goes in whole as a bias (Gemma-3's bidirectional images)."""
    return (form == "fused" and adapter.position_axes == 1 and not adapter.bidirectional_images
            and any(adapter.sliding_window(l) for l in range(adapter.num_layers)))


def _scatter(h, index, rows, add=False):
    """h [B,T,H] with rows [M,H] written (or added) at flat token positions index [M].

    An add is a gather, a sum and a plain scatter: the positions are distinct,
    and TensorRT's ScatterND takes no `reduction` (its ONNX operator matrix)."""
    b, t, d = h.shape
    flat = h.reshape(b * t, d)
    rows = rows.to(h.dtype)
    return flat.index_copy(0, index, flat[index] + rows if add else rows).reshape(b, t, d)


class PopGraph(nn.Module):
    """The pieces every POP graph is made of, over one family adapter and one form of primitives
    (exporter/ops.py): embedding, the residual stream with its norms, a full decoder layer, a pruned
    layer's KV head.  PopPrefill and PopDecode trace them into graphs; pop-eval and pop-analyze run
    them eagerly (quality/)."""

    def __init__(self, adapter, form="plain", max_seq_len=4096):
        super().__init__()
        self.ad = adapter
        self.hf = adapter.hf  # registered so initializer names are the HF parameter names
        self.ops = OPS[form]
        self.form = form
        self.max_seq_len = max_seq_len
        self.extras = extra_inputs(adapter)
        self.rope_kinds = sorted({adapter.rope_kind(l) for l in range(adapter.num_layers)})
        self.windows = sorted({adapter.sliding_window(l) for l in range(adapter.num_layers)},
                              key=lambda w: -1 if w is None else w)
        if form == "fused":
            # The fused form packs each layer's Q/K/V matrices into one, and gate/up into one: a decode step
            # is a matrix-vector product per weight, and ONNX Runtime runs two fewer of them per layer.  The
            # same tensors in every graph (the weights file stores content once); the pruned layers' KV heads
            # keep their own K/V matrices, which the prefill graph stores beside the packed ones.
            for l, (qkv, gate_up) in enumerate(packed_weights(adapter)):
                for name, t in (("qkv", qkv), ("gate_up", gate_up)):
                    if t is not None:
                        self.register_buffer(f"packed_{name}_{l}", t[0], persistent=False)
                        if t[1] is not None:
                            self.register_buffer(f"packed_{name}_bias_{l}", t[1], persistent=False)
        if adapter.position_axes == 1:
            # Rotary tables by position, [max_seq_len, D/2] per kind: graph constants, gathered per token
            # (and indexed by the fused operators), never recomputed per call.  The same tensors for every
            # graph of an export, so that the weights file holds them once.
            for kind, (cos, sin) in rope_tables(adapter, max_seq_len).items():
                self.register_buffer(f"rope_cos_{kind}", cos, persistent=False)
                self.register_buffer(f"rope_sin_{kind}", sin, persistent=False)

    def _inputs(self, rest, with_slots=False, with_window=False):
        """(cache_slots or None, sliding layers' (seqlens, total) or None, M-RoPE positions or None, extra
        inputs by name, the remaining inputs)."""
        slots = window = positions = None
        if with_slots:
            slots, rest = rest[0], rest[1:]
        if with_window:
            window, rest = (rest[0], rest[1]), rest[2:]
        if self.ad.position_axes > 1:
            positions, rest = rest[0], rest[1:]
        n = len(self.extras)
        return slots, window, positions, dict(zip(self.extras, rest[:n])), rest[n:]

    def rope_table(self, kind):
        """(cos, sin) [max_seq_len, D/2] by position (text families)."""
        return getattr(self, f"rope_cos_{kind}"), getattr(self, f"rope_sin_{kind}")

    def step(self, seqlens, total, new, positions, mm, with_past, slots=None, window=None):
        step = step_for(seqlens, total, new, positions, mm.get("token_groups"), slots)
        step.window = window
        self.ops.prepare(self, step, with_past)
        return step

    def embed(self, input_ids, mm=None):
        h = self.ad.embed(input_ids)
        if mm and "image_embeds" in mm:
            h = _scatter(h, mm["image_index"], mm["image_embeds"])
        return h

    def deepstack(self, l, h, mm):
        if l < self.ad.deepstack_layers and "deepstack_embeds" in mm:
            h = _scatter(h, mm["image_index"], mm["deepstack_embeds"][l], add=True)
        return h

    def _q(self, l, x):
        """Queries before RoPE: [B, T, Hq*D], or [B, T, Hq, D] where the family norms them per head."""
        q_norm, _ = self.ad.qk_norms(l)
        q = self.ad.q(l, x)
        return q if q_norm is None else self.ops.norm(q_norm, split_heads(q, self.ad.num_heads))

    def _kv(self, l, x, k_proj=None, v_proj=None):
        """Keys (before RoPE; per head where the family norms them) and values, [B, T, Hkv*D]-shaped or
        [B, T, Hkv, D].  Heads are split only where something needs them: a reshape the fused form's
        operators do not need costs a copy in ONNX Runtime."""
        _, k_norm = self.ad.qk_norms(l)
        k, v = self.ad.k(l, x, k_proj), self.ad.v(l, x, v_proj)
        return (k if k_norm is None else self.ops.norm(k_norm, split_heads(k, self.ad.num_kv_heads))), v

    def _packed(self, name, l, x):
        """x through layer l's packed matrix, or None where this graph has none (the plain form)."""
        w = getattr(self, f"packed_{name}_{l}", None)
        return None if w is None else nn.functional.linear(x, w, getattr(self, f"packed_{name}_bias_{l}", None))

    def _qkv(self, l, x):
        """(q, k, v) of a full layer, as _q and _kv give them: one packed product where the form has it,
        and that product whole as q (k and v None) where the form's attention takes it so."""
        y = self._packed("qkv", l, x)
        if y is None:
            return (self._q(l, x), *self._kv(l, x))
        q_norm, k_norm = self.ad.qk_norms(l)
        if q_norm is None and k_norm is None and self.ops.packed_attention(self.ad):
            return y, None, None  # the attention operator splits the packed product itself: no copy
        q, k, v = y.split([m.out_features for m in self.ad.qkv_proj(l)], -1)
        q = q if q_norm is None else self.ops.norm(q_norm, split_heads(q, self.ad.num_heads))
        k = k if k_norm is None else self.ops.norm(k_norm, split_heads(k, self.ad.num_kv_heads))
        return q, k, v

    def _mlp(self, l, x):
        y = self._packed("gate_up", l, x)
        if y is None:
            return self.ad.mlp_out(l, x)
        gate, up, act, down = self.ad.mlp_parts(l)
        g, u = y.split([gate.out_features, up.out_features], -1)
        return down(act(g) * u)

    def layers(self, h, step, pasts, mm=None, kv_only=(), bypass=(), heads=None, sink=None, gates=None):
        """Every layer over h (embedded), in order.  Returns (h, x = the final norm of h, {layer: (present K,
        present V)}).  pasts[l]: the layer's (K, V) buffers, or (None, None) for a first prompt's plain form.

        kv_only layers fill their cache through their KV head (kv_head) from the hidden state they receive
        and leave h as it is: POP's pruned layers in the prefill graph, and pop-eval's variants.  bypass
        layers do nothing (pop-eval's ShortGPT-style dropping).  gates[l] (broadcast over h) scales both
        residual branches: the "virtual gate" of stage-importance analysis.  The residual add is fused into
        the norm that reads it (ops.add_norm), so x is always the next full layer's normed input."""
        ad, ops = self.ad, self.ops
        x, x_for = None, None  # x is the input norm of layer x_for applied to h
        presents = {}
        for l in range(ad.num_layers):
            if l in bypass:
                continue
            if l in kv_only:
                presents[l] = self.kv_head(l, h, step, heads, sink)
                continue
            if x_for != l:
                x = ops.norm(ad.input_norm(l), h)
            q, k, v = self._qkv(l, x)
            a, pk, pv = ops.attention(self, l, q, k, v, *pasts[l], step)
            presents[l] = (pk, pv)
            a = ad.attn_out(l, a)
            post_a, post_m = ad.branch_norms(l)
            a = a if post_a is None else ops.norm(post_a, a)
            x, h = ops.add_norm(h, a if gates is None else gates[l] * a, ad.mlp_norm(l))
            m = self._mlp(l, x)
            m = m if post_m is None else ops.norm(post_m, m)
            nxt = ad.input_norm(l + 1) if l + 1 < ad.num_layers else ad.final_norm()
            x, h = ops.add_norm(h, m if gates is None else gates[l] * m, nxt)
            x_for = l + 1
            if l < ad.deepstack_layers and mm and "deepstack_embeds" in mm:
                h = self.deepstack(l, h, mm)
                x_for = None  # the features join after the norm that read h
        if x_for != ad.num_layers:
            x = ops.norm(ad.final_norm(), h)
        return h, x, presents

    def kv_head(self, l, h, step, heads=None, sink=None):
        """Independent KV projection of a pruned layer, from the kept hidden state: [B, Hkv, T, D] each.

        heads (exporter/fitted_heads.py), when given, replaces the layer's K/V
        matrices where it has a fitted one; norm, k-norm and RoPE stay the layer's.
        sink ([B, T, 1], 1.0 at each row's first token, sink_mask) keeps the
        layer's own matrices for the attention sink, which the fit never saw
        (fitted_heads.collect)."""
        ad = self.ad
        x = self.ops.norm(ad.input_norm(l), h)
        k_proj, v_proj = (None, None) if heads is None else (heads.proj("key", l), heads.proj("value", l))
        k, v = self._kv(l, x, k_proj, v_proj)
        if k_proj is not None or v_proj is not None:
            # The own matrices are needed at the sink only, one token per sequence: projecting
            # all T rows twice would cost prefill a second head per pruned layer.
            x0 = (x * sink).sum(1, keepdim=True)
            k0, v0 = self._kv(l, x0)
            # K is [B, T, Hkv, D] where the family norms keys per head, V is [B, T, Hkv*D]: the
            # sink selector takes each one's rank.
            def at_sink(t):
                return (sink > 0).reshape(sink.shape + (1,) * (t.dim() - 3))
            if k_proj is not None:
                k = torch.where(at_sink(k), k0, k)
            if v_proj is not None:
                v = torch.where(at_sink(v), v0, v)
        n = self.ad.num_kv_heads
        return self.ops.rope_keys(self, l, k, step).transpose(1, 2), split_heads(v, n).transpose(1, 2)

    def logits(self, h, x, step):
        """Logits at each row's last real token: slot seqlens_k, or the last new one."""
        b, t, d = x.shape
        last = torch.minimum(step.seqlens.long(), torch.full_like(step.seqlens.long(), t - 1))
        return self.ad.lm_head(x.gather(1, last[:, None, None].expand(b, 1, d))[:, 0])


def packed_weights(adapter):
    """[(qkv, gate_up)] per layer, each (weight, bias or None) or None: the fused form's packed matrices,
    made once per adapter so that every graph of an export holds the same tensors."""
    cache = adapter.__dict__.setdefault("_pop_packed", [])
    if not cache:
        def pack(linears):
            if not all(isinstance(m, nn.Linear) for m in linears):
                return None  # a family whose projections are not plain Linear modules keeps them apart
            with torch.no_grad():
                w = torch.cat([m.weight for m in linears]).contiguous()
                b = None if all(m.bias is None for m in linears) else \
                    torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears])
                # the modules' own weights become views of the packed tensor: the model is held once
                start = 0
                for m in linears:
                    m.weight.data = w[start:start + m.out_features]
                    if m.bias is not None:
                        m.bias.data = b[start:start + m.out_features]
                    start += m.out_features
                return w, b
        for l in range(adapter.num_layers):
            gate, up, _, _ = adapter.mlp_parts(l)
            cache.append((pack(adapter.qkv_proj(l)), pack((gate, up))))
    return cache


def rope_tables(adapter, max_seq_len):
    """{rope kind: (cos, sin) [max_seq_len, D/2]} from HF's own rotary module, computed once per adapter
    and length (the same tensors for every graph module built over them)."""
    cache = adapter.__dict__.setdefault("_pop_rope_tables", {})
    if max_seq_len not in cache:
        like = adapter.hf.get_input_embeddings().weight
        tables = {}
        with torch.no_grad():
            for kind in sorted({adapter.rope_kind(l) for l in range(adapter.num_layers)}):
                cos, sin = adapter.rope(kind, torch.arange(max_seq_len, device=like.device)[None], like)
                half = cos.shape[-1] // 2
                tables[kind] = (cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous())
        cache[max_seq_len] = tables
    return cache[max_seq_len]


class PopPrefill(PopGraph):
    def __init__(self, adapter, prefill_layers: int, heads=None, form="plain", max_seq_len=4096):
        super().__init__(adapter, form, max_seq_len)
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

    def in_place_layers(self):
        """Layers whose presents this graph writes into the buffer itself (the fused form's attention)."""
        return range(self.prefill_layers) if self.form == "fused" else range(0)

    def forward(self, input_ids, seqlens_k, total_sequence_length, *rest):
        _, _, positions, mm, past = self._inputs(rest)
        step = self.step(seqlens_k, total_sequence_length, input_ids.shape[1], positions, mm, with_past=False)
        h = self.embed(input_ids, mm)
        k = self.prefill_layers
        pasts = [(past[2 * l], past[2 * l + 1]) if self.form == "fused" and l < k else (None, None)
                 for l in range(self.ad.num_layers)]
        sink = sink_mask(step.positions).to(h.dtype)[..., None] if self.heads is not None else None
        _, _, presents = self.layers(h, step, pasts, mm, kv_only=range(k, self.ad.num_layers), heads=self.heads,
                                     sink=sink)
        return tuple(t for l in range(self.ad.num_layers) for t in presents[l])


class PopDecode(PopGraph):
    def __init__(self, adapter, form="plain", max_seq_len=4096):
        super().__init__(adapter, form, max_seq_len)
        self.windowed = windowed(adapter, form)

    def in_place_layers(self):
        return range(self.ad.num_layers) if self.form == "fused" else range(0)

    def forward(self, input_ids, seqlens_k, total_sequence_length, *rest):
        """rest: cache_slots [total] (the plain form: the slots 0..total-1 whose keys are read), then
        window_seqlens_k [B] and window_total_sequence_length [] (see `windowed`), the M-RoPE positions,
        the family's extra inputs and every layer's past K/V buffers."""
        slots, window, positions, mm, past = self._inputs(rest, with_slots=self.form == "plain",
                                                          with_window=self.windowed)
        step = self.step(seqlens_k, total_sequence_length, input_ids.shape[1], positions, mm, with_past=True,
                         slots=slots, window=window)
        h = self.embed(input_ids, mm)
        pasts = [(past[2 * l], past[2 * l + 1]) for l in range(self.ad.num_layers)]
        h, x, presents = self.layers(h, step, pasts, mm)
        return (self.logits(h, x, step), *(t for l in range(self.ad.num_layers) for t in presents[l]))
