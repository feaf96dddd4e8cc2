"""Exported graphs on the three tiny families, against HF generate and the POP reference."""
import json

import numpy as np
import pytest
import torch

from pop.exporter import reference
from pop.exporter.verify import TOLERANCE
from pop.runtime.memory import resident_bytes
from pop.runtime.session import PopSession

from conftest import cli, generate_json, hf_greedy, packed_copy_bytes, rope_table_bytes

TINY = ["tiny-llama", "tiny-qwen3", "tiny-gemma3"]
# Byte-level prompts; the long one (38 tokens) is far past tiny-gemma3's window of 8.
PROMPTS = ["Hello there, general", "It is a truth universally acknowledged, t", "A"]
NEW = 24


@pytest.fixture(scope="module", params=TINY)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def unpruned(tmp_path_factory, hf_models):
    """tiny-llama exported through the pop-export console script with --prefill-layers L: the
    no-pruning configuration and the CLI path, once (the other families' no-pruning check is full
    mode, the decode graph over the whole prompt, of their default export)."""
    layers = hf_models("tiny-llama").model.config.num_hidden_layers
    out = tmp_path_factory.mktemp("cli") / "tiny-llama-unpruned"
    run = cli("pop-export", "--model", "tiny-llama", "--out", out, "--prefill-layers", layers)
    assert run.returncode == 0, run.stderr
    return out


def _ids(loaded, text):
    return loaded.tokenizer(text).input_ids


def test_no_pruning_equals_hf_generate(unpruned, hf_models):
    """K = L through the CLI, in both modes: HF generate's greedy tokens."""
    loaded = hf_models("tiny-llama")
    manifest = json.loads((unpruned / "pop_manifest.json").read_text())
    assert manifest["pop"]["pruned_layers"] == []
    eos = manifest["tokenizer"]["eos_ids"]
    for text in PROMPTS:
        ids = _ids(loaded, text)
        expected = hf_greedy(loaded.model, ids, NEW, eos)
        got = generate_json(unpruned, ids, NEW)
        assert got["prompt_ids"] == ids
        assert got["output_ids"] == expected, text
        full = generate_json(unpruned, ids, NEW, mode="full")
        assert full["output_ids"] == expected, text


def test_full_mode_equals_hf_generate(family, exports, hf_models):
    """Full mode runs the decode graph over the whole prompt: the unpruned model, from the POP export."""
    loaded = hf_models(family)
    session = PopSession.load(exports(family))
    for text in PROMPTS:
        ids = _ids(loaded, text)
        assert session.generate(ids, NEW, "full").output_ids[0] == hf_greedy(loaded.model, ids, NEW, session.eos_ids)


