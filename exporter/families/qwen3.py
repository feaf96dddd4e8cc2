"""Qwen3: Llama plus per-head RMSNorm on queries and keys (before RoPE)."""
from .llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    architectures = ("Qwen3ForCausalLM",)

    def q(self, layer, x):
        return self.layers[layer].self_attn.q_norm(super().q(layer, x))

    def k(self, layer, x, proj=None):
        return self.layers[layer].self_attn.k_norm(super().k(layer, x, proj))
