"""pop-analyze and pop-eval: importance, ablations, metrics, and their bad inputs."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from pop.exporter import reference, sources, tiny
from pop.exporter.families import adapter_for
from pop.quality import data, fidelity, importance
from pop.quality.evaluate import evaluate
from pop.quality.methods import Method, Runner, standard_methods
from pop.runtime.errors import PopError

from conftest import EXCERPTS, assert_one_line_error, cli, forbid_model_loading

TEXT = " ".join(p["text"] for p in EXCERPTS)
SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def _prompts(tok, count=3, length=20):
    return [p for p, _ in data.windows(TEXT, tok, length, 1, count, sources.bos_for(tok))]


def test_recommend_rule_by_hand():
    # suffix sums of prefill importance: K=1 0.5, K=2 0.2, K=3 0.05, K=4 0.01
    assert importance.recommend([0.5, 0.3, 0.15, 0.04, 0.01], budget=0.05) == 3
    assert importance.recommend([0.5, 0.3, 0.15, 0.04, 0.01], budget=0.01) == 4
    assert importance.recommend([0.2, 0.2, 0.2, 0.2, 0.2], budget=0.0) == 5
    assert importance.recommend([1.0, 0.0, 0.0], budget=0.0) == 1


def test_importance_zero_for_a_layer_without_branches_and_stages_differ():
    model, tok, _ = tiny.build("tiny-llama")
    dead = 2
    with torch.no_grad():  # layer 2 adds nothing to the residual stream, by construction
        model.model.layers[dead].self_attn.o_proj.weight.zero_()
        model.model.layers[dead].mlp.down_proj.weight.zero_()
    pre, dec = importance.stage_importance(model, adapter_for(model), _prompts(tok), new_tokens=6)
    assert pre[dead] == 0.0 and dec[dead] == 0.0
    live = [l for l in range(6) if l != dead]
    assert all(dec[l] > 0 for l in live)
    # the last layer's prefill output reaches no cache and no loss: exactly zero, unlike its decode importance
    assert pre[-1] == 0.0 and dec[-1] > 0
    assert all(pre[l] > 0 for l in live[:-1])


def test_gates_at_one_are_the_model():
    model, tok, _ = tiny.build("tiny-gemma3")
    ids = torch.tensor([_prompts(tok, 1, 20)[0]])
    ones = torch.ones(6)
    from pop.exporter.pop import PopDecode
    loss = importance.gated_loss(PopDecode(adapter_for(model)), ids, 12, ones, ones)
    with torch.no_grad():
        logits = model(ids).logits[0, 11:-1]
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, ids[0, 12:]), atol=1e-5)


@pytest.fixture(scope="module")
def runner():
    model, tok, _ = tiny.build("tiny-qwen3")
    return Runner(model), tok


def test_runner_is_hf_and_the_pop_reference(runner):
    """The eager runner (pop.py's layers over the adapter) against HF's own forward and the HF-based reference."""
    run, tok = runner
    prompt = _prompts(tok, 1, 20)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf_logits = run.graph.hf(ids).logits[0, -1]
    assert torch.allclose(run.prefill(Method("full"), prompt)[0], hf_logits, atol=1e-5)
    mask = torch.ones_like(ids)
    cache = reference.prefill(run.graph.hf, ids[:, :-1], mask[:, :-1], 4)
    expected = reference.step(run.graph.hf, ids[:, -1:], mask, cache)[0]
    assert torch.allclose(run.prefill(Method("pop", (4, 5)), prompt)[0], expected, atol=1e-5)


def test_pop_cache_is_the_kv_projection(runner):
    run, tok = runner
    prompt = _prompts(tok, 1, 20)[0]
    keep = 4
    pop = Method("pop", tuple(range(keep, 6)))
    _, state = run.prefill(pop, prompt)
    ref = reference.prefill(run.graph.hf, torch.tensor([prompt[:-1]]), torch.ones(1, len(prompt) - 1, dtype=torch.long),
                            keep)
    for l, (k, v) in enumerate(reference.cache_tensors(ref)):
        ours = state.entries(l)
        assert torch.allclose(ours[0][:-1], k, atol=1e-5) and torch.allclose(ours[1][:-1], v, atol=1e-5)
    # the first third pruned instead: those layers' caches come from the embeddings
    first = Method("first", (0, 1))
    _, state = run.prefill(first, prompt)
    h = run.graph.hf.model.embed_tokens(torch.tensor([prompt[:-1]]))
    for l in (0, 1):
        k, v = reference.kv_projection(run.graph.hf, l, h, torch.arange(len(prompt) - 1)[None])
        assert torch.allclose(state.entries(l)[0][:-1], k.permute(2, 0, 1, 3), atol=1e-5)


def test_without_kv_projections_the_prompt_entries_are_unseen(runner):
    """At the boundary step, the pruned layers' prompt entries change nothing when the method drops them,
    and change the logits when it keeps them."""
    run, tok = runner
    prompt = _prompts(tok, 1, 20)[0]
    ids = torch.tensor([prompt])
    for method, unseen in ((Method("pop", (4, 5)), False), (Method("no-kv", (4, 5), kv_projection=False), True)):
        logits = []
        for scramble in (False, True):
            state = run.empty()
            run.shallow(method, ids[:, :-1], state)
            if scramble:
                for l in method.prefill_skip:
                    state.keys[l][:] = torch.randn_like(state.keys[l]) * 10
                    state.values[l][:] = torch.randn_like(state.values[l]) * 10
            logits.append(run.decode(method, ids[:, -1:], state)[-1])
        assert torch.equal(logits[0], logits[1]) == unseen, method.name


def test_identical_methods_score_perfectly(runner):
    run, tok = runner
    prompt, cont = data.windows(TEXT, tok, 20, 8, 1)[0]
    full = run.run(Method("full"), prompt, cont, 6)
    again = run.run(Method("full again"), prompt, cont, 6)
    m = fidelity.compare(full, again)
    assert m["top1_agree"] == 1 and m["kl"] == 0 and m["exact_match"] == 1 and m["common_prefix"] == 6
    assert fidelity.summarize([m])["perplexity"] == fidelity.summarize([fidelity.compare(full, full)])["perplexity"]
    # pruning only the last layer is exact: its prefill output reaches nothing
    last = fidelity.compare(full, run.run(Method("K=L-1", (5,)), prompt, cont, 6))
    assert last["top1_agree"] == 1 and last["kl"] < 1e-9 and last["exact_match"] == 1
    # an ablation that does differ scores below 1 somewhere
    worst = fidelity.compare(full, run.run(Method("first", (0, 1)), prompt, cont, 6))
    assert worst["kl"] > 1e-4


def test_methods_cover_the_papers_ablations():
    names = [m.name for m in standard_methods(30, [24, 20], 20)]
    assert names[0] == "full" and "POP K=24" in names and "POP K=20" in names
    assert sum("ShortGPT" in n for n in names) == sum("without KV" in n for n in names) == 1
    assert sum("without boundary" in n for n in names) == sum("first third" in n for n in names) == 1
    first = next(m for m in standard_methods(30, [20], 20) if "first third" in m.name)
    assert first.prefill_skip == tuple(range(10))


def test_eval_on_exported_graphs_matches_pytorch(exports, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report = evaluate(artifacts=exports("tiny-gemma3"), data_paths=[text], ks=[4], samples=3, prompt_len=20,
                      continuation=6, greedy_tokens=5, progress=lambda m: None)
    rows = {r["method"]: r for r in report["data"][0]["results"]}
    runtime_pop = rows["exported graphs, pop runtime, POP K=4"]
    runtime_full = rows["exported graphs, pop runtime, full mode"]
    for key in ("top1_agreement", "greedy_exact_match", "greedy_common_prefix"):
        assert runtime_pop[key] == rows["POP K=4"][key] and runtime_full[key] == rows["full"][key]
    assert abs(runtime_pop["perplexity"] - rows["POP K=4"]["perplexity"]) < 1e-3 * rows["POP K=4"]["perplexity"]
    assert runtime_full["kl_full_to_method"] < 1e-6


def test_eval_sets_several_exports_side_by_side(exports, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    fp32, int4 = exports("tiny-llama"), exports("tiny-llama", weights="int4")
    sym = exports("tiny-llama", weights="int4", weights_asymmetric=False)
    kept = exports("tiny-llama", weights="int4", keep_embedding=True)
    report = evaluate(artifacts=[fp32, int4, sym, kept], data_paths=[text], ks=[4], samples=3, prompt_len=20,
                      continuation=6, greedy_tokens=5, progress=lambda m: None)
    rows = {r["method"]: r for r in report["data"][0]["results"]}
    # each row names what sets its export apart: scheme, block, zero points, a float32 output matrix
    zp, sym, f32 = (", int4 weights (block 64, zero points)", ", int4 weights (block 64)",
                    ", int4 weights (block 64, zero points, float32 output matrix and embedding)")
    assert [a["tags"] for a in report["artifacts"]] == [["", ""], [zp, zp], [sym, sym], [f32, f32]]
    # the fp32 export is the PyTorch model; the int4 ones are not, and their rows say so
    assert rows["exported graphs, pop runtime, full mode"]["kl_full_to_method"] < 1e-6
    for tag in (sym, zp, f32):
        assert rows[f"exported graphs, pop runtime, full mode{tag}"]["kl_full_to_method"] > 1e-4
        assert rows[f"exported graphs, pop runtime, POP K=4{tag}"]["perplexity"] > 0
    # two exports alike: their rows are told apart by folder; one folder twice is refused
    copy = shutil.copytree(fp32, tmp_path / "copy")
    twice = evaluate(artifacts=[fp32, copy], data_paths=[text], ks=[4], samples=1, prompt_len=20, continuation=2,
                     greedy_tokens=2, progress=lambda m: None)
    names = [r["method"] for r in twice["data"][0]["results"] if r["kind"] == "runtime"]
    assert len(set(names)) == 4 and sum(f"[{fp32.name}]" in n for n in names) == sum("[copy]" in n for n in names) == 2
    with pytest.raises(PopError, match="given twice"):
        evaluate(artifacts=[fp32, fp32], data_paths=[text], ks=[4], samples=1, progress=lambda m: None)
    with pytest.raises(PopError, match="different models"):
        evaluate(artifacts=[fp32, exports("tiny-gemma3")], data_paths=[text], ks=[4], samples=1,
                 progress=lambda m: None)


def test_cli_bad_input(tmp_path, refused, monkeypatch):
    """One line and exit 2.  Each installed command runs once; the other cases go through the same entry points
    in this process (seven interpreter starts took half a minute)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    for prog in ("pop-eval", "pop-analyze"):
        run = cli(prog, "--model", "tiny-llama", "--data", tmp_path / "missing.txt", "--out", tmp_path / "o")
        assert_one_line_error(run, "does not exist", code=2)
    out = ("--out", tmp_path / "o")
    for prog in ("pop-eval", "pop-analyze"):
        assert "shorter than one window" in refused(prog, "--model", "tiny-llama", "--data", short, *out)[-1]
    assert "--prefill-layers must be in 1..6" in refused("pop-eval", "--model", "tiny-llama", "--data", good,
                                                         "--prefill-layers", 9, *out)[-1]
    forbid_model_loading(monkeypatch)  # files are read first
    for prog in ("pop-eval", "pop-analyze"):
        assert "does not exist" in refused(prog, "--model", "tiny-llama", "--data", tmp_path / "missing.txt", *out)[-1]
        assert "is empty" in refused(prog, "--model", "tiny-llama", "--data", empty, *out)[-1]
    assert not (tmp_path / "o").exists()


def test_cli_writes_reports(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    run = cli("pop-analyze", "--model", "tiny-gemma3", "--data", good, "--samples", 2, "--prompt-len", 16,
              "--new-tokens", 4, "--out", tmp_path / "a")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "a" / "importance.json").read_text())
    assert len(report["prefill"]) == len(report["decode"]) == 6 and 1 <= report["recommended_prefill_layers"] <= 6
    assert report["data"]["sha256"] and report["model"]["sha256"] and "rule" in report
    assert (tmp_path / "a" / "importance.png").read_bytes()[:4] == b"\x89PNG"
    run = cli("pop-eval", "--model", "tiny-gemma3", "--data", good, "--samples", 2, "--prompt-len", 16,
              "--continuation", 4, "--greedy-tokens", 4, "--prefill-layers", 5, 4, "--out", tmp_path / "e", "--json")
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert [r["method"] for r in printed["data"][0]["results"]][:3] == ["full", "POP K=5", "POP K=4"]
    assert (tmp_path / "e" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "| full | 1.000 | 0.0000 |" in (tmp_path / "e" / "report.md").read_text()


@pytest.mark.slow
def test_real_model_pop_beats_shortgpt():
    text = SHARED_TEXT / "persuasion.txt"  # ../shared/data/text, beside the project as in CI
    assert text.is_file(), f"{text} is missing: the shared text data must sit beside the project"
    report = evaluate(model="smollm2-135m", data_paths=[text], ks=[20], samples=10, prompt_len=64, continuation=8,
                      greedy_tokens=8, progress=lambda m: None)
    rows = {r["method"].split(":")[0]: r for r in report["data"][0]["results"]}
    pop, short = rows["POP K=20"], rows["ShortGPT-style"]
    assert pop["top1_agreement"] > short["top1_agreement"]
    assert pop["kl_full_to_method"] < short["kl_full_to_method"]


@pytest.mark.parametrize("name", ["tiny-qwen3-vl", "tiny-gemma3-vl"])
def test_eval_and_analyze_on_vlms_with_text_windows(name, tmp_path):
    """The methods run through the family adapters, so VLM exports' models work too: full = HF's own forward,
    and the reports come out."""
    from pop.quality.analyze import analyze
    model, tok, _ = tiny.build(name)
    prompt = _prompts(tok, 1, 20)[0]
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(Runner(model).prefill(Method("full"), prompt)[0], hf_logits, atol=1e-5)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report = evaluate(model=name, data_paths=[text], ks=[5, 4], samples=2, prompt_len=16, continuation=4,
                      greedy_tokens=4, progress=lambda m: None)
    rows = {r["method"]: r for r in report["data"][0]["results"]}
    assert rows["full"]["kl_full_to_method"] == 0 and rows["POP K=5"]["kl_full_to_method"] < 1e-9
    assert rows["POP K=4"]["kl_full_to_method"] > 0
    imp = analyze(name, text, samples=2, out=tmp_path / "a", prompt_len=16, new_tokens=4, progress=lambda m: None)
    assert len(imp["prefill"]) == 6 and imp["decode"][-1] > 0 and 1 <= imp["recommended_prefill_layers"] <= 6
