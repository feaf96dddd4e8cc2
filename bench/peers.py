"""What users run today, on the same weights, prompts and thread count.

* hf-eager: transformers' own `generate`, eager attention, in this process.
* optimum-onnx: the standard Optimum export (text-generation-with-past) in ONNX
  Runtime.  Optimum pins an older transformers, so it lives in its own
  virtualenv (scripts/optimum_venv.sh) and is driven by path through
  optimum_peer.py; nothing of it is imported here.

A peer that cannot run says why in its row instead of failing the benchmark.
"""
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from pop.runtime.errors import PopError

from pop.runtime.memory import peak_rss_bytes

from .measure import reset_peak_rss, stat

PEERS = ("hf", "optimum", "genai", "genai-int4")
PEER_SCRIPT = Path(__file__).with_name("optimum_peer.py")
GENAI_SCRIPT = Path(__file__).with_name("genai_peer.py")


def model_spec(manifest):
    """(spec for pop.exporter.sources.load, HF folder or None) of the weights the artifacts came from."""
    src = manifest.model.source
    if src["kind"] == "tiny":
        return src["id"], None
    if src["kind"] == "gguf":
        folder = src.get("converted")
        return (folder if folder and Path(folder, "config.json").exists() else src.get("preset") or src["path"]), folder
    return src["path"], src["path"]


