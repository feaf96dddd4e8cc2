"""Gemma-3 text: sliding and global layers with their own RoPE bases, a scaled
embedding (inside HF's embedding module), q/k norm, query_pre_attn_scalar, and
sandwich norms around both residual branches."""
from .llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    architectures = ("Gemma3ForCausalLM",)
    fp16_warning = ("Gemma-3 was trained in bf16 and its activations outgrow fp16's range; fp16 graphs may lose "
                    "accuracy (verification will say): prefer --dtype bf16 on a GPU, or fp32")

    def attn_scale(self, layer):
        return float(self.cfg.query_pre_attn_scalar) ** -0.5

    def attn_softcap(self):
        return self.cfg.attn_logit_softcapping

    def rope_kind(self, layer):
        return self.cfg.layer_types[layer]

    def rope(self, kind, position_ids, like):
        return self.body.rotary_emb(like, position_ids, kind)

    def qk_norms(self, layer):
        attn = self.layers[layer].self_attn
        return attn.q_norm, attn.k_norm

    def mlp_norm(self, layer):
        return self.layers[layer].pre_feedforward_layernorm

    def branch_norms(self, layer):
        """Sandwich norms: each branch is normed before the residual add."""
        lyr = self.layers[layer]
        return lyr.post_attention_layernorm, lyr.post_feedforward_layernorm

    def lm_head(self, x):
        out = super().lm_head(x)
        cap = self.cfg.final_logit_softcapping
        if cap:
            out = (out / cap).tanh() * cap
        return out
