"""The GPU check (scripts/gpu_check.sh) runs end to end on the CPU in --dry-run form, so that it does not
rot where no GPU is: every step but the CUDA ones, with the exported parity and pop-bench steps through
ONNX Runtime on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=900)


def test_dry_run_end_to_end(tmp_path):
    run = _run(tmp_path, "--dry-run", "--budget", "600")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["passed"] and report["env"]["device"] == "cpu"
    eager = {r["model"]: r for r in report["parity"] if r["what"].startswith("eager")}
    assert set(eager) == {"tiny-llama", "tiny-gemma3", "gemma3-270m-shape"}
    for r in eager.values():
        assert r["full_logits"]["passed"] and r["pop_logits"]["passed"] and r["greedy_equal"], r
    exported = {r["model"]: r for r in report["parity"] if r["what"].startswith("pop-export")}
    assert set(exported) == {"tiny-llama", "tiny-gemma3"}
    for r in exported.values():
        assert r["verified_at_export"] and r["pop_greedy_equal"] and r["full_greedy_equal"], r
        assert r["pop_logits"]["max_abs"] <= 1e-4 * r["pop_logits"]["scale"], r
    rows = report["speed"]["rows"]
    assert {(r["batch"], r["prompt_len"]) for r in rows} == {(1, 16), (1, 32), (2, 16), (2, 32)}
    assert all(r["pop_ttft_ms"] > 0 and r["full_ttft_ms"] > 0 and r["expected_speedup"] > 1 for r in rows)
    [bench] = report["speed_backends"]
    assert bench["backend"] == "ort" and len(bench["rows"]) == 4 and (tmp_path / bench["json"]).is_file()
    diagnosis = report["aoti_diagnosis"]  # AOTInductor against eager, weights loaded as the runtime loads them
    assert diagnosis["passed"] and diagnosis["user_managed"]["logits"]["passed"], diagnosis
    skipped = {s["step"]: s["why"] for s in report["skipped"]}
    assert "--dry-run" in skipped["ort-cuda parity and speed"] and "--dry-run" in skipped["trt parity and speed"]
    assert (tmp_path / "gpu_check.png").stat().st_size > 10_000


def test_without_a_gpu_it_says_so(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: the check would run for real")
    run = _run(tmp_path)
    assert run.returncode == 2 and "torch sees no CUDA device" in run.stderr
    assert not (tmp_path / "gpu_check.json").exists()
