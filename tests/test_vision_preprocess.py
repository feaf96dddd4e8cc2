"""pop.runtime.vision and pop.runtime.chat against the real transformers code they port
(PIL backends: torchvision is not installed, so HF itself takes these paths)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast,
                          Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLModel, vision_utils)
from transformers.image_utils import PILImageResampling
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from pop.exporter.families.qwen3_vl import image_only_processor
from pop.runtime.chat import render, user_message
from pop.runtime.errors import PopError
from pop.runtime.vision import load_image, processor_for
from pop.runtime.manifest import Encoder, Merge, Vision

QWEN_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
GEMMA_SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


# ---- HF objects, built offline ------------------------------------------------------------

def byte_tokenizer(specials, **named):
    """A byte-level tokenizer with specials, in the style of exporter/tiny.py."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[]))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", padding_side="left", **named)


def qwen_processor(min_pixels=64 * 64, max_pixels=256 * 256):
    images = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                      min_pixels=min_pixels, max_pixels=max_pixels)
    return image_only_processor(images, byte_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>"))


def qwen_model(processor):
    """A tiny Qwen3VLModel: get_rope_index only reads the vision config."""
    tok = processor.tokenizer
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        vision_start_token_id=processor.vision_start_token_id, vision_end_token_id=processor.vision_end_token_id)
    return Qwen3VLModel(config).eval()


def qwen_spec(processor, model):
    """Where each manifest value comes from."""
    images = processor.image_processor
    return spec(**{"family": "qwen3_vl", "image_token": processor.image_token, "image_token_id": processor.image_token_id,
            "vision_start_token_id": processor.vision_start_token_id,
            "patch_size": images.patch_size, "temporal_patch_size": images.temporal_patch_size,
            "merge_size": images.merge_size,
            "min_pixels": images.size["shortest_edge"], "max_pixels": images.size["longest_edge"],
            "image_mean": list(images.image_mean), "image_std": list(images.image_std),
            "rescale_factor": images.rescale_factor, "resample": PILImageResampling(images.resample).name.lower(),
            "num_grid_per_side": model.visual.num_grid_per_side})


