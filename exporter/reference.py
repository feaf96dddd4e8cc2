"""The PyTorch POP reference: eager HF modules and HF's own cache, masks and
attention, with POP applied on top.  It shares no code with the traced graphs
(pop.py), so agreement between the two is evidence, not tautology.
"""
import torch
from transformers import DynamicCache

from .pop import sink_mask  # the one definition of the attention sink, shared on purpose


def positions(attention_mask):
    """Position ids for left-padded rows, the way HF generate derives them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def text_parts(hf_model):
    """(text config, decoder body): VLMs keep their language model one level down."""
    if hasattr(hf_model.model, "language_model"):
        return hf_model.config.get_text_config(), hf_model.model.language_model
    return hf_model.config, hf_model.model


def _rotary(hf_model, layer_idx, h, position_ids):
    config, body = text_parts(hf_model)
    types = getattr(config, "layer_types", None)
    rope_params = getattr(config, "rope_parameters", None) or {}
    if types and types[layer_idx] in rope_params:  # per-layer-type RoPE (Gemma-3)
        return body.rotary_emb(h, position_ids, types[layer_idx])
    return body.rotary_emb(h, position_ids)


def kv_projection(hf_model, layer_idx, h, position_ids, heads=None):
    """k = RoPE(knorm(W_k norm(h))), v = W_v norm(h), as HF's attention module would.

    heads: fitted KV heads (exporter/fitted_heads.py); where one has a matrix for
    this layer it stands in for W_k or W_v, applied here with F.linear on its
    weights, so that verification compares fitted graphs with fitted references."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    layer = text_parts(hf_model)[1].layers[layer_idx]
    attn = layer.self_attn

    def project(kind, own):
        fitted = heads.proj(kind, layer_idx) if heads is not None else None
        if fitted is None:
            return own(x)
        # the fit saw no position-0 token (fitted_heads.collect): the attention sink keeps the layer's own matrix
        return torch.where(sink_mask(position_ids)[..., None], own(x), torch.nn.functional.linear(x, fitted.weight, fitted.bias))
    x = layer.input_layernorm(h)
    b, t, _ = x.shape
    k = project("key", attn.k_proj).view(b, t, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = project("value", attn.v_proj).view(b, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = _rotary(hf_model, layer_idx, h, position_ids)
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    return k, v


@torch.no_grad()
def prefill(hf_model, input_ids, attention_mask, keep: int, pos=None, heads=None, **images):
    """Shallow prefill of all tokens given.  Returns an HF DynamicCache.

    The deep layers still run inside HF's forward (that is the simplest way to let
    HF build its own cache objects); their cache entries are then replaced by the
    independent KV projections of the hidden state leaving layer keep-1.
    VLMs pass their image inputs (pixel_values, grids, token types) as HF names
    them, and their positions (M-RoPE) from HF's own rule.  heads: fitted KV
    heads for this keep, or None for the paper's.
    """
    config, body = text_parts(hf_model)
    num_layers = config.num_hidden_layers
    cache = DynamicCache(config=config)
    captured = {}
    hook = body.layers[keep - 1].register_forward_hook(
        lambda m, a, out: captured.__setitem__("h", _layer_output(out)))
    pos = positions(attention_mask) if pos is None else pos
    try:
        hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                 past_key_values=cache, use_cache=True, **images)
    finally:
        hook.remove()
    for l in range(keep, num_layers):
        k, v = kv_projection(hf_model, l, captured["h"], pos, heads)
        stored = cache.layers[l].keys.shape[-2]  # sliding layers keep only their window
        cache.layers[l].keys = k[..., -stored:, :].contiguous()
        cache.layers[l].values = v[..., -stored:, :].contiguous()
    return cache


@torch.no_grad()
def step(hf_model, tokens, attention_mask, cache, pos=None):
    """Full model over new tokens after the cache; returns last-position logits."""
    pos = positions(attention_mask)[:, -tokens.shape[1]:] if pos is None else pos
    out = hf_model(input_ids=tokens, attention_mask=attention_mask, position_ids=pos,
                   past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float()


@torch.no_grad()
def generate(hf_model, input_ids, attention_mask=None, keep=None, max_new_tokens=16, eos_ids=(), heads=None):
    """Greedy POP generation.  keep=None (or L) is the unpruned model; heads: fitted KV heads for keep."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    config = text_parts(hf_model)[0]
    keep = keep or config.num_hidden_layers
    n = input_ids.shape[1]
    if n > 1:
        cache = prefill(hf_model, input_ids[:, :-1], attention_mask[:, :-1], keep, heads=heads)
    else:
        cache = DynamicCache(config=config)
    tokens, mask = input_ids[:, -1:], attention_mask
    out = []
    for _ in range(max_new_tokens):
        logits = step(hf_model, tokens, mask, cache)
        tokens = logits.argmax(-1, keepdim=True)
        out.append(tokens)
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        if eos_ids and all(int(t) in eos_ids for t in tokens[:, 0]):
            break
    return torch.cat(out, dim=1)


def cache_tensors(cache):
    """[(k, v)] per layer in the graphs' layout, [seq, batch, heads, head_dim]."""
    return [(layer.keys.permute(2, 0, 1, 3), layer.values.permute(2, 0, 1, 3)) for layer in cache.layers]


def image_inputs(hf_model, inputs):
    """From an HF processor's output: (positions as HF derives them, and a function
    giving HF's image inputs for a forward over tokens [:end]).  Qwen3-VL's positions
    are its get_rope_index (M-RoPE); other families count real tokens."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    images = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    types = inputs.get("mm_token_type_ids", inputs.get("token_type_ids"))
    if hasattr(hf_model.model, "get_rope_index"):
        pos = hf_model.model.get_rope_index(ids, types, images.get("image_grid_thw"), attention_mask=mask)[0]
        key = "mm_token_type_ids"
    else:
        pos, key = positions(mask), "token_type_ids"
    return pos, lambda end: {**images, key: types[:, :end]} if "pixel_values" in images else {}


@torch.no_grad()
def generate_with_images(hf_model, inputs, keep, max_new_tokens=16, eos_ids=()):
    """Greedy POP generation for a VLM, from its HF processor's output (one row);
    positions advance by one per token on every axis after the prompt."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos, images = image_inputs(hf_model, inputs)
    cache = prefill(hf_model, ids[:, :-1], mask[:, :-1], keep, pos[..., :-1], **images(ids.shape[1] - 1))
    tokens, step_pos, out = ids[:, -1:], pos[..., -1:], []
    for _ in range(max_new_tokens):
        logits = step(hf_model, tokens, mask, cache, step_pos)
        tokens = logits.argmax(-1, keepdim=True)
        out.append(int(tokens[0, 0]))
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        step_pos = step_pos + 1
        if int(tokens[0, 0]) in eos_ids:
            break
    return out
