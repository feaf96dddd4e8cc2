"""Seeded random models from small configs, with a byte-level tokenizer built
here, so that every code path can be tested offline in seconds.  The VLM
presets come with a processor assembled from HF's own classes, with the real
models' special tokens and chat-template shape."""
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


VLM_NAMES = ("tiny-qwen3-vl", "tiny-gemma3-vl")
NAMES = (*_configs(), *VLM_NAMES)

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]

# The real templates' structure for one image-or-text content list (Qwen3-VL and Gemma-3 -it).
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}IMAGE"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}")
QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 + _CONTENT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
                 + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
                  "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
                  + _CONTENT.replace("IMAGE", "<start_of_image>")
                  + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def byte_tokenizer(extra_specials=(), **named):
    """Byte-level BPE without merges: every byte is a token, specials come first.
    named maps HF's extra special-token attributes (boi_token=...) to tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = SPECIALS + list(extra_specials)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet + list(extra_specials))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   **({"extra_special_tokens": named} if named else {}))


def _tiny_qwen3_vl():
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    tok = byte_tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {k: v for k, v in COMMON.items() if k != "tie_word_embeddings"}
    config = Qwen3VLConfig(
        text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                                 "mrope_interleaved": True}},
        # 3 blocks, DeepStack from the first two: layers 0 and 1 of the LLM take visual input.
        vision_config={"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": COMMON["hidden_size"],
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    # Pixel bounds small enough that a test image is a handful of patches.
    images = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                      size={"shortest_edge": 32 * 32, "longest_edge": 160 * 160})
    from .families.qwen3_vl import image_only_processor
    processor = image_only_processor(images, tok, QWEN_TEMPLATE)
    tok.chat_template = QWEN_TEMPLATE
    return Qwen3VLForConditionalGeneration, config, processor


def _tiny_gemma3_vl():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor
    tok = byte_tokenizer(GEMMA_SPECIALS, boi_token="<start_of_image>", eoi_token="<end_of_image>",
                         image_token="<image_soft_token>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS}
    text_cfg, vocab = _configs()["tiny-gemma3"][1].to_dict(), COMMON["vocab_size"]
    config = Gemma3Config(
        text_config=text_cfg,
        # 64 px / 8 px patches = 8x8, pooled 2x2 to 16 soft tokens: longer than the sliding window of 8.
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64, "patch_size": 8},
        mm_tokens_per_image=16, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True)
    assert max(ids.values()) < vocab
    images = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=GEMMA_TEMPLATE,
                                image_seq_length=16)
    tok.chat_template = GEMMA_TEMPLATE
    return Gemma3ForConditionalGeneration, config, processor


def build(name: str, seed: int = 0):
    """(model, tokenizer, processor); processor is None for text models."""
    if name in VLM_NAMES:
        cls, config, processor = {"tiny-qwen3-vl": _tiny_qwen3_vl, "tiny-gemma3-vl": _tiny_gemma3_vl}[name]()
    else:
        (cls, config), processor = _configs()[name], None
    torch.manual_seed(seed)
    model = cls(config).eval()
    # HF's init (std 0.02) makes logits nearly flat, so greedy parity would hinge on
    # float noise; a wider spread gives decisive argmaxes, as trained models have.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if "embed" in name_ else 0.12)
            elif "norm" in name_ and name_.endswith("weight"):
                # Gemma's RMSNorm scales by 1 + w; LayerNorm (vision towers) and Llama's RMSNorm by w
                one_plus_w = "gemma" in name and not ("vision_tower" in name_ or "visual" in name_)
                p.uniform_(-0.2, 0.2) if one_plus_w else p.uniform_(0.8, 1.2)
    return model, (processor.tokenizer if processor else byte_tokenizer()), processor
