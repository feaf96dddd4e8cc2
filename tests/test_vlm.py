"""Vision-language artifacts (tiny-qwen3-vl, tiny-gemma3-vl), end to end on CPU.

Unpruned, the runtime's greedy tokens for text + images must equal HF
generate's, fed by HF's own processor; pruned, every graph must match the
PyTorch POP reference (the export's verification) and greedy POP must equal
the reference's.  Images have different sizes, so Qwen3-VL sees several grids.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, packed_copy_bytes, rope_table_bytes
from pop.exporter import reference
from pop.runtime.errors import PopError
from pop.runtime.session import PopSession

VLMS = ["tiny-qwen3-vl", "tiny-gemma3-vl"]
NEW = 8


def picture(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


CASES = {  # name: images of one prompt
    "one-small": [(70, 45)],
    "one-wide": [(48, 150)],
    "two-images": [(64, 64), (40, 96)],
}


def hf_inputs(loaded, text, images):
    """HF's processor on the text our runtime renders; the chat template already holds the BOS."""
    return loaded.processor(text=[text], images=[images] if images else None, add_special_tokens=False,
                            return_tensors="pt")


def hf_greedy(loaded, inputs, eos):
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=list(eos),
                                    pad_token_id=list(eos)[0])
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module", params=VLMS)
def vlm(request, exports, hf_models):
    name = request.param
    return name, PopSession.load(exports(name)), hf_models(name)


@pytest.mark.parametrize("case", list(CASES))
def test_full_mode_equals_hf_generate(vlm, case):
    """Full mode (the decode graph over the whole prompt, images included) is the unpruned model."""
    name, session, loaded = vlm
    images = [picture(h, w, i) for i, (h, w) in enumerate(CASES[case])]
    text = session.chat_prompt("Describe the image.", len(images))
    inputs = hf_inputs(loaded, text, images)
    got = session.generate(text, NEW, "full", images=[images])
    assert got.prompt_ids[0] == inputs["input_ids"][0].tolist(), "our expanded prompt differs from HF's processor"
    assert got.output_ids[0] == hf_greedy(loaded, inputs, session.eos_ids), (name, case)
    assert got.timings_ms["vision_ms"] > 0


def test_text_only_prompt_on_vlm_artifacts(vlm):
    name, session, loaded = vlm
    text = session.chat_prompt("Tell me a story.")
    assert session.generate(text, NEW, "full").output_ids[0] == hf_greedy(loaded, hf_inputs(loaded, text, None),
                                                                           session.eos_ids)
    keep = session.manifest.pop.prefill_layers
    expected = reference.generate(loaded.model, hf_inputs(loaded, text, None)["input_ids"], keep=keep,
                                  max_new_tokens=NEW, eos_ids=session.eos_ids)[0].tolist()
    got = session.generate(text, NEW)
    assert got.output_ids[0] == expected and got.timings_ms["vision_ms"] == 0


@pytest.mark.parametrize("name", VLMS)
def test_pruned_graphs_match_the_pop_reference(name, exports, hf_models):
    """Default pruning (K = 4 of 6).  The export verified every graph (vision
    included) against the reference within 1e-4 x scale; greedy POP tokens
    with images must also equal the reference's."""
    session = PopSession.load(exports(name))
    report = json.loads((exports(name) / "pop_manifest.json").read_text())["verification"]
    assert report["passed"] and report["image_tokens"] > 0
    for what in ("vision", "prefill_kv", "boundary_logits", "full_logits", "full_kv"):
        assert report[f"{what}_max_abs"] <= 1e-4 * max(1.0, report[f"{what}_scale"]), (what, report)
    m = session.manifest
    assert set(m.graphs) == {"vision", "prefill", "decode"}
    # one weights file for all three graphs, each weight once (vision tower included)
    stored = json.loads((exports(name) / "pop_manifest.json").read_text())
    tables = rope_table_bytes(stored) + packed_copy_bytes(stored)
    assert m.weights.stored_bytes <= m.model.parameter_bytes + tables < m.weights.referenced_bytes
    keep = m.pop.prefill_layers
    assert keep < m.pop.num_layers
    loaded = hf_models(name)
    images = [picture(64, 64, 0), picture(40, 96, 1)]
    text = session.chat_prompt("What differs?", len(images))
    inputs = hf_inputs(loaded, text, images)
    expected = reference.generate_with_images(loaded.model, inputs, keep, NEW, session.eos_ids)
    assert session.generate(text, NEW, "pop", images=[images]).output_ids[0] == expected


