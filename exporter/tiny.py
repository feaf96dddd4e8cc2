"""Seeded random models from small configs, with a byte-level tokenizer built
here, so that every code path can be tested offline in seconds."""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM)

SPECIALS = ["<pad>", "<bos>", "<eos>"]
VOCAB = 320  # 3 specials + 256 bytes, rounded up

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


def _configs():
    return {
        "tiny-llama": (LlamaForCausalLM, LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "tiny-qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        # Window 8 so that tests cross it with short prompts; pattern of 3 like the real 5:1.
        "tiny-gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(
            **COMMON, sliding_window=8, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    }


NAMES = tuple(_configs())


def byte_tokenizer():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build(name: str, seed: int = 0):
    cls, config = _configs()[name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    # HF's init (std 0.02) makes logits nearly flat, so greedy parity would hinge on
    # float noise; a wider spread gives decisive argmaxes, as trained models have.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if "embed" in name_ else 0.12)
            elif "norm" in name_:
                p.uniform_(-0.2, 0.2) if isinstance(model, Gemma3ForCausalLM) else p.uniform_(0.8, 1.2)
    return model, byte_tokenizer()