def test_prompt_text_is_tokenized_as_hf_does(unpruned, hf_models):
    out = cli("pop-generate", unpruned, "--prompt", PROMPTS[1], "--max-new-tokens", 3, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt_ids"] == _ids(hf_models("tiny-llama"), PROMPTS[1])


def test_prompt_file_and_compare_modes(exports, tmp_path):
    """--prompt-file reads the same prompt as --prompt (without echoing it); --compare-modes adds one line
    with both modes' first-token times on that prompt; a file that is missing or empty is one error line."""
    import re
    from conftest import assert_one_line_error
    directory = exports("tiny-llama")
    manifest = json.loads((directory / "pop_manifest.json").read_text())["pop"]
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPTS[1], encoding="utf-8")
    given = cli("pop-generate", directory, "--prompt", PROMPTS[1], "--max-new-tokens", 4, "--json")
    read = cli("pop-generate", directory, "--prompt-file", path, "--max-new-tokens", 4, "--json")
    assert given.returncode == 0 and read.returncode == 0, read.stderr
    given, read = json.loads(given.stdout), json.loads(read.stdout)
    assert (read["prompt_ids"], read["output_ids"]) == (given["prompt_ids"], given["output_ids"])

    run = cli("pop-generate", directory, "--prompt-file", path, "--max-new-tokens", 4, "--compare-modes")
    assert run.returncode == 0, run.stderr
    text, line = run.stdout.rstrip("\n").rsplit("\n", 1)
    assert PROMPTS[1] not in text and text == read["text"]
    found = re.fullmatch(r"time to first token on this (\d+)-token prompt \(median of 3\): POP \((\d+) of (\d+) "
                         r"layers in prefill\) (\d+(?:\.\d)?) ms, full model (\d+(?:\.\d)?) ms: speedup (\d+\.\d\d)x", line)
    assert found, line
    tokens, keep, layers, pop, full, speedup = found.groups()
    assert int(tokens) == len(read["prompt_ids"])
    assert (int(keep), int(layers)) == (manifest["prefill_layers"], manifest["num_layers"])
    assert float(pop) > 0 and float(full) > 0 and float(speedup) > 0

    assert_one_line_error(cli("pop-generate", directory, "--prompt-file", tmp_path / "none.txt"),
                          "cannot read --prompt-file", "none.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    assert_one_line_error(cli("pop-generate", directory, "--prompt-file", tmp_path / "empty.txt"), "is empty")
    assert_one_line_error(cli("pop-generate", directory, "--prompt-ids", "1,2", "--prompt-file", path),
                          "not allowed with")


def test_sliding_layers_read_from_their_window(exports):
    """tiny-gemma3 (window 8): its decode graph takes the sliding layers' own lengths, and a past bound
    from a later slot (the default: what has left every row's window is skipped) gives the logits of a
    past bound from slot 0 at every phase and step, in both modes, while the skip really moves."""
    from pop.runtime.session import MODES
    directory = exports("tiny-gemma3")
    shifted, whole = PopSession.load(directory), PopSession.load(directory)
    whole.window_shift = False
    decode = [i.name for i in shifted.manifest.graphs["decode"].inputs]
    assert decode[3:5] == ["window_seqlens_k", "window_total_sequence_length"]
    assert not any(i.name.startswith("window_") for i in shifted.manifest.graphs["prefill"].inputs)
    io = shifted.io["decode"]
    assert io.window == 8 and io.sliding == {l.index for l in shifted.manifest.kv_cache.layers if l.sliding_window}
    assert io.window_shift(np.array([20, 12]), 1) == 4 and io.window_shift(np.array([20, 12]), 3) == 0
    assert io.window_shift(np.array([7]), 1) == 0
    shifts, rule = [], io.window_shift
    io.window_shift = lambda seqlens, new: shifts.append(rule(seqlens, new)) or shifts[-1]

    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (30, 12)]
    for mode in MODES:
        seen = {}
        for name, session in (("shifted", shifted), ("whole", whole)):
            seen[name] = []
            def keep(phase, logits, out=seen[name]):
                out.append((phase, None if logits is None else logits.copy()))
            for _ in session.run(session.encode(rows), 24, mode, observe=keep):
                pass
        assert [p for p, _ in seen["shifted"]] == [p for p, _ in seen["whole"]]
        for (phase, a), (_, b) in zip(seen["shifted"], seen["whole"]):
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"{mode} {phase}")
    # POP's boundary step skips already (rows of 30 and 12: 4 slots), full mode's prompt nothing
    assert shifts[0] == 4 and 0 in shifts and max(shifts) >= 8


