"""pop-bench: the cost model against a hand count, the report's shape, bad arguments.

No timing is asserted here: timings live in benchmarks/.
"""
import json

import numpy as np
import pytest

from conftest import cli
from pop.bench import cost
from pop.bench.measure import prompt_ids, stat
from pop.runtime.errors import PopError
from pop.runtime.manifest import Encoder, Manifest
from conftest import assert_one_line_error

# hidden 4, 2 query heads and 1 KV head of dim 2, MLP 8, vocab 10, 3 layers, prefill keeps 2
SMALL = cost.Shapes(hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, layers=3, keep=2)


def matmul(m, k, n):
    return 2 * m * k * n


def hand_layer(tokens, keys):
    """Every matmul of one layer over `tokens` new tokens attending to `keys` keys, listed by shape."""
    return (matmul(tokens, 4, 4)        # q: 4 -> 2 heads x 2
            + 2 * matmul(tokens, 4, 2)  # k, v: 4 -> 1 head x 2
            + matmul(tokens, 4, 4)      # o: 4 -> 4
            + 2 * matmul(tokens, 4, 8)  # gate, up
            + matmul(tokens, 8, 4)      # down
            + 2 * matmul(tokens, 2, keys)   # scores, per query head (dim 2)
            + 2 * matmul(tokens, keys, 2))  # probs @ V, per query head


def test_cost_model_matches_a_hand_count():
    n = 3
    full = 3 * hand_layer(3, 3) + matmul(1, 4, 10)  # all layers over 3 tokens; logits for the last only
    pop = (2 * hand_layer(2, 2)                     # prefill: 2 kept layers over tokens 1..2
           + 1 * 2 * matmul(2, 4, 2)                # the pruned layer's K and V heads over them
           + 3 * hand_layer(1, 3) + matmul(1, 4, 10))  # boundary: last token, full model, 3 keys
    assert (full, pop) == (3104, 2432)  # the same sums, done on paper
    assert cost.ttft(SMALL, n, "full") == full
    assert cost.ttft(SMALL, n, "pop") == pop
    assert cost.ttft(SMALL, n, "pop", batch=4) == 4 * pop
    assert cost.expected_speedup(SMALL, n) == pytest.approx(3104 / 2432)
    assert cost.limit(SMALL) == 1.5
    # attention grows quadratically, so long prompts approach L/K from below
    assert cost.expected_speedup(SMALL, 10) < cost.expected_speedup(SMALL, 10_000) < cost.limit(SMALL)
    # No pruning: the same work, except that dense attention over the split prompt
    # scores (N-1)^2 + N query-key pairs instead of N^2, in each of the 3 layers.
    unpruned = cost.Shapes(**{**vars(SMALL), "keep": 3})
    assert cost.ttft(unpruned, 50, "full") - cost.ttft(unpruned, 50, "pop") == 3 * 49 * (2 * matmul(1, 2, 1)) * 2  # (score + value) x 2 heads


