"""The C++ runtime (runtime/cpp) on AOTInductor exports, through its C ABI (ctypes) and its example server.

`make cpp` runs once per session here, so CI builds libpop on a fresh clone.  The
exports are AOTI-compiled with a small max_seq_len: compiling is the slow part.
"""
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pop.exporter import reference
from pop.exporter.export import export
from pop.exporter.options import ExportOptions
from pop.runtime.native import NativeError, NativeSession, library
from pop.runtime.session import PopSession

from conftest import hf_greedy

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ = 64
# Llama's path, and Gemma-3's, which adds q/k norms (all Qwen3 adds), sliding windows, sandwich norms,
# scaled embeddings and a query scale: compiling is the slow part, so the families that add nothing new are left out
TINY = ["tiny-llama", "tiny-gemma3"]
# Byte-level prompts; the 38-token one is far past tiny-gemma3's sliding window of 8.
PROMPTS = ["Hello there, general", "It is a truth universally acknowledged, t", "A"]
NEW = 16


@pytest.fixture(scope="session")
def libpop():
    started = time.perf_counter()
    out = subprocess.run(["make", "cpp", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"make cpp: {time.perf_counter() - started:.0f} s")
    return library()


@pytest.fixture(scope="session")
def aoti_exports(tmp_path_factory):
    """aoti_exports(model) -> an AOTI export with default pruning, made once per session."""
    made = {}

    def get(model):
        if model not in made:
            out = tmp_path_factory.mktemp("aoti") / model
            export(ExportOptions(model, out, format="aoti", max_seq_len=MAX_SEQ, threads=1), progress=lambda m: None)
            made[model] = out
        return made[model]
    return get


def _check_family(model, directory, loaded, libpop, prompts):
    """C++ = Python runtime = HF generate in full mode (the decode graph over the whole
    prompt is the unpruned model); C++ = Python runtime = the PyTorch POP reference in POP mode."""
    python = PopSession.load(directory, threads=1)
    native = NativeSession(directory, threads=1, lib=libpop)
    keep = python.manifest.pop.prefill_layers
    assert keep < python.num_layers and python.manifest.graphs["decode"].format == "aoti"
    for ids in prompts:
        expected_full = hf_greedy(loaded.model, ids, NEW, python.eos_ids)
        got, stats = native.generate(ids, NEW, mode="full")
        assert got == expected_full, (model, ids)
        assert python.generate(ids, NEW, mode="full").output_ids[0] == expected_full
        expected_pop = reference.generate(loaded.model, torch.tensor([ids]), keep=keep, max_new_tokens=NEW,
                                          eos_ids=python.eos_ids)[0].tolist()
        got, stats = native.generate(ids, NEW)
        assert got == expected_pop[:len(got)] and (len(got) == len(expected_pop) or got[-1] in python.eos_ids), ids
        assert python.generate(ids, NEW).output_ids[0] == got
        assert stats["decode_steps"] == len(got) - 1 and stats["finish_reason"] in ("length", "eos")
        assert 0 < stats["decode_backend_ms"] <= stats["decode_ms"] or stats["decode_steps"] == 0


@pytest.mark.parametrize("model", TINY)
def test_cpp_greedy_equals_python_hf_and_reference(model, aoti_exports, hf_models, libpop):
    loaded = hf_models(model)
    prompts = [loaded.tokenizer(t).input_ids for t in PROMPTS]
    assert max(map(len, prompts)) > 8 and min(map(len, prompts)) <= 2  # past the window; prefill of one token
    _check_family(model, aoti_exports(model), loaded, libpop, prompts)


@pytest.mark.slow
def test_cpp_gemma3_270m(aoti_exports, hf_models, libpop):
    from conftest import EXCERPTS
    loaded = hf_models("gemma3-270m")
    prompts = [loaded.tokenizer(p["text"]).input_ids[:MAX_SEQ - NEW] for p in EXCERPTS[:2]]
    _check_family("gemma3-270m", aoti_exports("gemma3-270m"), loaded, libpop, prompts)


def test_python_aoti_session_for_full_mode_loads_the_decode_package_only(aoti_exports):
    directory = aoti_exports("tiny-llama")
    full = PopSession.load(directory, threads=1, modes=("full",))
    assert set(full.backend.loaders) == {"decode"}
    both = PopSession.load(directory, threads=1)
    assert full.generate([1, 40, 41, 42], 6, "full").output_ids == both.generate([1, 40, 41, 42], 6, "full").output_ids


def test_stream_stop_and_sampling(aoti_exports, libpop):
    directory = aoti_exports("tiny-llama")
    native = NativeSession(directory, threads=1, lib=libpop)
    ids = [1, 40, 41, 42, 43, 44]
    greedy, _ = native.generate(ids, 12, stop_at_eos=False)
    seen = []
    stats = native.stream(ids, lambda t: seen.append(t) and False, 12, stop_at_eos=False)
    assert seen == greedy and stats["finish_reason"] == "length"
    seen.clear()
    stats = native.stream(ids, lambda t: seen.append(t) or len(seen) == 3, 12, stop_at_eos=False)
    assert seen == greedy[:3] and stats["finish_reason"] == "stopped"
    # top_k = 1 is greedy at any temperature; one seed repeats; some seed differs from greedy
    assert native.generate(ids, 12, temperature=1.5, top_k=1, seed=7, stop_at_eos=False)[0] == greedy
    a = native.generate(ids, 12, temperature=1.5, seed=3, stop_at_eos=False)[0]
    assert a == native.generate(ids, 12, temperature=1.5, seed=3, stop_at_eos=False)[0]
    draws = [native.generate(ids, 12, temperature=1.5, top_p=0.9, seed=s, stop_at_eos=False)[0] for s in range(4)]
    assert any(d != greedy for d in draws) and all(0 <= t < 320 for d in draws for t in d)


def test_sessions_share_weights_across_threads(aoti_exports, libpop):
    native = NativeSession(aoti_exports("tiny-llama"), threads=1, lib=libpop)
    sessions = [native, native.sharing(), native.sharing()]
    prompts = [[1, 50 + i, 60, 70 + i, 80] for i in range(len(sessions))]
    expected = [native.generate(p, 10, stop_at_eos=False)[0] for p in prompts]
    got = [None] * len(sessions)

    def work(i):
        for _ in range(3):
            got[i] = sessions[i].generate(prompts[i], 10, stop_at_eos=False)[0]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sessions))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got == expected
    del native  # the others keep the weights alive
    assert sessions[1].generate(prompts[1], 10, stop_at_eos=False)[0] == expected[1]