def test_steady_decode_steps_bind_nothing_and_change_nothing(exports):
    """Decode steps that bind what the step before bound pass the same inputs and outputs again, and ONNX
    Runtime binds nothing: the logits are those of steps bound afresh, exactly, at every phase and step, in
    both modes, for a batch of two rows, then one row (the buffers change size), on tiny-gemma3, whose
    sliding layers' skip moves every other step (a new binding), and tiny-llama (none after the first)."""
    from pop.runtime.session import MODES
    g = torch.Generator().manual_seed(5)
    for model in ("tiny-gemma3", "tiny-llama"):
        steady, fresh = PopSession.load(exports(model)), PopSession.load(exports(model))
        run = fresh._run

        def unsteady(*args, **kwargs):
            fresh._steady = None  # what every call did before: build and bind its inputs and outputs anew
            return run(*args, **kwargs)
        fresh._run = unsteady
        binds, io = [], steady.backend._bindings["decode"]
        bind_input, bind_output = io.bind_input, io.bind_output
        io.bind_input = lambda name, *a: binds.append(name) or bind_input(name, *a)
        io.bind_output = lambda name, *a: binds.append(name) or bind_output(name, *a)
        for rows in ([torch.randint(3, 250, (n,), generator=g).tolist() for n in (30, 12)],
                     [torch.randint(3, 250, (17,), generator=g).tolist()]):
            for mode in MODES:
                seen, per_step = {}, []
                for name, session in (("steady", steady), ("fresh", fresh)):
                    seen[name] = []

                    def keep(phase, logits, out=seen[name], name=name):
                        out.append((phase, None if logits is None else logits.copy()))
                        if name == "steady" and phase == "decode":
                            per_step.append(len(binds))
                    for _ in session.run(session.encode(rows), 20, mode, observe=keep):
                        pass
                assert [p for p, _ in seen["steady"]] == [p for p, _ in seen["fresh"]]
                for (phase, a), (_, b) in zip(seen["steady"], seen["fresh"]):
                    if a is not None:
                        np.testing.assert_array_equal(a, b, err_msg=f"{model} {mode} {phase}")
                bound = np.diff(per_step)  # names bound by each decode step after the first
                if model == "tiny-llama":
                    assert not bound.any(), (mode, bound)
                else:  # the sliding layers' past moves every window/4 = 2 steps, and is bound again then
                    assert (bound == 0).sum() >= len(bound) // 2 - 1 and bound.any(), (mode, bound)
        # a call of two tokens right after a steady one-token step binds afresh (same graph, row and shift)
        slot = int(steady._seqlens[0])
        two = np.array([[7, 11]], np.int64)
        for session in (steady, fresh):
            session._run("decode", None, np.array([[5]], np.int64), np.array([slot + 1]), slot + 2)
        a = steady._run("decode", None, two, np.array([slot + 3]), slot + 4)[0].copy()
        np.testing.assert_array_equal(a, fresh._run("decode", None, two, np.array([slot + 3]), slot + 4)[0])


def test_prompt_in_chunks_gives_the_logits_of_one_call(family, exports, hf_models):
    """A prompt phase in chunks of 5 tokens (ONNX Runtime on the CPU chunks at PROMPT_CHUNK) leaves the KV
    buffer and the logits of one call, at every phase and step in both modes, past tiny-gemma3's window of
    8; POP in chunks still generates the reference's tokens, and rows of different lengths get their own."""
    from pop.runtime.backends.ort import PROMPT_CHUNK
    from pop.runtime.session import MODES
    directory = exports(family)
    chunked, whole = PopSession.load(directory, prompt_chunk=5), PopSession.load(directory, prompt_chunk=0)
    assert whole.prompt_chunk is None and PopSession.load(directory).prompt_chunk == PROMPT_CHUNK
    calls, run = [], chunked.backend.run
    chunked.backend.run = lambda graph, inputs, outputs: calls.append((graph, inputs["input_ids"].shape[1])) or \
        run(graph, inputs, outputs)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, 250, (23,), generator=g).tolist() for _ in range(2)]
    for mode in MODES:
        seen = {}
        for name, session in (("chunked", chunked), ("whole", whole)):
            seen[name] = []

            def keep(phase, logits, out=seen[name], session=session):
                written = session.kv.cache[:, :, :2, :, :31].copy()  # both rows, the prompt and 8 tokens
                out.append((phase, None if logits is None else logits.copy(), written))
            for _ in session.run(session.encode(rows), 8, mode, observe=keep):
                pass
        assert [p for p, *_ in seen["chunked"]] == [p for p, *_ in seen["whole"]]
        for (phase, a, ka), (_, b, kb) in zip(seen["chunked"], seen["whole"]):
            np.testing.assert_allclose(ka, kb, atol=1e-5, rtol=0, err_msg=f"{mode} {phase} KV")
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"{mode} {phase}")
    prompt = [c for c in calls if c[1] > 1]
    # per row, 22 POP prefill slots and 23 full-mode ones, each in 5 calls of near-equal size
    assert prompt == [("prefill", n) for n in (4, 5, 4, 5, 4) * 2] + [("decode", n) for n in (5, 4, 5, 4, 5) * 2]
    hf = hf_models(family)
    ids = _ids(hf, PROMPTS[1])
    expected = reference.generate(hf.model, torch.tensor([ids]), keep=chunked.manifest.pop.prefill_layers,
                                  max_new_tokens=NEW, eos_ids=chunked.eos_ids)[0].tolist()
    got = chunked.generate(ids, NEW).output_ids[0]
    assert got == expected[:len(got)] and (len(got) == len(expected) or got[-1] in chunked.eos_ids)
    for mode in MODES:  # rows of different lengths: each in its own chunks, the same first logits
        got = [next(s.run(s.encode([rows[0], rows[1][:9]]), 1, mode, sampler=lambda x: x.argmax(-1))) for s in
               (chunked, whole)]
        np.testing.assert_array_equal(*got)
        np.testing.assert_allclose(chunked._logits[:2], whole._logits[:2], atol=1e-5, rtol=0)


