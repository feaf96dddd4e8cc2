"""Small pieces that can be checked by hand."""
import numpy as np
import pytest
import torch

from pop.exporter import reference, sources, tiny
from pop.exporter.options import prefill_layers_for
from pop.exporter.families import adapter_for, supported
from pop.runtime import manifest
from pop.runtime.errors import PopError
from pop.runtime.kv import KVBuffer
from pop.runtime.sampling import Sampler


@pytest.mark.parametrize("layers,keep", [(32, 22), (36, 24), (48, 32), (18, 12), (30, 20), (6, 4)])
def test_default_prunes_the_last_third_rounded_down(layers, keep):
    # the paper: Llama-3.1-8B prunes 10 of 32, Qwen3-VL-8B layers 25-36 of 36
    assert prefill_layers_for(layers) == keep


def test_prune_ratio_and_explicit_k():
    assert prefill_layers_for(32, prune_ratio=0.25) == 24
    assert prefill_layers_for(32, prune_ratio=0.0) == 32
    assert prefill_layers_for(32, prefill_layers=7) == 7
    with pytest.raises(PopError, match="1..32"):
        prefill_layers_for(32, prefill_layers=33)
    with pytest.raises(PopError, match=r"\[0, 1\)"):
        prefill_layers_for(32, prune_ratio=1.0)


def test_unsupported_architecture_lists_the_supported():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(PopError) as e:
        adapter_for(model)
    assert "GPT2LMHeadModel" in str(e.value)
    assert all(arch in str(e.value) for arch in supported())
    assert {"LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"} <= set(supported())


def test_unknown_model_names_the_presets():
    with pytest.raises(PopError) as e:
        sources.load("gemma-9000")
    assert "gemma3-270m" in str(e.value) and "llama-3.1-8b" in str(e.value)


@pytest.mark.parametrize("name", tiny.NAMES)
def test_reference_without_pruning_is_hf_generate(name):
    """The reference's own anchor: with K = L it is HF generate, token for token."""
    model, tok, _ = tiny.build(name)
    ids = torch.tensor([tok("It is a truth universally acknowledged").input_ids])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    got = reference.generate(model, ids, max_new_tokens=12)[0]
    assert got.tolist() == expected.tolist()


def test_reference_pruning_changes_only_layers_past_k():
    model, tok, _ = tiny.build("tiny-qwen3")
    ids = torch.tensor([tok("Hello there, general").input_ids])
    mask = torch.ones_like(ids)
    full = reference.cache_tensors(reference.prefill(model, ids, mask, keep=6))
    pop = reference.cache_tensors(reference.prefill(model, ids, mask, keep=4))
    # layer K's input is the output of layer K-1 in both, so its cache is the same too
    for l in range(5):
        assert torch.equal(full[l][0], pop[l][0]) and torch.equal(full[l][1], pop[l][1])
    assert not torch.allclose(full[5][0], pop[5][0], atol=1e-3)


def test_sampler():
    logits = np.array([[0.0, 3.0, 1.0, 2.9]], np.float32)
    assert Sampler()(logits).tolist() == [1]
    assert all(Sampler(1.0, top_k=1, seed=s)(logits).tolist() == [1] for s in range(5))
    assert all(Sampler(1.0, top_p=1e-6, seed=s)(logits).tolist() == [1] for s in range(5))
    draws = {int(Sampler(1.0, top_k=2, seed=s)(logits)[0]) for s in range(50)}
    assert draws == {1, 3}
    with pytest.raises(ValueError):
        Sampler(temperature=-1)


def test_kv_buffer_views_stay_contiguous():
    kv = KVBuffer(num_layers=3, kv_heads=2, head_dim=4, max_seq_len=10, dtype=np.float32, batch=4)
    storage = kv._storage
    kv.use(2)
    assert kv._storage is storage  # a smaller batch reuses the allocation
    block = kv.block(1, 0, 3)  # layer 1's keys of rows 0..2: what a graph binds as past_key_1
    assert block.shape == (3, 2, 10, 4) and block.flags.c_contiguous
    assert block.ctypes.data == storage.ctypes.data + (1 * 2 + 0) * 4 * 2 * 10 * 4 * 4  # [layer, k|v, row, ...]
    new = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4) + 1  # 3 new tokens of 2 rows
    kv.place(2, 1, new, [5, 0])  # row 0 continues at slot 5, row 1 starts at 0
    np.testing.assert_array_equal(kv.cache[2, 1, 0, :, 5:8], new[0])
    np.testing.assert_array_equal(kv.cache[2, 1, 1, :, 0:3], new[1])
    assert np.count_nonzero(kv.cache) == new.size  # nothing else was touched


