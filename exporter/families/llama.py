"""Llama family (Llama-3.x, SmolLM2): the base adapter the other families refine.

An adapter exposes the pieces of one architecture that POP needs, over the HF
modules and their weights, and knows nothing about POP itself.  Tensors are
[batch, seq, heads, head_dim] for q/k/v and [batch, seq, hidden] for h.
"""
import torch


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    # x: [B, T, H, D]; cos/sin: [B, T, D]
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


class LlamaAdapter:
    architectures = ("LlamaForCausalLM",)

    # What a graph takes beyond ids, positions and the cache (see exporter/pop.py)
    position_axes = 1  # 3 for M-RoPE
    image_inputs = False  # vision features scattered into the token embeddings
    deepstack_layers = 0  # visual features added after layers 0..n-1 (Qwen3-VL)
    bidirectional_images = False  # an image's tokens attend to each other (Gemma-3)
    fp16_warning = None  # said when a user exports this family in fp16, where it loses range

    def __init__(self, hf_model):
        self.hf = hf_model
        self.cfg, self.body = self.text_parts(hf_model)
        self.layers = self.body.layers
        self.num_layers = self.cfg.num_hidden_layers
        self.num_heads = self.cfg.num_attention_heads
        self.num_kv_heads = self.cfg.num_key_value_heads
        self.head_dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.num_heads

    @staticmethod
    def load_processor(path):
        """A VLM's HF processor (images, placeholders, chat template) from its folder."""
        from transformers import AutoProcessor
        from pop.runtime.errors import PopError
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (ImportError, ValueError, AttributeError, OSError):
            processor = None
        if not hasattr(processor, "image_processor"):
            raise PopError(f"{path}: its image processor cannot be loaded (preprocessor_config.json)")
        return processor

    def reference_image_features(self, images: dict) -> dict:
        """HF's own features of a processor's images, by the vision graph's output names: the
        reference the exported vision graph is verified against."""
        import torch
        with torch.no_grad():
            ref = self.hf.model.get_image_features(**images, return_dict=True)
        embeds = ref.pooler_output
        embeds = torch.cat(embeds) if isinstance(embeds, (tuple, list)) else embeds
        return {"image_embeds": embeds.reshape(-1, embeds.shape[-1]).float().numpy()}

    @staticmethod
    def text_parts(hf_model):
        """(text config, decoder body); a VLM keeps them one level down."""
        return hf_model.config, hf_model.model

    # --- per-layer facts --------------------------------------------------
    def sliding_window(self, layer: int):
        types = getattr(self.cfg, "layer_types", None)
        if types and types[layer] == "sliding_attention":
            return int(self.cfg.sliding_window)
        return None

    def attn_scale(self, layer: int) -> float:
        return self.head_dim ** -0.5

    def attn_softcap(self):
        return None

    # --- computation --------------------------------------------------------
    # Norms are the HF RMSNorm modules: the plain graphs call them, the fused ones read their
    # weight and epsilon (exporter/ops.py, graph_norm).
    def embed(self, input_ids):
        return self.body.embed_tokens(input_ids)

    def rope_kind(self, layer: int) -> str:
        """Layers of one kind share a rotary table, so it is computed once per graph."""
        return "default"

    def rope(self, kind: str, position_ids, like):
        """(cos, sin) [B, T, D] at position_ids, HF's own rotary module."""
        return self.body.rotary_emb(like, position_ids)

    def input_norm(self, layer: int):
        return self.layers[layer].input_layernorm

    def attn_norm(self, layer: int, h):
        return self.input_norm(layer)(h)

    def mlp_norm(self, layer: int):
        """The norm between the attention's residual add and the MLP."""
        return self.layers[layer].post_attention_layernorm

    def final_norm(self):
        return self.body.norm

    def qk_norms(self, layer: int):
        """(q norm, k norm) over head_dim before RoPE, or (None, None)."""
        return None, None

    def q(self, layer: int, x):
        """[B, T, Hq*D], projected (the graph splits heads where it needs them, and applies the q norm)."""
        return self.layers[layer].self_attn.q_proj(x)

    def qkv_proj(self, layer: int):
        """The (Q, K, V) Linear modules, which the fused form packs into one (PopGraph.packed)."""
        attn = self.layers[layer].self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj

    def mlp_parts(self, layer: int):
        """(gate Linear, up Linear, activation, down Linear): mlp_out(x) = down(act(gate(x)) * up(x))."""
        mlp = self.layers[layer].mlp
        return mlp.gate_proj, mlp.up_proj, mlp.act_fn, mlp.down_proj

    def kv_proj(self, layer: int):
        """The (K, V) Linear modules, which fitted KV heads (exporter/fitted_heads.py) stand in for."""
        attn = self.layers[layer].self_attn
        return attn.k_proj, attn.v_proj

    def k(self, layer: int, x, proj=None):
        """[B, T, Hkv*D].  proj, when given, replaces the layer's K projection; what follows it (k-norm) stays
        the layer's."""
        return (self.kv_proj(layer)[0] if proj is None else proj)(x)

    def v(self, layer: int, x, proj=None):
        return (self.kv_proj(layer)[1] if proj is None else proj)(x)

    def attn_out(self, layer: int, attn):
        """What the attention sub-block adds to the residual stream, from the heads' output [B, T, Hq*D]."""
        return self.layers[layer].self_attn.o_proj(attn)

    def mlp_out(self, layer: int, x):
        """What the MLP sub-block adds to the residual stream, from its normed input."""
        return self.layers[layer].mlp(x)

    def branch_norms(self, layer: int):
        """(norm of the attention branch, norm of the MLP branch) before their residual adds, or None:
        Gemma's sandwich norms.  The graph applies them (ops.norm), so they fuse like the others."""
        return None, None

    def lm_head(self, x):
        """Logits from the final norm's output."""
        return self.hf.lm_head(x)


def resample_name(image_processor):
    """PIL's resampling filter of an HF image processor, by name ("bicubic"), for the manifest."""
    from PIL import Image
    return Image.Resampling(int(image_processor.resample)).name.lower()
