"""The paper's models at their real shapes, with seeded random weights: for timing only.

`llama-3.1-8b-shape`, `qwen3-vl-8b-shape` and `gemma-3-12b-shape` have the architecture,
sizes, RoPE and attention layout of the language models of Llama-3.1-8B, Qwen3-VL-8B
and Gemma-3-12B (their published config.json), and weights drawn from a seeded normal:
the latency of text prompts at the paper's shapes can be measured on any GPU without
downloading weights.  The vision towers are not built: time images on the real
checkpoints.  Their outputs mean nothing; quality must be measured on the real
checkpoints (`pop-eval`).  `gemma3-270m-shape` is Gemma-3 270M's shape, small enough
for parity checks on a GPU.

"""
import torch

from .tiny import byte_tokenizer

TIMING_ONLY = "random weights at the real model's shape: for timing only; the outputs mean nothing"


def _llama_31_8b():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM, LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def _gemma3_text(**sizes):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    layers = sizes["num_hidden_layers"]
    return Gemma3ForCausalLM, Gemma3TextConfig(
        **sizes, rms_norm_eps=1e-6, query_pre_attn_scalar=sizes["head_dim"],
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": ({"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
                                            if sizes["hidden_size"] > 1000 else
                                            {"rope_type": "default", "rope_theta": 1e6})},
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def _gemma3_270m():
    return _gemma3_text(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                        max_position_embeddings=32768)


def _gemma3_12b():
    return _gemma3_text(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                        max_position_embeddings=131072)


def _qwen3_vl_8b():
    """Qwen3-VL-8B's language model: for text, its M-RoPE gives every axis the same position, which is
    Qwen3's 1-D RoPE, so a Qwen3 decoder at its sizes costs what it costs on a text prompt."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM, Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6}, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645)


SHAPES = {"llama-3.1-8b-shape": _llama_31_8b, "qwen3-vl-8b-shape": _qwen3_vl_8b, "gemma-3-12b-shape": _gemma3_12b,
          "gemma3-270m-shape": _gemma3_270m}
NAMES = tuple(SHAPES)


def config(name):
    """(model class, config) of a shape preset."""
    return SHAPES[name]()


@torch.no_grad()
def build(name, dtype=torch.bfloat16, device="cpu", seed=0):
    """(model, tokenizer, None): the shape's model with seeded random weights (HF's own initialisation,
    made on `device` in `dtype`, so an 8B model needs its weights' memory once).  The tokenizer is a
    byte-level one: prompts for timing are token ids anyway."""
    cls, cfg = config(name)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), byte_tokenizer(), None