def test_stat_and_prompts():
    s = stat([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["p25"], s["p75"]) == (2.5, 1.0, 4.0, 1.75, 3.25)
    ids = prompt_ids(100, [2], batch=3, length=50, bos=1)
    assert ids.shape == (3, 50) and (ids[:, 0] == 1).all() and not (ids[:, 1:] == 2).any()
    assert np.array_equal(ids, prompt_ids(100, [2], 3, 50, 1))  # every method gets the same prompt
    assert not np.array_equal(ids[0], ids[1])


def test_report_json_and_plot(exports, tmp_path):
    art = exports("tiny-llama")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    run = cli("pop-bench", art, "--prompt-lens", "8,24", "--batch", "1,2", "--runs", 1, "--warmup", 0,
              "--new-tokens", 3, "--threads", 1, "--peers", "hf,optimum", "--optimum-python", tmp_path / "none",
              "--json", out, "--plot", png)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["schema"] == "pop-bench/1" and report["threads"] == 1
    assert [(r["batch"], r["prompt_len"]) for r in report["results"]] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    manifest = Manifest.load(art)
    shapes = cost.Shapes.from_manifest(manifest)
    for r in report["results"]:
        for key in ("pop_ttft_ms", "full_ttft_ms", "speedup", "decode_ms_per_token"):
            assert len(r[key]["runs"]) == 1 and r[key]["median"] > 0, key
        assert len(r["graphs_ms"]["decode_step"]["runs"]) == 2  # 3 new tokens: the first comes from prefill
        assert r["expected_speedup"] == pytest.approx(cost.expected_speedup(shapes, r["prompt_len"]))
        assert r["measured_over_expected"] == pytest.approx(r["speedup"]["median"] / r["expected_speedup"])
        assert r["flops"]["pop_ttft"] == cost.ttft(shapes, r["prompt_len"], "pop", r["batch"])
        assert r["peak_rss_bytes"] > 0
        assert len(r["first_tokens"]["pop"]) == len(r["first_tokens"]["full"]) == r["batch"]
    hf, optimum = report["peers"]
    assert hf["name"] == "hf-eager" and hf["available"]
    assert all(p["first_token_agreement"] == 1.0 for p in hf["results"])  # our full mode vs HF's first token
    assert all(p["ttft_ms"]["median"] > 0 and p["decode_ms_per_token"]["median"] > 0 for p in hf["results"])
    assert optimum == {"name": "optimum-onnx", "available": False, "why": optimum["why"]}
    assert "no Optimum virtualenv python at" in optimum["why"]
    assert "optimum-onnx: not run" in run.stdout  # the table says so too


def test_vision_cost_matches_a_hand_count():
    # 2 blocks of width 2, MLP 4, patches of 3 values, 2x2 merge into 4 -> 3 output; one image of 4 patches
    enc = Encoder(layers=2, hidden=2, intermediate=4, patch_dim=3, merge=4, mergers=2, out_hidden=3)
    per_patch = matmul(1, 2, 6) + matmul(1, 2, 2) + matmul(1, 2, 4) + matmul(1, 4, 2)  # qkv, proj, fc1, fc2
    attention = matmul(4, 2, 4) + matmul(4, 4, 2)  # scores and probs @ V over the image's 4 patches
    block = 4 * per_patch + attention
    embed = 4 * matmul(1, 3, 2)
    mergers = 2 * (matmul(1, 8, 8) + matmul(1, 8, 3))  # one merged token per merger
    assert cost.vision(enc, [4]) == 2 * block + embed + mergers == 1168  # 768 + 48 + 352, on paper
    s = SMALL
    assert cost.expected_speedup_with_images(s, 3, 0) == cost.expected_speedup(s, 3)
    assert 1 < cost.expected_speedup_with_images(s, 3, 10_000) < cost.expected_speedup(s, 3)  # vision dilutes


def test_image_sizes_on_a_vlm(exports, tmp_path):
    out = tmp_path / "vlm.json"
    run = cli("pop-bench", exports("tiny-qwen3-vl"), "--image-sizes", "64x48,160x96", "--batch", "1,2", "--runs", 1,
              "--warmup", 0, "--new-tokens", 2, "--threads", 1, "--json", out)
    assert run.returncode == 0, run.stderr
    assert "vision ms" in run.stdout and "peers time text prompts only" in run.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["image_size"]) for r in rows] == [(1, [64, 48]), (1, [160, 96]), (2, [64, 48]), (2, [160, 96])]
    assert rows[1]["prompt_len"] > rows[0]["prompt_len"] and rows[1]["image_patches"] > rows[0]["image_patches"]
    for r in rows:
        assert r["vision_ms"]["median"] > 0 and r["prepare_ms"]["median"] > 0
        assert r["pop_ttft_ms"]["median"] > r["vision_ms"]["median"] + r["prepare_ms"]["median"]
        assert 1 < r["expected_speedup"] < r["expected_speedup_without_vision"]
    text = cli("pop-bench", exports("tiny-llama"), "--image-sizes", "64x48")
    assert_one_line_error(text, "needs vision-language artifacts")
    bad = cli("pop-bench", exports("tiny-qwen3-vl"), "--image-sizes", "64by48")
    assert_one_line_error(bad, "WIDTHxHEIGHT")


@pytest.mark.parametrize("args, needle", [
    (["--prompt-lens", ""], "--prompt-lens is empty"),
    (["--prompt-lens", "128,-4"], "must be positive"),
    (["--prompt-lens", "1"], "at least 2"),
    (["--prompt-lens", "64,4090"], "exceeds these artifacts' max_seq_len"),
    (["--batch", "0"], "must be positive"),
    (["--new-tokens", "1"], "at least 2"),
    (["--runs", "0"], "--runs must be at least 1"),
    (["--prompt-lens", "8", "--peers", "vllm"], "unknown peer"),
])
def test_bad_arguments(exports, tmp_path, args, needle):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    run = cli("pop-bench", exports("tiny-llama"), *args, "--json", out, "--plot", png)
    assert run.returncode == 2
    assert_one_line_error(run, needle)
    assert list(tmp_path.iterdir()) == []


