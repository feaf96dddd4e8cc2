"""Qwen3: Llama plus per-head RMSNorm on queries and keys (before RoPE)."""
from .llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    architectures = ("Qwen3ForCausalLM",)

    def qk_norms(self, layer):
        attn = self.layers[layer].self_attn
        return attn.q_norm, attn.k_norm