class _Timestamps:
    """A generate() streamer that only notes when each put() arrives: the first
    carries the prompt, the second the first new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class HFEager:
    name = "hf-eager"

    def __init__(self, manifest, threads, progress=print):
        import torch

        from pop.exporter import sources
        torch.set_num_threads(threads)
        spec, _ = model_spec(manifest)
        progress(f"hf-eager: loading {spec}")
        self.model = sources.load(spec, "float32", progress).model
        self.model.set_attn_implementation("eager")
        self.pad = manifest.tokenizer.pad_id
        self.versions = {"transformers": __import__("transformers").__version__, "torch": torch.__version__}

    def measure(self, ids, new_tokens, runs, warmup, tick=lambda: None):
        import torch
        x = torch.from_numpy(ids)
        ttft, per_token = [], []
        reset = reset_peak_rss()
        for i in range(warmup + runs):
            clock = _Timestamps()
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                                          pad_token_id=self.pad)
            tick()
            if i >= warmup:
                t = clock.times
                ttft.append((t[1] - start) * 1e3)
                if len(t) > 2:
                    per_token.append((t[-1] - t[1]) * 1e3 / (len(t) - 2))
        return {"ttft": stat(ttft), "decode_per_token": stat(per_token),
                "peak_rss_bytes": peak_rss_bytes() if reset else None,
                "first_tokens": [int(t) for t in out[:, ids.shape[1]]]}


def venv_python(peer, explicit, env_var, venv, script):
    """A peer venv's interpreter: the flag, else $env_var, else `venv` beside the source or in the working
    folder.  Raises PopError saying how to make one (`script`)."""
    if explicit or os.environ.get(env_var):
        chosen = Path(explicit or os.environ[env_var])
        if not chosen.is_file():
            raise PopError(f"no {peer} virtualenv python at {chosen}: run `bash scripts/{script}`")
        return chosen
    for folder in (Path(__file__).resolve().parents[1] / venv, Path.cwd() / venv):
        if (folder / "bin" / "python").is_file():
            return folder / "bin" / "python"
    raise PopError(f"no {peer} virtualenv: run `bash scripts/{script}`, or pass its python")


def optimum_python(explicit=None):
    return venv_python("Optimum", explicit, "POP_OPTIMUM_PYTHON", ".venv-optimum", "optimum_venv.sh")


def genai_python(explicit=None):
    return venv_python("onnxruntime-genai", explicit, "POP_GENAI_PYTHON", ".venv-genai", "genai_venv.sh")


class ScriptPeer:
    """A peer in its own virtualenv: a script of ours run by that venv's python, which measures every
    configuration in one call (the model loads once) and prints one JSON object."""
    name = script = None

    def _call(self, *args):
        cmd = [str(self.python), str(self.script), *map(str, args)]
        # stderr passes through: it is the peer's progress
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            raise PopError(f"the {self.name} peer failed (exit {out.returncode}): {' '.join(cmd)}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def _measure(self, configs, *args):
        """configs: [(batch, length, ids)] -> (report, {(batch, length): row})."""
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.json"
            prompts.write_text(json.dumps({"configs": [{"batch": b, "length": n, "ids": ids.tolist()}
                                                       for b, n, ids in configs]}))
            report = self._call(*args, prompts)
        self.versions = report.get("versions", {})
        rows = {}
        for r in report["results"]:
            rows[(r["batch"], r["length"])] = {"ttft": stat(r["ttft_ms"]),
                                               "decode_per_token": stat(r["decode_ms_per_token"]),
                                               "peak_rss_bytes": r.get("peak_rss_bytes"),
                                               "first_tokens": r.get("first_token_ids")}
        return report, rows


class OptimumOnnx(ScriptPeer):
    """The standard Hugging Face Optimum ONNX export, run in ONNX Runtime."""
    name = "optimum-onnx"
    script = PEER_SCRIPT

    def __init__(self, manifest, threads, python, export_dir, progress=print):
        self.python, self.threads, self.progress = python, threads, progress
        _, hf_dir = model_spec(manifest)
        if hf_dir is None:
            raise PopError("tiny presets have no saved Hugging Face folder to export with Optimum")
        self.dir = Path(export_dir)
        if not (self.dir / "model.onnx").exists():
            progress(f"optimum-onnx: exporting {hf_dir} to {self.dir} (once)")
            self._call("export", "--hf-dir", hf_dir, "--out", self.dir)

    def measure_all(self, configs, new_tokens, runs, warmup):
        report, rows = self._measure(configs, "run", "--onnx-dir", self.dir, "--new-tokens", new_tokens, "--runs",
                                     runs, "--warmup", warmup, "--threads", self.threads, "--prompts")
        self.logits_all_positions = report.get("logits_all_positions")
        return rows


class Genai(ScriptPeer):
    """onnxruntime-genai: its own model builder's export of the same HF folder (last-token logits only,
    prune_lm_head), run by its Generator API (bench/genai_peer.py).

    It runs in pop-bench's rotation rather than after it: a process of its own loads the build once
    (start) and takes one turn after each of our POP/full run pairs (turn), so that the machine's drift
    over the minutes a benchmark takes falls on both sides of the comparison alike."""
    script = GENAI_SCRIPT

    def __init__(self, manifest, threads, python, build_dir, precision="fp32", progress=print):
        self.python, self.threads, self.precision = python, threads, precision
        self.name = f"onnxruntime-genai {precision}"
        _, hf_dir = model_spec(manifest)
        if hf_dir is None:
            raise PopError("tiny presets have no saved Hugging Face folder for onnxruntime-genai's builder")
        self.dir = Path(build_dir)
        progress(f"{self.name}: building {hf_dir} into {self.dir} (once)")
        self.build = self._call("build", "--hf", hf_dir, "--out", self.dir, "--precision", precision,
                                "--threads", threads)
        self.proc, self.runs = None, {}

    def start(self, new_tokens):
        cmd = [str(self.python), str(self.script), "serve", "--model", str(self.dir), "--new-tokens", str(new_tokens),
               "--threads", str(self.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()
        self.versions = self.info.get("versions", {})
        return self

    def _reply(self):
        line = self.proc.stdout.readline()
        if not line:
            raise PopError(f"the {self.name} peer stopped (exit {self.proc.wait()}): {' '.join(self.proc.args)}")
        return json.loads(line)

    def turn(self, batch, length, ids, counted, first_of_config=False):
        """One timed run on ids; kept for (batch, length) when counted (warmup turns are not)."""
        self.proc.stdin.write(json.dumps({"ids": ids.tolist(), "reset_rss": first_of_config}) + "\n")
        self.proc.stdin.flush()
        r = self._reply()
        if counted:
            self.runs.setdefault((batch, length), []).append(r)

    def measured(self):
        """{(batch, length): row} in the shape ScriptPeer._measure gives."""
        out = {}
        for key, runs in self.runs.items():
            out[key] = {"ttft": stat([r["ttft_ms"] for r in runs]),
                        "decode_per_token": stat([r["decode_ms_per_token"] for r in runs
                                                  if r["decode_ms_per_token"] is not None]),
                        "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in runs) or None,
                        "first_tokens": runs[-1]["first_token_ids"]}
        return out

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def first_token_agreement(a, b):
    """Fraction of rows whose first generated token is the same (None when either is missing)."""
    if not a or not b:
        return None
    return float(np.mean([x == y for x, y in zip(a, b)]))