def _rows(kv, layer, kind, row, length):
    """Row `row`'s first `length` cached K (kind 0) or V entries, [slots, kv_heads, head_dim]."""
    return kv.cache[layer, kind, row, :, :length].transpose(1, 0, 2)


def test_default_pruning_graphs_match_reference(family, exports, hf_models):
    """The prefill graph, then the boundary step, at shapes unlike the trace sample (two rows of different
    lengths, past tiny-gemma3's window of 8), against the eager reference row by row."""
    directory = exports(family)
    manifest = json.loads((directory / "pop_manifest.json").read_text())
    hf = hf_models(family).model
    layers = hf.config.num_hidden_layers
    keep = manifest["pop"]["prefill_layers"]
    assert keep == layers - layers // 3 and manifest["pop"]["pruned_layers"] == list(range(keep, layers))
    assert manifest["verification"]["passed"]
    assert {g["form"] for g in manifest["graphs"].values()} == {"fused"}

    session = PopSession.load(directory)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (19, 12)]
    seen = {}

    def observe(phase, logits):
        seen[phase] = (session.kv.cache.copy(), None if logits is None else logits.copy())
    next(session.run(session.encode(rows), 1, "pop", observe=observe))
    tol = TOLERANCE["float32"]
    for b, row in enumerate(rows):
        ids = torch.tensor([row])
        mask = torch.ones_like(ids)
        ref = reference.prefill(hf, ids[:, :-1], mask[:, :-1], keep)
        cache, _ = seen["prefill"]
        n = len(row) - 1
        for l, (k, v) in enumerate(reference.cache_tensors(ref)):
            stored = k.shape[0]  # HF keeps only a sliding layer's window
            np.testing.assert_allclose(cache[l, 0, b, :, n - stored:n].transpose(1, 0, 2), k[:, 0], atol=tol, rtol=0)
            np.testing.assert_allclose(cache[l, 1, b, :, n - stored:n].transpose(1, 0, 2), v[:, 0], atol=tol, rtol=0)
        cache, logits = seen["boundary"]
        np.testing.assert_allclose(logits[b], reference.step(hf, ids[:, -1:], mask, ref)[0].numpy(), atol=tol, rtol=0)
        for l, (k, v) in enumerate(reference.cache_tensors(ref)):  # the boundary token's own K/V, at slot n
            np.testing.assert_allclose(cache[l, 0, b, :, n], k[-1, 0], atol=tol, rtol=0)
            np.testing.assert_allclose(cache[l, 1, b, :, n], v[-1, 0], atol=tol, rtol=0)