def gemma_processor(size=64, image_seq_length=16):
    # Gemma 3's preprocessor_config: bilinear, mean = std = 0.5, 1/255.
    images = Gemma3ImageProcessorPil(size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tok = byte_tokenizer(GEMMA_SPECIALS, bos_token="<bos>", eos_token="<eos>", extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    return Gemma3Processor(images, tok, image_seq_length=image_seq_length)


def gemma_spec(processor):
    images = processor.image_processor
    return spec(**{"family": "gemma3", "image_token": processor.image_token,
            "image_token_id": processor.tokenizer.image_token_id,
            "full_image_sequence": processor.full_image_sequence, "tokens_per_image": processor.image_seq_length,
            "image_size": images.size["height"], "image_mean": list(images.image_mean),
            "image_std": list(images.image_std), "rescale_factor": images.rescale_factor,
            "resample": PILImageResampling(images.resample).name.lower()})


def spec(**fields):
    """The manifest's vision section; the encoder's shapes (for pop-bench's cost model) do not matter here."""
    return Vision(**fields, encoder=Encoder(1, 1, 1, 1, 1, 0, 1), merge=Merge([], ""))


def save_png(tmp_path, width, height, seed, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    path = tmp_path / f"{width}x{height}-{mode}-{seed}.png"
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.fixture(scope="module")
def qwen():
    processor = qwen_processor()
    model = qwen_model(processor)
    return processor, processor_for(qwen_spec(processor, model)), model


@pytest.fixture(scope="module")
def gemma():
    processor = gemma_processor()
    return processor, processor_for(gemma_spec(processor))


# ---- Qwen3-VL ---------------------------------------------------------------------------------

# 70x45 is scaled up to min_pixels, 400x300 down to max_pixels, 128x96 only rounded.
@pytest.mark.parametrize("sizes", [[(70, 45), (128, 96)], [(400, 300)], [(45, 70), (96, 96), (33, 130)]])
def test_qwen_pixels_match_hf(tmp_path, qwen, sizes):
    processor, ours, _ = qwen
    paths = [save_png(tmp_path, w, h, seed) for seed, (w, h) in enumerate(sizes)]
    hf = processor.image_processor([Image.open(p) for p in paths], return_tensors="np")
    patches, grids = ours.pixels(paths)
    assert patches.dtype == np.float32 and grids.dtype == np.int64
    np.testing.assert_array_equal(grids, hf["image_grid_thw"])
    assert patches.shape == hf["pixel_values"].shape
    assert np.abs(patches - hf["pixel_values"]).max() <= 1e-5


def test_qwen_max_pixels_is_hit(tmp_path, qwen):
    _, ours, _ = qwen
    _, grids = ours.pixels([save_png(tmp_path, 400, 300, 0)])
    assert grids[0].prod() * 16 * 16 <= ours.spec.max_pixels < 400 * 300


def test_qwen_vision_inputs_match_hf(qwen):
    _, ours, _ = qwen
    grids = np.array([[1, 4, 6], [1, 16, 10], [2, 6, 4], [1, 2, 2]])
    got = ours.vision_inputs(grids)
    grid_t = torch.from_numpy(grids)
    index, weight = vision_utils.get_vision_interpolation_indices_and_weights(
        grid_t, ours.spec.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    np.testing.assert_array_equal(got["pos_index"], index.numpy())
    assert got["pos_weight"].dtype == np.float32
    np.testing.assert_array_equal(got["pos_weight"], weight.numpy())  # same float32 steps: bit-exact
    np.testing.assert_array_equal(got["rope_pos"], vision_utils.get_vision_position_ids(grid_t, 2).numpy())
    cu_seqlens = vision_utils.get_vision_cu_seqlens(grid_t, merge_temporal=False).numpy()
    segments = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))
    np.testing.assert_array_equal(got["patch_image"], segments)


def test_qwen_expand_matches_processor(tmp_path, qwen):
    processor, ours, _ = qwen
    images = [Image.open(save_png(tmp_path, w, h, s)) for s, (w, h) in enumerate([(70, 45), (128, 96)])]
    text = "<|vision_start|><|image_pad|><|vision_end|>and<|vision_start|><|image_pad|><|vision_end|>which?"
    hf = processor(images=images, text=text)
    _, grids = ours.pixels(images)
    expanded = ours.expand(text, grids)
    assert processor.tokenizer(expanded)["input_ids"] == hf["input_ids"][0]
    assert expanded.count("<|image_pad|>") == sum(ours.tokens_per_image(g) for g in grids)


def test_qwen_positions_match_get_rope_index(tmp_path, qwen):
    processor, ours, model = qwen
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    images = [Image.open(save_png(tmp_path, w, h, s)) for s, (w, h) in enumerate([(70, 45), (128, 96), (96, 64)])]
    # Row 0: two images; row 1: shorter, left-padded, one image and text after it.
    texts = [f"<|im_start|>user\n{pad}{pad}two?<|im_end|>", f"hi {pad} and?"]
    hf = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert hf["attention_mask"][1, 0] == 0  # the second row really is padded
    expected, expected_deltas = model.get_rope_index(
        hf["input_ids"], hf["mm_token_type_ids"], image_grid_thw=hf["image_grid_thw"],
        attention_mask=hf["attention_mask"])
    got, deltas = ours.positions(hf["input_ids"].numpy(), hf["attention_mask"].numpy(), hf["image_grid_thw"].numpy())
    assert got.dtype == np.int64 and deltas.shape == (2,)
    np.testing.assert_array_equal(got, expected.numpy())
    np.testing.assert_array_equal(deltas, expected_deltas.numpy()[:, 0])
    assert (got[:, 1, hf["attention_mask"][1].numpy() == 0] == 0).all()  # HF leaves padded slots at 0


def test_qwen_positions_single_row_no_mask_padding(tmp_path, qwen):
    processor, ours, model = qwen
    images = [Image.open(save_png(tmp_path, 400, 300, 3))]
    hf = processor(images=images, text=["a<|vision_start|><|image_pad|><|vision_end|>b"], return_tensors="pt")
    expected, expected_deltas = model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"],
                                                     image_grid_thw=hf["image_grid_thw"])
    got, deltas = ours.positions(hf["input_ids"].numpy(), hf["attention_mask"].numpy(), hf["image_grid_thw"].numpy())
    np.testing.assert_array_equal(got, expected.numpy())
    np.testing.assert_array_equal(deltas, expected_deltas.numpy()[:, 0])


# ---- Gemma 3 ----------------------------------------------------------------------------------

def test_gemma_pixels_match_hf(tmp_path, gemma):
    processor, ours = gemma
    paths = [save_png(tmp_path, 70, 45, 0), save_png(tmp_path, 128, 96, 1), save_png(tmp_path, 40, 90, 2, "RGBA")]
    hf = processor.image_processor([Image.open(p) for p in paths], return_tensors="np")["pixel_values"]
    got = ours.pixels(paths)
    assert got.dtype == np.float32 and got.shape == hf.shape == (3, 3, 64, 64)
    assert np.abs(got - hf).max() <= 1e-5


def test_gemma_expand_and_groups_match_processor(tmp_path, gemma):
    processor, ours = gemma
    images = [Image.open(save_png(tmp_path, 70, 45, s)) for s in range(3)]
    texts = ["<start_of_turn>user\n<start_of_image><start_of_image>two?", "one <start_of_image>?"]
    hf = processor(images=[images[:2], images[2:]], text=texts, padding=True, return_tensors="pt")
    expanded = [ours.expand(t, t.count("<start_of_image>")) for t in texts]
    assert processor.tokenizer(expanded, padding=True)["input_ids"] == hf["input_ids"].tolist()
    groups = ours.token_groups(hf["input_ids"].numpy(), hf["attention_mask"].numpy())
    expected = get_block_sequence_ids_for_mask(hf["token_type_ids"]).numpy() + 1
    np.testing.assert_array_equal(groups, expected)
    assert groups.max(axis=1).tolist() == [2, 1]


# ---- bad input ---------------------------------------------------------------------------------

def test_unreadable_images_raise_poperror(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for path in (tmp_path / "missing.png", corrupt, tmp_path):
        with pytest.raises(PopError, match="not a readable image"):
            load_image(path)


def test_placeholder_mismatch_raises_poperror(qwen, gemma):
    _, q, _ = qwen
    _, g = gemma
    grids = np.array([[1, 4, 4], [1, 4, 4]])
    with pytest.raises(PopError, match=r"1 image placeholder\(s\) .* but 2 image\(s\)"):
        q.expand("<|image_pad|>", grids)
    with pytest.raises(PopError, match=r"3 image placeholder\(s\) .* but 2 image\(s\)"):
        q.expand("<|image_pad|>" * 3, grids)
    with pytest.raises(PopError, match=r"0 image placeholder\(s\) .* but 1 image\(s\)"):
        g.expand("no image here", 1)
    with pytest.raises(PopError, match=r"2 image placeholder\(s\) .* but 1 image\(s\)"):
        g.expand("<start_of_image><start_of_image>", 1)
    with pytest.raises(PopError, match="unknown vision family"):
        processor_for(spec(family="llava", image_token="<image>", image_token_id=1, image_mean=[0.5] * 3,
                           image_std=[0.5] * 3, rescale_factor=1 / 255, resample="bilinear"))


def test_runtime_does_not_import_torch_or_transformers():
    code = ("import sys, pop.runtime.vision, pop.runtime.vision.qwen3_vl, pop.runtime.vision.gemma3, "
            "pop.runtime.chat; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- chat templates -------------------------------------------------------------------------------

QWEN_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.content is string %}
        {{- message.content }}
    {%- else %}
        {%- for content in message.content %}
            {%- if content.type == 'image' or 'image' in content %}
                {%- set image_count.value = image_count.value + 1 %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'text' in content %}
                {{- content.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_chat_render_matches_apply_chat_template(family):
    processor = qwen_processor() if family == "qwen" else gemma_processor()
    tok = processor.tokenizer
    template = QWEN_TEMPLATE if family == "qwen" else GEMMA_TEMPLATE
    conversations = [user_message("What is in these pictures? ", 2),
                     [{"role": "system", "content": "Be brief."}, *user_message("Describe it.", 1),
                      {"role": "assistant", "content": " A cat. "}, {"role": "user", "content": "And now?"}]]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            got = render(template, messages, add_generation_prompt=add_generation_prompt, **tok.special_tokens_map)
            assert got == expected


def test_chat_raise_exception_is_poperror():
    messages = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(PopError, match="roles must alternate"):
        render(GEMMA_TEMPLATE, messages, bos_token="<bos>")


def test_chat_tojson_and_strftime_like_hf():
    template = "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
    assert render(template, [{"role": "user", "content": "<é>"}]) == '[{"role": "user", "content": "<é>"}]|4'
