"""Qwen3-VL: a Qwen3 decoder with interleaved M-RoPE and DeepStack, and a ViT
with a 3-D patch embedding, a resampled learned position table, 2-D rotary
embeddings and a 2x2 patch merger.

The text side is Qwen3 over three position axes: HF's rotary module already
takes [3, batch, seq] positions, so only the inputs differ.  DeepStack adds
features from several vision blocks to the hidden states leaving LLM layers
0..n-1 at the image positions.

The vision side is re-wired here around HF's own modules, because HF's forward
derives index tables from the image grids in Python and splits attention per
image with `cu_seqlens`: neither traces.  The runtime computes the tables
(pop.runtime.vision.qwen3_vl) and the graph keeps images apart with a
block-diagonal mask built from one patch -> image index.
"""
import numpy as np
import torch
from torch import nn

from .llama import resample_name
from .qwen3 import Qwen3Adapter


class Qwen3VLAdapter(Qwen3Adapter):
    architectures = ("Qwen3VLForConditionalGeneration",)
    position_axes = 3
    image_inputs = True

    def __init__(self, hf_model):
        super().__init__(hf_model)
        self.deepstack_layers = len(hf_model.config.vision_config.deepstack_visual_indexes)

    @staticmethod
    def text_parts(hf_model):
        return hf_model.config.text_config, hf_model.model.language_model

    def vision_graph(self, attention=None):
        """attention: the fused form's encoder attention (exporter/ops.py), else written out here."""
        return Qwen3VLVision(self.hf.model.visual, attention)

    @staticmethod
    def load_processor(path):
        """HF's processor, or without its video half when that cannot load (its video processor
        needs torchvision, which pop does not install)."""
        import json
        from pathlib import Path

        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (ImportError, ValueError, AttributeError, OSError):
            processor = None
        if hasattr(processor, "image_processor"):
            return processor
        template = None
        for name in ("chat_template.jinja", "chat_template.json"):
            f = Path(path) / name
            if f.is_file():
                text = f.read_text()
                template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        return image_only_processor(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                    template)

    def reference_image_features(self, images):
        """HF's merged image embeddings, and its DeepStack features."""
        with torch.no_grad():
            ref = self.hf.model.get_image_features(**images, return_dict=True)
        out = {"image_embeds": torch.cat(ref.pooler_output).float().numpy()}
        out["deepstack_embeds"] = np.stack([torch.cat(f).float().numpy() for f in ref.deepstack_features])
        return out

    def vision_spec(self, processor):
        """What a runtime needs to turn images into the vision graph's inputs (pop.runtime.vision.qwen3_vl)."""
        ip, cfg = processor.image_processor, self.hf.config
        return {"family": "qwen3_vl", "image_token": processor.image_token, "image_token_id": cfg.image_token_id,
                "vision_start_token_id": cfg.vision_start_token_id,
                "patch_size": ip.patch_size, "temporal_patch_size": ip.temporal_patch_size, "merge_size": ip.merge_size,
                "min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"],
                "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
                "rescale_factor": ip.rescale_factor, "resample": resample_name(ip),
                "num_grid_per_side": int(cfg.vision_config.num_position_embeddings ** 0.5),
                "deepstack_layers": self.deepstack_layers,
                # for pop-bench's cost model: the tower's matmul shapes
                "encoder": {"layers": cfg.vision_config.depth, "hidden": cfg.vision_config.hidden_size,
                            "intermediate": cfg.vision_config.intermediate_size,
                            "patch_dim": ip.temporal_patch_size * 3 * ip.patch_size ** 2,
                            "merge": ip.merge_size ** 2, "mergers": 1 + self.deepstack_layers,
                            "out_hidden": self.cfg.hidden_size}}


def image_only_processor(image_processor, tokenizer, chat_template=None):
    """HF's Qwen3VLProcessor without its video processor, whose class needs
    torchvision (absent here, and not needed for images)."""
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor, tokenizer, chat_template=None):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)
    return ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Qwen3VLVision(nn.Module):
    """pixels [P, C*Tp*p*p] -> merged image embeddings [P/m^2, H] and DeepStack
    features [n, P/m^2, H].  P counts the patches of all images of a request."""

    input_names = ("pixel_values", "pos_index", "pos_weight", "rope_pos", "patch_image")
    output_names = ("image_embeds", "deepstack_embeds")

    def __init__(self, visual, attention=None):
        super().__init__()
        self.visual, self.attention = visual, attention

    def sample(self, patches=28, images=2):
        """Trace inputs of the right shapes and ranges; verification then feeds the runtime's real tables
        (pop.runtime.vision.qwen3_vl) at other sizes."""
        cfg = self.visual.config
        g = torch.Generator().manual_seed(0)
        width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        side = int(cfg.num_position_embeddings ** 0.5)
        pixels = torch.randn(patches, width, generator=g, dtype=self.visual.patch_embed.proj.weight.dtype)
        pos_index = torch.randint(0, side * side, (patches, 4), generator=g)
        pos_weight = torch.rand(patches, 4, generator=g)
        rope_pos = torch.randint(0, side, (patches, 2), generator=g)
        patch_image = torch.arange(patches) * images // patches  # images in order, as the runtime lays them
        return pixels, pos_index, pos_weight, rope_pos, patch_image

    def _attention(self, block, x, cos, sin, mask):
        """mask: same_image (bool [P, P]), or in the fused form its additive bias [1, 1, P, P]."""
        attn = block.attn
        n = x.shape[0]
        if self.attention is not None:  # token-major [P, heads, D], as the operator reads them
            q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).unbind(1)
            cos, sin = cos.transpose(0, 1), sin.transpose(0, 1)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            return attn.proj(self.attention(q[None], k[None], v[None], attn.scaling, mask).reshape(n, -1))
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # [heads, P, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)).float() * attn.scaling
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        out = torch.softmax(scores, dim=-1).to(v.dtype) @ v
        return attn.proj(out.transpose(0, 1).reshape(n, -1))

    def forward(self, pixel_values, pos_index, pos_weight, rope_pos, patch_image):
        vis = self.visual
        h = vis.patch_embed(pixel_values)
        h = h + (vis.pos_embed(pos_index) * pos_weight[:, :, None].to(h.dtype)).sum(1)
        cos, sin = vis.rotary_pos_emb(h, rope_pos)
        cos, sin = cos[None].to(h.dtype), sin[None].to(h.dtype)
        mask = patch_image[:, None] == patch_image[None, :]  # the patches of one image see each other only
        if self.attention is not None:
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(
                ~mask, torch.finfo(h.dtype).min)[None, None]
        deep = []
        for i, block in enumerate(vis.blocks):
            h = h + self._attention(block, block.norm1(h), cos, sin, mask)
            h = h + block.mlp(block.norm2(h))
            if i in vis.deepstack_visual_indexes:
                deep.append(vis.deepstack_merger_list[vis.deepstack_visual_indexes.index(i)](h))
        return vis.merger(h), torch.stack(deep)
