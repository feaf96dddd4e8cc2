"""Shared fixtures: exports are made once per test session and reused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """exports(model, keep) -> artifact folder, exported once per session (keep=None: default)."""
    made = {}

    def get(model, keep=None):
        if (model, keep) not in made:
            out = tmp_path_factory.mktemp("artifacts") / f"{model}-{keep}"
            export(ExportOptions(model, out, prefill_layers=keep), progress=lambda m: None)
            made[model, keep] = out
        return made[model, keep]
    return get


@pytest.fixture(scope="session")
def hf_models():
    loaded = {}

    def get(model):
        if model not in loaded:
            loaded[model] = sources.load(model, progress=lambda m: None)
        return loaded[model]
    return get
