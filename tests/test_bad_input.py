"""Every user error: one line on stderr, a non-zero exit, and no half-written output."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, assert_one_line_error, cli
from pop.cli.console import run_command
from pop.runtime.errors import PopError


@pytest.fixture
def artifacts(exports, tmp_path):
    """A private copy of a good export, for a test to damage."""
    copy = tmp_path / "art"
    shutil.copytree(exports("tiny-llama"), copy)
    return copy


def test_good_copy_runs(artifacts):
    run = cli("pop-generate", artifacts, "--prompt-ids", "1,72,105", "--max-new-tokens", 3, "--json")
    assert run.returncode == 0 and len(json.loads(run.stdout)["output_ids"]) == 3


def test_unknown_model(tmp_path):
    out = tmp_path / "out"
    run = cli("pop-export", "--model", "no-such-model", "--out", out)
    assert_one_line_error(run, "unknown model", "no-such-model")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    run = subprocess.run([str(BIN / "pop-export"), "--model", "some-org/some-model", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env={"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin"})
    assert_one_line_error(run, "not in the local Hugging Face cache", "hf download some-org/some-model")


def test_bad_prefill_layers(tmp_path):
    run = cli("pop-export", "--model", "tiny-llama", "--out", tmp_path / "o", "--prefill-layers", 99)
    assert_one_line_error(run, "--prefill-layers must be in 1..6")
    assert not (tmp_path / "o").exists()


def test_prompt_too_long(artifacts):
    limit = json.loads((artifacts / "pop_manifest.json").read_text())["max_seq_len"]
    ids = ",".join(["65"] * (limit + 1))
    run = cli("pop-generate", artifacts, "--prompt-ids", ids)
    assert_one_line_error(run, f"prompt has {limit + 1} tokens", f"at most {limit}")
    # a text prompt is echoed while streaming, but never one that is refused
    run = cli("pop-generate", artifacts, "--prompt", "word " * (limit + 1))
    assert_one_line_error(run, "tokens; these artifacts hold", f"at most {limit}")
    assert run.stdout == ""


def test_token_outside_vocabulary(artifacts):
    run = cli("pop-generate", artifacts, "--prompt-ids", "1,99999")
    assert_one_line_error(run, "outside the vocabulary")


def test_negative_prompt_chunk(artifacts):
    run = cli("pop-generate", artifacts, "--prompt-ids", "1,72", "--prompt-chunk", "-1")
    assert_one_line_error(run, "--prompt-chunk takes a number of tokens", "got -1")


def test_missing_folder(tmp_path):
    assert_one_line_error(cli("pop-generate", tmp_path / "nothing", "--prompt", "x"), "not a folder")


@pytest.mark.parametrize("victim", ["pop_manifest.json", "decode.onnx", "prefill.onnx", "weights.bin",
                                    "tokenizer/tokenizer.json"])
def test_missing_artifact(artifacts, victim):
    (artifacts / victim).unlink()
    assert_one_line_error(cli("pop-generate", artifacts, "--prompt", "x"), "missing")


def test_truncated_weights(artifacts):
    w = artifacts / "weights.bin"
    w.write_bytes(w.read_bytes()[:-4096])
    assert_one_line_error(cli("pop-generate", artifacts, "--prompt", "x"), "weights.bin", "corrupt")


def test_corrupt_graph(artifacts):
    (artifacts / "decode.onnx").write_bytes(b"\x08\x07garbage" * 100)
    assert_one_line_error(cli("pop-generate", artifacts, "--prompt", "x"), "decode.onnx", "cannot be loaded")


def test_corrupt_manifest(artifacts):
    (artifacts / "pop_manifest.json").write_text('{"format": "pop-manifest", "schema_ver')
    assert_one_line_error(cli("pop-generate", artifacts, "--prompt", "x"), "corrupt")


def test_incompatible_manifest_version(artifacts):
    path = artifacts / "pop_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    assert_one_line_error(cli("pop-generate", artifacts, "--prompt", "x"), "schema version 99", "re-export")


def test_trt_missing_writes_onnx_and_fails(tmp_path):
    from pop.exporter.formats.tensorrt import available
    ok, version = available()
    if ok:
        pytest.skip(f"TensorRT {version} is importable here: the export would build engines, not fail")
    out = tmp_path / "trt"
    run = cli("pop-export", "--model", "tiny-qwen3", "--out", out, "--format", "trt", "--skip-verify")
    assert_one_line_error(run, "no TensorRT engine was built", "tensorrt")
    manifest = json.loads((out / "pop_manifest.json").read_text())
    assert manifest["engines"] == {} and not list(out.glob("*.engine"))
    assert {g["form"] for g in manifest["graphs"].values()} == {"plain"}  # what TensorRT's parser reads
    ok = cli("pop-generate", out, "--prompt-ids", "1,72", "--max-new-tokens", 2, "--json")
    assert ok.returncode == 0, ok.stderr  # ONNX Runtime runs the plain form too
    assert_one_line_error(cli("pop-generate", out, "--prompt-ids", "1,72", "--backend", "trt"),
                          "no TensorRT engine for prefill, decode", "--format trt")


def test_interrupted_export_leaves_nothing_complete(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([str(BIN / "pop-export"), "--model", "tiny-gemma3", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # interrupt once the export has started writing into its temporary folder
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".partial-*/*")):
        time.sleep(0.1)
    assert list(tmp_path.glob(".partial-*")), "the export never started writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    # The first seconds of every command go to importing torch, before the
    # command's own code runs; Ctrl-C there must not end in a traceback.
    proc = subprocess.Popen([str(BIN / "pop-export"), "--model", "tiny-gemma3", "--out", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.01)
    assert proc.poll() is None, "pop-export ended before torch was loaded"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "pop-export: interrupted; nothing was written", err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_wins_over_the_error_a_library_makes_of_it(capsys):
    # The timing test_interrupted_export_leaves_nothing_complete can hit by chance:
    # SIGINT during `import onnxruntime` comes back as ImportError("initialization
    # failed"), which our import guard turns into "ONNX Runtime is not installed".
    def body():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise PopError("ONNX Runtime is not installed (initialization failed)") from None
        raise AssertionError("SIGINT was not delivered")

    before = signal.getsignal(signal.SIGINT)
    assert run_command("pop-test", body) == 130
    assert capsys.readouterr().err.strip() == "pop-test: interrupted; nothing was written"
    assert signal.getsignal(signal.SIGINT) is before

    def fails():
        raise PopError("no such model")
    assert run_command("pop-test", fails) == 2
    assert capsys.readouterr().err.strip() == "pop-test: error: no such model"


def test_killed_export_leaves_no_complete_looking_folder(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([str(BIN / "pop-export"), "--model", "tiny-gemma3", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".partial-*/*.onnx")):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".partial-") for p in leftovers)
    assert not any((p / "pop_manifest.json").exists() and (p / "decode.onnx").exists() and
                   json.loads((p / "pop_manifest.json").read_text()).get("verification") for p in leftovers)


def test_bf16_cannot_be_verified_on_cpu(tmp_path):
    run = cli("pop-export", "--model", "tiny-llama", "--out", tmp_path / "o", "--dtype", "bf16")
    assert_one_line_error(run, "bf16", "--skip-verify")
    assert list(tmp_path.iterdir()) == []
