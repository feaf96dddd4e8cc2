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

    def q(self, layer, x):
        return self.layers[layer].self_attn.q_norm(super().q(layer, x))

    def k(self, layer, x, proj=None):
        return self.layers[layer].self_attn.k_norm(super().k(layer, x, proj))

    def attn_branch(self, layer, attn):
        lyr = self.layers[layer]
        return lyr.post_attention_layernorm(lyr.self_attn.o_proj(attn))

    def mlp_branch(self, layer, h):
        lyr = self.layers[layer]
        return lyr.post_feedforward_layernorm(lyr.mlp(lyr.pre_feedforward_layernorm(h)))

    def logits(self, h):
        out = super().logits(h)
        cap = self.cfg.final_logit_softcapping
        if cap:
            out = (out / cap).tanh() * cap
        return out