def test_deepstack_layers_are_kept(exports):
    """Qwen3-VL adds visual features after LLM layers 0..n-1: K must keep them."""
    from pop.exporter.export import export
    from pop.exporter.options import ExportOptions
    manifest = PopSession.load(exports("tiny-qwen3-vl")).manifest
    deep = manifest.vision.deepstack_layers
    assert deep == 2 and manifest.pop.prefill_layers > deep
    with pytest.raises(PopError, match="DeepStack"):
        export(ExportOptions("tiny-qwen3-vl", "/nonexistent/never-written", prefill_layers=deep),
               progress=lambda m: None)


def test_batched_requests_with_images_match_one_by_one(exports):
    session = PopSession.load(exports("tiny-qwen3-vl"))
    a, b = [picture(70, 45, 0), picture(48, 150, 1)], [picture(64, 64, 2)]
    ta, tb = session.chat_prompt("Compare them.", 2), session.chat_prompt("A long question about this one?", 1)
    both = session.generate([ta, tb], NEW, images=[a, b], stop_at_eos=False).output_ids
    assert both[0] == session.generate(ta, NEW, images=[a], stop_at_eos=False).output_ids[0]
    assert both[1] == session.generate(tb, NEW, images=[b], stop_at_eos=False).output_ids[0]


def test_bad_image_inputs(exports, tmp_path):
    vlm_dir, text_dir = exports("tiny-gemma3-vl"), exports("tiny-llama")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = cli("pop-generate", vlm_dir, "--prompt", "Describe.", "--image", bad)
    assert out.returncode != 0 and "not a readable image" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    good = tmp_path / "good.png"
    picture(32, 32, 0).save(good)
    out = cli("pop-generate", text_dir, "--prompt", "Describe.", "--image", good)
    assert out.returncode != 0 and "text-only" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    session = PopSession.load(vlm_dir)
    text = session.chat_prompt("Describe.", 1)
    with pytest.raises(PopError, match="1 image placeholder.*2 image"):
        session.generate(text, 2, images=[[picture(32, 32, 0), picture(32, 32, 1)]])


def test_generate_cli_with_an_image(exports, tmp_path):
    path = tmp_path / "photo.png"
    picture(50, 80, 3).save(path)
    out = cli("pop-generate", exports("tiny-qwen3-vl"), "--prompt", "Describe the image.", "--image", path,
              "--max-new-tokens", 4, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["output_ids"]) >= 1 and result["vision_ms"] > 0


@pytest.mark.parametrize("name", VLMS)
def test_export_from_a_hub_style_folder(name, exports, tmp_path):
    """A folder as the hub lays it out (weights, tokenizer, preprocessor, chat
    template; for Qwen3-VL also a video processor config, whose class needs
    torchvision) exports to the same graphs as the preset."""
    from pop.exporter import tiny
    from pop.exporter.export import export
    from pop.exporter.options import ExportOptions
    model, tok, processor = tiny.build(name)
    folder = tmp_path / f"{name}-hub"
    model.save_pretrained(folder)
    if name == "tiny-qwen3-vl":
        tok.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(processor.chat_template)
        (folder / "video_preprocessor_config.json").write_text(
            '{"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor"}')
    else:
        processor.save_pretrained(folder)
    out, manifest = export(ExportOptions(str(folder), tmp_path / "out"), progress=lambda m: None)
    assert manifest.verification.passed and manifest.model.source["kind"] == "dir"
    preset = PopSession.load(exports(name))
    assert manifest.vision == preset.manifest.vision
    images = [picture(70, 45, 0)]
    text = preset.chat_prompt("Describe the image.", 1)
    ours = PopSession.load(out).generate(text, NEW, images=[images], stop_at_eos=False).output_ids
    assert ours == preset.generate(text, NEW, images=[images], stop_at_eos=False).output_ids


@pytest.mark.parametrize("name", VLMS)
def test_fused_graphs_attend_through_ort_operators(name, exports):
    """The fused form (the ONNX default) has no attention spelled out in any of its graphs: the vision
    tower's layers are MultiHeadAttention, the text layers GroupQueryAttention (a softmax left anywhere
    would be attention that fell back to primitives).  The export's verification checked their numbers."""
    import onnx
    directory = exports(name)
    session = PopSession.load(directory)
    for graph, spec in session.manifest.graphs.items():
        assert spec.form == "fused", graph
        ops = [n.op_type for n in onnx.load(str(directory / spec.file), load_external_data=False).graph.node]
        attention = "MultiHeadAttention" if graph == "vision" else "GroupQueryAttention"
        assert ops.count(attention) > 0 and "Softmax" not in ops, (graph, sorted(set(ops)))