def test_default_pruning_generation_equals_reference(family, exports, hf_models):
    session = PopSession.load(exports(family))
    hf = hf_models(family)
    keep = session.manifest.pop.prefill_layers
    assert keep < session.num_layers
    for text in PROMPTS:
        ids = _ids(hf, text)
        expected = reference.generate(hf.model, torch.tensor([ids]), keep=keep, max_new_tokens=NEW,
                                      eos_ids=session.eos_ids)[0].tolist()
        got = session.generate(ids, NEW).output_ids[0]
        assert got == expected[:len(got)] and (len(got) == len(expected) or got[-1] in session.eos_ids), text


@pytest.mark.parametrize("length", [1, 2])
def test_short_prompts(family, exports, hf_models, length):
    """One token skips prefill; two tokens prefill exactly one."""
    session = PopSession.load(exports(family))
    hf = hf_models(family)
    ids = _ids(hf, "Hi")[:length]
    assert len(ids) == length
    expected = reference.generate(hf.model, torch.tensor([ids]), keep=session.manifest.pop.prefill_layers,
                                  max_new_tokens=8)[0].tolist()
    assert session.generate(ids, 8, stop_at_eos=False).output_ids[0] == expected


@pytest.mark.parametrize("texts", [("Hello there, general", "Goodbye there, major"),  # equal lengths
                                   ("It is a truth universally acknowledged", "Hi")])  # left-padded
def test_batch_of_two(family, exports, hf_models, texts):
    session = PopSession.load(exports(family))
    hf = hf_models(family)
    keep = session.manifest.pop.prefill_layers
    rows = [_ids(hf, t) for t in texts]
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    expected = reference.generate(hf.model, ids, mask, keep=keep, max_new_tokens=12).tolist()
    batch = session.generate(rows, 12, stop_at_eos=False).output_ids
    assert batch == expected
    for row, alone in zip(rows, expected):  # batching changes nothing
        assert session.generate(row, 12, stop_at_eos=False).output_ids[0] == alone


def test_kv_buffer_is_written_in_place(family, exports, hf_models):
    """The graphs write the prompt's K/V straight into the session's one buffer (the fused form's attention
    in place; the pruned layers' KV heads placed by the runtime), which is never reallocated."""
    session = PopSession.load(exports(family))
    hf = hf_models(family)
    storage = session.kv._storage
    address = storage.ctypes.data
    ids = _ids(hf, PROMPTS[0])
    session.generate(ids, 4, stop_at_eos=False)
    assert session.kv._storage is storage and storage.ctypes.data == address
    ref = reference.prefill(hf.model, torch.tensor([ids[:-1]]), torch.ones(1, len(ids) - 1, dtype=torch.long),
                            session.manifest.pop.prefill_layers)
    n = len(ids) - 1
    for l, (k, v) in enumerate(reference.cache_tensors(ref)):
        stored = k.shape[0]
        np.testing.assert_allclose(_rows(session.kv, l, 0, 0, n)[n - stored:], k[:, 0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(_rows(session.kv, l, 1, 0, n)[n - stored:], v[:, 0], atol=1e-4, rtol=0)


def test_kv_buffer_pages_are_resident_only_where_written(exports):
    """numpy asks the kernel for transparent huge pages on arrays of 4 MiB and more, and then one write makes
    2 MiB resident: the real models' KV buffers were wholly resident after any prompt.  The runtime's buffer
    is in 4 KiB pages: eight short prompts in a buffer of 6 MB make the first page of each layer's, row's and
    head's slots resident, and nothing else."""
    import mmap
    session = PopSession.load(exports("tiny-llama"))
    prompt = [1, 45, 67, 89, 23, 56]
    expected = session.generate(prompt, 4, stop_at_eos=False).output_ids[0]
    out = session.generate([prompt] * 8, 4, stop_at_eos=False)
    assert all(ids == expected for ids in out.output_ids)
    kv = session.kv
    slot_bytes = kv.head_dim * kv.dtype.itemsize
    assert kv.nbytes > 4 << 20 and kv.max_seq_len * slot_bytes % mmap.PAGESIZE == 0
    assert (len(prompt) + 4) * slot_bytes <= mmap.PAGESIZE  # every row's slots so far lie in its first page
    assert resident_bytes(kv._storage) == kv.num_layers * 2 * kv.rows * kv.kv_heads * mmap.PAGESIZE


def test_weights_are_stored_once(family, exports):
    import onnx
    directory = exports(family)
    manifest = json.loads((directory / "pop_manifest.json").read_text())
    ranges = {}
    for graph in manifest["graphs"].values():
        model = onnx.load(str(directory / graph["file"]), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == "weights.bin"
                ranges.setdefault((int(info["offset"]), int(info["length"])), set()).add(graph["file"])
    spans = sorted(ranges)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:])), "overlapping tensors"
    assert sum(length for _, length in spans) == manifest["weights"]["stored_bytes"]
    assert any(len(files) == 2 for files in ranges.values()), "the graphs share no tensor"
    # every byte the two graphs reference, counted per graph, exceeds what is stored
    assert manifest["weights"]["stored_bytes"] < manifest["weights"]["referenced_bytes"]
    assert (directory / "weights.bin").stat().st_size == manifest["weights"]["bytes"]
    assert manifest["weights"]["bytes"] <= manifest["memory"]["parameter_bytes"] * 1.01 + rope_table_bytes(manifest) + \
        packed_copy_bytes(manifest)


