"""Shared fixtures: exports are made once per test session and reused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

from pop.exporter import sources
from pop.exporter.export import export
from pop.exporter.options import ExportOptions

BIN = Path(sys.executable).parent
EXCERPTS = json.loads((Path(__file__).parent / "data" / "excerpts.json").read_text())["passages"]


def cli(name, *args, timeout=1800):
    """Run an installed console script; returns the CompletedProcess."""
    return subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def generate_json(directory, ids, max_new_tokens, mode="pop", extra=()):
    out = cli("pop-generate", directory, "--prompt-ids", ",".join(map(str, ids)),
              "--max-new-tokens", max_new_tokens, "--mode", mode, "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def hf_greedy(model, ids, max_new_tokens, eos_ids):
    """HF transformers' own generate, greedy; generated ids only, up to and including eos."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=list(eos_ids), pad_token_id=list(eos_ids)[0])
    return out[0, ids.shape[1]:].tolist()


def assert_one_line_error(run, *needles, code=None):
    """An installed command's refusal: a non-zero exit (`code` where given), no traceback, and every needle in
    the last stderr line."""
    assert run.returncode != 0 if code is None else run.returncode == code, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in run.stderr, run.stderr
    assert all(n in lines[-1] for n in needles), lines[-1]


@pytest.fixture
def refused(capsys):
    """refused(prog, *args) -> the stderr lines of a console program that refused its arguments, run in
    this process through its own entry point (pop.cli.<name>.main under run_command, as the installed
    command runs it): exit 2, no traceback, the line starts "<prog>: error: ".  The bad-input tests take
    their cases this way; an interpreter start costs seconds of importing torch for one line."""
    import importlib
    from pop.cli.console import run_command

    def run(prog, *args):
        main = importlib.import_module(f"pop.cli.{prog.removeprefix('pop-')}").main
        argv = [str(a) for a in args]
        assert run_command(prog, lambda: main(argv)) == 2, (prog, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith(f"{prog}: error: ") and "Traceback" not in "\n".join(err), (argv, err)
        return err
    return run


def forbid_model_loading(monkeypatch):
    """From here on, loading a model fails the test: for input that must be refused before any model loads."""
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")
    monkeypatch.setattr(sources, "load", fail)


def rope_table_bytes(manifest):
    """The rotary tables (cos and sin, [max_seq_len, head_dim / 2] per rope kind) the graphs hold as constants
    beside the model's own parameters: tiny-gemma3 has two kinds (sliding and global layers)."""
    kinds = 2 if manifest["model"]["architecture"].startswith("Gemma3") else 1
    size = np.dtype(manifest["dtype"]).itemsize
    return kinds * 2 * manifest["max_seq_len"] * manifest["kv_cache"]["layers"][0]["head_dim"] // 2 * size


def packed_copy_bytes(manifest):
    """The pruned layers' own K/V matrices, which the fused form's prefill graph stores beside the packed
    Q/K/V matrices that every full layer uses (exporter/pop.py, PopGraph)."""
    if any(g.get("form") != "fused" for name, g in manifest["graphs"].items() if name != "vision"):
        return 0
    size = np.dtype(manifest["dtype"]).itemsize
    layers = {c["index"]: c for c in manifest["kv_cache"]["layers"]}
    return sum(2 * manifest["model"]["hidden_size"] * layers[l]["kv_heads"] * layers[l]["head_dim"] * size
               for l in manifest["pop"]["pruned_layers"])


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """exports(model, keep, form, weights, **options) -> artifact folder, exported once per session (keep=None:
    the default K; form=None: ONNX's default, the fused form; "plain": what --format trt writes, without
    engines; weights: "fp32", "int8" or "int4", with fp32 products unless weights_compute says otherwise;
    options: more ExportOptions fields)."""
    made = {}

    def get(model, keep=None, form=None, weights="fp32", **options):
        if weights != "fp32":  # fp32 products unless asked: the tests compare them exactly with references
            options.setdefault("weights_compute", "fp32")
        key = (model, keep, form, weights, *sorted(options.items()))
        if key not in made:
            tag = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
            out = tmp_path_factory.mktemp("artifacts") / f"{model}-{keep}-{form}-{weights}{tag}"
            export(ExportOptions(model, out, prefill_layers=keep, graph_form=form, weights=weights, **options),
                   progress=lambda m: None)
            made[key] = out
        return made[key]
    return get


@pytest.fixture(scope="session")
def hf_models():
    loaded = {}

    def get(model):
        if model not in loaded:
            loaded[model] = sources.load(model, progress=lambda m: None)
        return loaded[model]
    return get