def test_server_streams_json_lines(aoti_exports, libpop):
    directory = aoti_exports("tiny-gemma3")
    native = NativeSession(directory, threads=1, lib=libpop)
    ids = [1, 72, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101]
    expected, _ = native.generate(ids, 6, stop_at_eos=False)
    requests = [{"id": "a", "prompt_ids": ids, "max_new_tokens": 6, "stop_at_eos": False},
                {"id": "b", "prompt_ids": []}, "not json",
                {"id": "c", "prompt_ids": ids, "max_new_tokens": 6, "mode": "full", "stop_at_eos": False}]
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in requests) + "\n"
    out = subprocess.run([str(ROOT / "build/cpp/pop_server"), str(directory), "--threads", "1"], input=text,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["ready"] and lines[0]["backend"] == "aoti"
    a = [m for m in lines if m.get("id") == "a"]
    assert [m["token"] for m in a[:-1]] == expected and a[-1]["done"] and a[-1]["output_ids"] == expected
    assert [m for m in lines if m.get("id") == "b"] == [{"id": "b", "error": "empty prompt"}]
    assert any(m.get("id") is None and "parse error" in m.get("error", "") for m in lines)
    c = [m for m in lines if m.get("id") == "c"]
    assert c[-1]["done"] and len(c[-1]["output_ids"]) == 6  # the server went on after the bad lines


def _copy(directory, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def _edit_manifest(directory, change):
    path = directory / "pop_manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_bad_input_returns_an_error_never_aborts(aoti_exports, libpop, tmp_path):
    directory = aoti_exports("tiny-llama")

    def error(status, *args, **kwargs):
        with pytest.raises(NativeError) as e:
            NativeSession(*args, lib=libpop, **kwargs)
        assert e.value.status == status and "\n" not in str(e.value)
        return str(e.value)

    assert "is not a folder of pop artifacts" in error(2, tmp_path / "nowhere")
    assert "pop_manifest.json is missing" in error(2, tmp_path)
    bad = _copy(directory, tmp_path)
    _edit_manifest(bad, lambda m: m.update(schema_version=99))
    assert "schema version 99" in error(2, bad)
    _edit_manifest(bad, lambda m: m.update(schema_version=4))
    _edit_manifest(bad, lambda m: m["graphs"]["decode"].update(torch="1.0.0"))
    assert "compiled with torch 1.0.0" in error(2, bad)
    _edit_manifest(bad, lambda m: m["graphs"]["decode"].pop("torch"))
    (bad / "prefill.pt2").write_bytes(b"not a zip")
    assert "prefill.pt2 cannot be loaded by AOTInductor" in error(2, bad)
    (bad / "decode.pt2").unlink()
    assert "decode.pt2 is missing" in error(2, bad)
    (bad / "pop_manifest.json").write_text("{ truncated")
    assert "is corrupt" in error(2, bad)
    assert "which the ort backend cannot run" in error(1, directory, backend="ort")
    onnx = tmp_path / "onnx"
    shutil.copytree(directory, onnx)
    _edit_manifest(onnx, lambda m: [g.update(format="onnx") for g in m["graphs"].values()])
    assert "built without ONNX Runtime" in error(1, onnx)  # libpop here has the aoti backend only

    native = NativeSession(directory, threads=1, lib=libpop)
    for ids, message in (([5] * (MAX_SEQ + 1), f"at most {MAX_SEQ}"), ([], "empty prompt"),
                         ([1, 320], "outside the vocabulary")):
        with pytest.raises(NativeError) as e:
            native.generate(ids, 4)
        assert e.value.status == 1 and message in str(e.value)
    with pytest.raises(NativeError, match="top_p"):
        native.generate([1, 2], 4, temperature=1.0, top_p=0.0)
    assert len(native.generate([1, 2, 3], 4, stop_at_eos=False)[0]) == 4  # the session still works
    # the prompt fills the buffer: one token, then max_seq_len stops it
    got, stats = native.generate([5] * MAX_SEQ, 4, stop_at_eos=False)
    assert len(got) == 1 and stats["finish_reason"] == "max_seq_len"


def test_leak_check_under_asan(aoti_exports, libpop):
    """libpop built with AddressSanitizer; LeakSanitizer over sessions made, used and freed."""
    out = subprocess.run(["make", "cpp-leakcheck", f"PYTHON={sys.executable}", f"ARTIFACTS={aoti_exports('tiny-llama')}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rounds ok" in out.stdout and "LeakSanitizer" not in out.stderr


def test_eval_and_bench_run_aoti_artifacts(aoti_exports, exports, libpop, tmp_path):
    """pop-eval --artifacts on AOTI packages matches its PyTorch rows; pop-bench runs the C++ runtime and the
    ONNX export of the same model as peers, and both agree with our first tokens."""
    from conftest import EXCERPTS, cli
    from pop.quality.evaluate import evaluate
    directory = aoti_exports("tiny-gemma3")
    keep = json.loads((directory / "pop_manifest.json").read_text())["pop"]["prefill_layers"]
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(p["text"] for p in EXCERPTS[:3]))
    report = evaluate(artifacts=directory, data_paths=[text], ks=[keep], samples=3, prompt_len=20, continuation=6,
                      greedy_tokens=5, progress=lambda m: None)
    rows = {r["method"]: r for r in report["data"][0]["results"]}
    runtime_pop, reference_pop = rows[f"exported graphs, pop runtime, POP K={keep}"], rows[f"POP K={keep}"]
    for key in ("top1_agreement", "greedy_exact_match", "greedy_common_prefix"):
        assert runtime_pop[key] == reference_pop[key]
    assert abs(runtime_pop["perplexity"] - reference_pop["perplexity"]) < 1e-3 * reference_pop["perplexity"]
    assert rows["exported graphs, pop runtime, full mode"]["kl_full_to_method"] < 1e-6

    out = tmp_path / "bench.json"
    run = cli("pop-bench", directory, "--prompt-lens", "8,24", "--batch", "1", "--runs", 2, "--warmup", 1,
              "--new-tokens", 4, "--threads", 1, "--peers", "cpp,other", "--other-artifacts", exports("tiny-gemma3"),
              "--json", out)
    assert run.returncode == 0, run.stderr
    assert "runtime overhead per decode step, C++" in run.stdout + run.stderr
    bench = json.loads(out.read_text())
    cpp, other = bench["peers"]
    assert cpp["name"] == "pop-cpp" and cpp["available"] and other["name"] == "pop-other-backend" and other["available"]
    assert other["versions"]["backend"] == "ort"
    for peer in (cpp, other):
        assert [r["prompt_len"] for r in peer["results"]] == [8, 24]
        for r in peer["results"]:
            assert r["first_token_agreement"] == 1.0 and r["ttft_ms"]["median"] > 0, (peer["name"], r)
    for r in cpp["results"]:
        o = r["overhead_per_decode_step_ms"]
        assert o["cpp"]["median"] >= 0 and o["python"]["median"] > 0 and o["cpp_share_of_backend"] >= 0
    run = cli("pop-bench", directory, "--prompt-lens", "8", "--new-tokens", 4, "--runs", 1, "--peers", "other")
    assert run.returncode == 0 and "other: not run: the other-backend peer needs --other-artifacts" \
        in run.stdout + run.stderr, run.stdout + run.stderr


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False)])
def test_cpp_derives_the_int8_gemm_weights_as_python_does(libpop, tmp_path, bits, symmetric):
    """The int8 matrices of an int8-gemm prefill graph are derived at load by each runtime; libpop's derived.cpp
    (through pop_derive_check) gives the bytes runtime/backends/derived.py gives, for 4 and 8 bits, with and
    without zero points, from a weights file at the offsets a manifest records; outside the file: one line."""
    import numpy as np

    from pop.exporter import quantize
    from pop.runtime.backends import derived
    from pop.runtime.manifest import DerivedTensor
    rng = np.random.default_rng(bits)
    s = quantize.Scheme(bits, 32, symmetric=symmetric)
    k, n = 80, 48
    w = rng.standard_normal((k, n)).astype(np.float32) + (0 if symmetric else 0.7)
    codes, scales, zeros = quantize.quantize(np.ascontiguousarray(w.T), s)
    packed, zp = quantize.pack(codes, s).reshape(-1), quantize.pack_zeros(zeros, s).reshape(-1)
    file = np.concatenate([np.zeros(5, np.uint8), packed, scales.reshape(-1).view(np.uint8)]
                          + ([] if symmetric else [zp]))
    (tmp_path / "weights.bin").write_bytes(file.tobytes())
    entry = DerivedTensor("w.int8", "w.int8_scale", k, n, 5, 5 + packed.size,
                          None if symmetric else 5 + packed.size + scales.size * 4)
    weight, scale = derived.derive(entry, file, bits, 32)
    tool = ROOT / "build" / "cpp" / "pop_derive_check"

    def run(codes_offset):
        return subprocess.run([str(tool), str(tmp_path / "weights.bin"), str(k), str(n), str(codes_offset),
                               str(entry.scales_offset), str(-1 if symmetric else entry.zero_points_offset),
                               str(bits), "32"], capture_output=True)
    out = run(entry.codes_offset)
    assert out.returncode == 0, out.stderr
    assert out.stdout == weight.tobytes() + scale.tobytes()
    out = run(len(file))
    assert out.returncode == 1 and b"corrupt artifacts" in out.stderr and out.stderr.count(b"\n") == 1