def test_sampling_is_seeded(family, exports):
    session = PopSession.load(exports(family))
    from pop.runtime.sampling import Sampler
    runs = [session.generate([1, 72, 105], 16, sampler=Sampler(1.0, 50, 0.9, seed=s), stop_at_eos=False).output_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_fp16_export_is_verified_and_runs(tmp_path):
    out = tmp_path / "fp16"
    run = cli("pop-export", "--model", "tiny-llama", "--out", out, "--dtype", "fp16")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "pop_manifest.json").read_text())
    report = manifest["verification"]
    assert manifest["dtype"] == "float16" and report["passed"] and report["tolerance"] == TOLERANCE["float16"]
    # 2 bytes a weight
    assert manifest["weights"]["bytes"] <= manifest["memory"]["parameter_bytes"] * 1.01 + rope_table_bytes(manifest) + \
        packed_copy_bytes(manifest)
    got = generate_json(out, [1, 72, 101, 108, 108, 111], 8, extra=("--ignore-eos",))
    assert len(got["output_ids"]) == 8


def test_json_contract_with_a_single_new_token(exports):
    got = generate_json(exports("tiny-llama"), [1, 72], 1)
    assert set(got) >= {"prompt_ids", "output_ids", "text", "ttft_ms", "decode_ms_per_token"}
    assert len(got["output_ids"]) == 1 and got["decode_ms_per_token"] is None and got["ttft_ms"] > 0


def test_session_threads_release_the_cores_between_runs(exports):
    """Each graph's threads leave the cores to the other graph's when a run returns: the decode session spins
    between its ops and stops at the end of each run, the prefill session never spins (timed in
    benchmarks/spinning.py)."""
    def entry(session, key):
        try:
            return session.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default
            return None
    sessions = PopSession.load(exports("tiny-llama")).backend.sessions
    assert entry(sessions["decode"], "session.force_spinning_stop") == "1"
    assert entry(sessions["decode"], "session.intra_op.allow_spinning") in (None, "1")
    assert entry(sessions["prefill"], "session.intra_op.allow_spinning") == "0"


def test_attention_takes_the_packed_product_where_nothing_comes_between(family, exports):
    """The fused form feeds a layer's packed Q/K/V product to GroupQueryAttention whole (the operator splits
    it without a copy) where no per-head norm comes between (Llama); Qwen3 and Gemma-3 norm queries and
    keys per head, so theirs are split first.  The numbers are the reference's either way (the graph
    comparisons above)."""
    import onnx
    directory = exports(family)
    for graph in ("prefill", "decode"):
        model = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
        producer = {o: n for n in model.graph.node for o in n.output}
        attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert attention, graph
        for n in attention:
            packed = n.input[1] == "" and n.input[2] == ""
            assert packed == (family == "tiny-llama"), (graph, n.name, list(n.input[:3]))
            if packed:
                assert producer[n.input[0]].op_type == "MatMul", producer[n.input[0]].op_type