def test_bad_artifacts(tmp_path):
    run = cli("pop-bench", tmp_path / "missing")
    assert_one_line_error(run, "not a folder of pop artifacts")


@pytest.mark.slow
def test_optimum_peer_on_smollm2(exports, tmp_path):
    """The Optimum peer for real, in its own venv (scripts/test.sh makes it): exported,
    run, and its first token equal to our full mode's on the same ids."""
    python = peers_python()
    out = tmp_path / "bench.json"
    run = cli("pop-bench", exports("smollm2-135m"), "--prompt-lens", "24", "--batch", "2", "--runs", 1,
              "--warmup", 0, "--new-tokens", 4, "--threads", 2, "--peers", "optimum", "--optimum-python", python,
              "--optimum-dir", tmp_path / "optimum", "--json", out)
    assert run.returncode == 0, run.stderr
    (peer,) = json.loads(out.read_text())["peers"]
    assert peer["available"] and peer["name"] == "optimum-onnx", peer
    assert peer["logits_all_positions"] is True  # the standard export computes logits over the whole prompt
    assert peer["versions"]["transformers"].startswith("4.")
    (row,) = peer["results"]
    assert row["first_token_agreement"] == 1.0
    assert row["ttft_ms"]["median"] > 0 and row["decode_ms_per_token"]["median"] > 0
    assert (tmp_path / "optimum" / "model.onnx").is_file()


@pytest.mark.slow
def test_genai_peer_on_smollm2(exports, tmp_path):
    """onnxruntime-genai's own export of the same weights, in its venv (scripts/test.sh makes it): built,
    run in pop-bench's rotation, and its greedy tokens equal to our full mode's on real text."""
    from pop.bench import peers
    from pop.runtime.session import PopSession
    from conftest import EXCERPTS
    try:
        python = peers.genai_python()
    except PopError as e:
        pytest.fail(f"{e} (scripts/test.sh makes it)")
    directory = exports("smollm2-135m")
    out = tmp_path / "bench.json"
    run = cli("pop-bench", directory, "--prompt-lens", "40", "--batch", "1,2", "--runs", 2, "--warmup", 1,
              "--new-tokens", 4, "--threads", 2, "--peers", "genai", "--genai-python", python,
              "--genai-dir", tmp_path / "genai", "--json", out)
    assert run.returncode == 0, run.stderr
    (peer,) = json.loads(out.read_text())["peers"]
    assert peer["available"] and peer["name"] == "onnxruntime-genai fp32" and peer["precision"] == "fp32", peer
    assert "rotation" in peer["measured"] and peer["versions"]["onnxruntime-genai"].startswith("0.18")
    assert [(r["batch"], r["prompt_len"]) for r in peer["results"]] == [(1, 40), (2, 40)]
    for row in peer["results"]:
        assert row["first_token_agreement"] == 1.0
        assert len(row["ttft_ms"]["runs"]) == 2 and row["decode_ms_per_token"]["median"] > 0  # warmup left out
    assert (tmp_path / "genai" / "smollm2-135m-fp32" / "genai_config.json").is_file()

    # whole greedy continuations of real text, row by row, against our full mode (the unpruned model)
    session = PopSession.load(directory, threads=2)
    genai = peers.Genai(Manifest.load(directory), 2, python, tmp_path / "genai" / "smollm2-135m-fp32",
                        progress=lambda m: None).start(12)
    try:
        for excerpt in (EXCERPTS[0], EXCERPTS[4]):
            ids = session.encode(" ".join(excerpt["text"].split()[:60])).rows[0]
            genai.turn(1, len(ids), np.array([ids]), counted=True)
            theirs = genai.runs[(1, len(ids))][-1]["generated_ids"][0]
            assert session.generate(ids, 12, "full", stop_at_eos=False).output_ids[0] == theirs
    finally:
        genai.close()
    assert genai.proc.returncode == 0


def peers_python():
    from pop.bench.peers import optimum_python
    from pop.runtime.errors import PopError
    try:
        return optimum_python()
    except PopError as e:
        pytest.fail(f"{e} (scripts/test.sh makes it)")
