"""The expected POP/full speedup, from the matmul FLOPs each graph executes.

A multiply-add counts as 2 FLOPs; norms, RoPE, softmax and embedding lookups
are left out (they are linear in tokens and small).  Per layer and token:

    projections  2 * (H*Hq*D + 2*H*Hkv*D + Hq*D*H)     q, k, v, o
    MLP          2 * 3*H*I                              gate, up, down
    attention    4 * Hq*D * (P + T) / token             QK^T and PV, dense

Attention is counted dense over all P+T keys for every one of the T new
tokens, because that is what the plain form executes: causal and sliding
masks are applied to full score matrices, not skipped.  (ONNX Runtime 1.32's fused fp32 attention on
the CPU skips key blocks past the causal limit, and the runtime reads long prompts in chunks: there a
FLOP rate from this count overstates the work done at long prompts; benchmarks/chunked-prompt.)  The KV-projection head
of a pruned layer is its K and V projections, 2 * 2*H*Hkv*D per token.  Logits
(2*H*V) are computed for the last position only, in both modes.

    POP  TTFT = prefill graph over N-1 tokens (K layers + L-K KV heads)
              + boundary step (all L layers, 1 token after N-1 past, logits)
    full TTFT = decode graph over N tokens (all L layers, logits)

Batch multiplies both sides, so the ratio does not depend on it.  As N grows,
attention dominates and the ratio tends to L/K (`limit`).
"""
from dataclasses import dataclass

from pop.runtime.errors import PopError
from pop.runtime.manifest import Encoder


@dataclass(frozen=True)
class Shapes:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    keep: int  # K, the layers the prefill graph runs

    @classmethod
    def from_manifest(cls, manifest):
        model, kv = manifest.model, manifest.kv_cache.layers
        if model.intermediate_size is None:
            raise PopError("this manifest predates the cost model (no model.intermediate_size): re-export with pop-export")
        if len({(l.kv_heads, l.head_dim) for l in kv}) != 1:
            raise PopError("the cost model assumes every layer has the same KV shape")
        return cls(model.hidden_size, model.num_attention_heads, kv[0].kv_heads, kv[0].head_dim,
                   model.intermediate_size, model.vocab_size, len(kv), manifest.pop.prefill_layers)


def layer_linear(s: Shapes) -> int:
    """Projection and MLP FLOPs of one layer for one token."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return 2 * (s.hidden * q + 2 * s.hidden * kv + q * s.hidden + 3 * s.hidden * s.intermediate)


def attention(s: Shapes, new: int, past: int) -> int:
    """Score and value FLOPs of one layer for `new` tokens after `past` cached ones."""
    return 4 * s.heads * s.head_dim * new * (past + new)


def kv_head(s: Shapes) -> int:
    return 2 * 2 * s.hidden * s.kv_heads * s.head_dim


def lm_head(s: Shapes) -> int:
    return 2 * s.hidden * s.vocab


def prefill_graph(s: Shapes, tokens: int) -> int:
    kept = s.keep * (tokens * layer_linear(s) + attention(s, tokens, 0))
    return kept + (s.layers - s.keep) * tokens * kv_head(s)


def decode_graph(s: Shapes, new: int, past: int) -> int:
    return s.layers * (new * layer_linear(s) + attention(s, new, past)) + lm_head(s)


def ttft(s: Shapes, prompt_len: int, mode: str, batch: int = 1) -> int:
    if prompt_len < 1:
        raise ValueError("prompt_len must be at least 1")
    if mode == "full" or prompt_len == 1:
        return batch * decode_graph(s, prompt_len, 0)
    if mode == "pop":
        return batch * (prefill_graph(s, prompt_len - 1) + decode_graph(s, 1, prompt_len - 1))
    raise ValueError(f"unknown mode {mode!r}")


def expected_speedup(s: Shapes, prompt_len: int) -> float:
    return ttft(s, prompt_len, "full") / ttft(s, prompt_len, "pop")


def limit(s: Shapes) -> float:
    return s.layers / s.keep


# --- vision-language models ---------------------------------------------------
# The vision tower runs in both modes, so it dilutes POP's gain:
#     speedup = (vision + full TTFT) / (vision + POP TTFT)
# Per patch and block: qkv and output projections 2*4*h^2, MLP 2*2*h*i, and
# dense attention within the patch's image 4*h*P.  The patch embedding is
# 2*patch_dim*h per patch; each merger maps merge*h -> merge*h -> H per token
# (Qwen3-VL, DeepStack mergers included); a projector h -> H per soft token
# otherwise (Gemma-3, after pooling).

def vision(encoder: Encoder, patches_per_image: list) -> int:
    """FLOPs of the vision tower over the images of one request."""
    h, i, layers = encoder.hidden, encoder.intermediate, encoder.layers
    patches = sum(patches_per_image)
    blocks = layers * (patches * (8 * h * h + 4 * h * i) + sum(4 * h * p * p for p in patches_per_image))
    embed = patches * 2 * encoder.patch_dim * h
    if encoder.merge > 1:
        width, tokens = encoder.merge * h, patches // encoder.merge
        heads = encoder.mergers * tokens * 2 * (width * width + width * encoder.out_hidden)
    else:
        tokens = len(patches_per_image) * (encoder.tokens_per_image or 0)
        heads = tokens * 2 * h * encoder.out_hidden
    return blocks + embed + heads


def expected_speedup_with_images(s: Shapes, prompt_len: int, vision_flops: int) -> float:
    """prompt_len counts every token, image tokens included."""
    return (vision_flops + ttft(s, prompt_len, "full")) / (vision_flops + ttft(s, prompt_len, "pop"))
