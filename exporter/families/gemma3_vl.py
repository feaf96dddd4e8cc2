"""Gemma-3 multimodal: the Gemma-3 text decoder, whose image tokens attend to
each other bidirectionally, and a SigLIP tower whose patches are average-pooled
and projected to a fixed number of soft tokens per image (256 in Gemma-3)."""
import contextlib

from torch import nn
from transformers import AttentionInterface

from .gemma3 import Gemma3Adapter
from .llama import resample_name


class Gemma3VLAdapter(Gemma3Adapter):
    architectures = ("Gemma3ForConditionalGeneration",)
    image_inputs = True
    bidirectional_images = True

    @staticmethod
    def text_parts(hf_model):
        return hf_model.config.text_config, hf_model.model.language_model

    def vision_graph(self, attention=None):
        """attention: the fused form's encoder attention (exporter/ops.py), else HF's own."""
        return Gemma3Vision(self.hf.model, attention)

    def vision_spec(self, processor):
        """What a runtime needs to turn images into the vision graph's inputs (pop.runtime.vision.gemma3)."""
        ip, cfg = processor.image_processor, self.hf.config
        vc = cfg.vision_config
        return {"family": "gemma3", "image_token": processor.boi_token, "image_token_id": cfg.image_token_index,
                "full_image_sequence": processor.full_image_sequence, "tokens_per_image": cfg.mm_tokens_per_image,
                "image_size": cfg.vision_config.image_size, "image_mean": list(ip.image_mean),
                "image_std": list(ip.image_std), "rescale_factor": ip.rescale_factor, "resample": resample_name(ip),
                # for pop-bench's cost model: the tower's matmul shapes
                "encoder": {"layers": vc.num_hidden_layers, "hidden": vc.hidden_size,
                            "intermediate": vc.intermediate_size, "patch_dim": 3 * vc.patch_size ** 2,
                            "patches_per_image": (vc.image_size // vc.patch_size) ** 2, "merge": 1, "mergers": 0,
                            "tokens_per_image": cfg.mm_tokens_per_image,
                            "out_hidden": self.cfg.hidden_size}}


class Gemma3Vision(nn.Module):
    """pixels [images, 3, S, S] -> soft-token embeddings [images * tokens, H]."""

    input_names = ("pixel_values",)
    output_names = ("image_embeds",)

    def __init__(self, hf_body, attention=None):
        super().__init__()
        self.tower, self.projector = hf_body.vision_tower, hf_body.multi_modal_projector
        self.attention = attention

    def sample(self, images=2):
        size = self.tower.config.image_size
        return (nn.init.normal_(self.projector.mm_input_projection_weight.new_empty(images, 3, size, size)),)

    def forward(self, pixel_values):
        with _siglip_attention(self.tower.config, self.attention):
            out = self.projector(self.tower(pixel_values=pixel_values).last_hidden_state)
        return out.reshape(-1, out.shape[-1])


@contextlib.contextmanager
def _siglip_attention(config, attention):
    """Runs SigLIP's attention layers through `attention` (q, k, v [B, S, H, D], scale, bias -> [B, S, H, D])
    by HF's AttentionInterface, for this forward only: the same HF model also serves as the reference.
    HF hands over [B, H, S, D]; the transposes back cancel against its own in ONNX Runtime's optimizer."""
    if attention is None:
        yield
        return
    AttentionInterface.register("pop_encoder", lambda module, q, k, v, mask, scaling, **_: (attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scaling, mask), None))
    before = config._attn_implementation
    config._attn_implementation = "pop_encoder"
    try:
        yield
    finally:
        config._attn_implementation = before