def test_kv_buffer_over_device_tensors(monkeypatch):
    """AOTInductor packages for CUDA keep the KV buffer and the staging as torch tensors on the device
    (backends/aoti.py); the runtime's placement and views work on them as on numpy arrays (torch CPU
    tensors here, the same indexing)."""
    from pop.runtime.backends.aoti import _torch_dtype
    from pop.runtime.kv import Staging

    def zeros(shape, dtype):
        return torch.zeros(shape, dtype=_torch_dtype(torch, dtype))
    host = KVBuffer(num_layers=2, kv_heads=2, head_dim=4, max_seq_len=10, dtype=np.float32, batch=3)
    dev = KVBuffer(num_layers=2, kv_heads=2, head_dim=4, max_seq_len=10, dtype=np.float32, batch=3, zeros=zeros)
    staged = Staging(np.float32, zeros).views([(3, 2, 2, 4)] * 2)
    assert all(isinstance(v, torch.Tensor) and v.is_contiguous() for v in staged)
    new = np.random.default_rng(0).standard_normal((3, 2, 2, 4)).astype(np.float32)
    staged[1].copy_(torch.from_numpy(new))
    start = np.array([0, 4, 8])
    host.place(1, 0, new, start)
    dev.place(1, 0, staged[1], start)
    np.testing.assert_array_equal(dev._storage.numpy(), host._storage)
    assert dev.block(1, 0, 2).shape == (2, 2, 10, 4) and dev.nbytes == host.nbytes
    assert _torch_dtype(torch, manifest.np_dtype("bfloat16")) == torch.bfloat16


@pytest.mark.parametrize("name, low, high", [("llama-3.1-8b-shape", 8_030_261_248, 8_030_261_248),
                                             ("qwen3-vl-8b-shape", 7.9e9, 8.4e9),
                                             ("gemma-3-12b-shape", 11.5e9, 12.2e9)])
def test_shape_presets_have_the_papers_sizes(name, low, high):
    """Built on the meta device (no memory): Llama-3.1-8B's exact parameter count, and the language models of
    Qwen3-VL-8B and Gemma-3-12B (their published totals less the vision towers) within a few percent."""
    from pop.exporter import shapes
    model = shapes.build(name, torch.bfloat16, "meta")[0]
    count = sum(p.numel() for p in model.parameters())
    assert low <= count <= high, count
    assert name in sources.preset_names()


def test_manifest_round_trip(exports, tmp_path):
    """A real manifest survives load -> save -> load as the same tree and the same JSON; the checks refuse
    what a runtime would misread."""
    import json
    import shutil
    src = exports("tiny-llama")
    art = tmp_path / "art"
    shutil.copytree(src, art)
    loaded = manifest.Manifest.load(art)
    assert loaded.pop.prefill_layers == 4 and loaded.graphs["decode"].output("logits").shape[-1] == loaded.vocab_size
    assert loaded.verification.passed and loaded.memory.kv_buffer_bytes > 0
    loaded.save(art)
    assert json.loads((art / manifest.FILE).read_text()) == json.loads((src / manifest.FILE).read_text())
    assert manifest.Manifest.load(art) == loaded

    def broken(change, needle):
        data = json.loads((src / manifest.FILE).read_text())
        change(data)
        (art / manifest.FILE).write_text(json.dumps(data))
        with pytest.raises(PopError, match=needle):
            manifest.Manifest.load(art)
    broken(lambda d: d.pop("kv_cache"), "missing fields: kv_cache")
    broken(lambda d: d["pop"].update(prefill_layers="four"), "prefill_layers should be int")
    broken(lambda d: d["graphs"]["decode"].pop("file"), "decode is missing fields: file")
    broken(lambda d: d.update(schema_version=99), "schema version 99")
    broken(lambda d: d.update(format="other"), "not a pop manifest")
    (art / manifest.FILE).write_text((src / manifest.FILE).read_text())
    (art / "weights.bin").write_bytes(b"ab")
    with pytest.raises(PopError, match="corrupt or mismatched"):
        manifest.Manifest.load(art)


def test_local_hf_folder(tmp_path):
    model, tok, _ = tiny.build("tiny-qwen3")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = sources.load(str(tmp_path / "m"))
    assert loaded.source["kind"] == "dir" and loaded.name == "m"
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(PopError, match="no config.json"):
        sources.load(str(tmp_path))


def test_export_flags_build_the_options():
    from pop.cli.export import options
    o = options(["--model", "tiny-llama", "--format", "aoti", "--prefill-layers", "3", "--kv-heads", "fitted",
                 "--calib", "c.txt", "--ridge", "0.1"])
    assert (o.model, o.format, o.prefill_layers, o.kv_heads, o.calib, o.ridge) == \
        ("tiny-llama", "aoti", 3, "fitted", "c.txt", "0.1")
    assert o.command == "pop-export --model tiny-llama --format aoti --prefill-layers 3 --kv-heads fitted " \
                        "--calib c.txt --ridge 0.1"
    assert options(["--model", "m"]).format == "onnx"
    # the flag's old name still works, and cannot contradict the new one
    assert options(["--model", "m", "--backend", "trt"]).format == "trt"
    with pytest.raises(SystemExit):
        options(["--model", "m", "--backend", "trt", "--format", "onnx"])
