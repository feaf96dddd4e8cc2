"""pop-load: the workload is what its seed says, the client counts what the server did, and a whole run
(real pop-serve processes, POP and full mode and one-at-a-time, alternating) writes its report and plot.
Speed is the benchmark's business (benchmarks/serve/); here only what can be wrong without a stopwatch."""
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import cli
from pop.bench import load

TEXT = "../shared/data/text"


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    items = [load.Item("x", 1, 1)] * 5000
    a, b = load.poisson(items, 4.0, 500, seed=3), load.poisson(items, 4.0, 500, seed=3)
    assert a.offsets == b.offsets and a.offsets != load.poisson(items, 4.0, 500, seed=4).offsets
    gaps = [y - x for x, y in zip([0.0, *a.offsets], a.offsets)]
    assert all(g > 0 for g in gaps)
    assert abs(len(a.offsets) / 500 - 4.0) < 0.3  # 2000 arrivals: the count's sd is about 45
    assert load.poisson(items, 0.001, 1, seed=0).items == items[:4]  # never fewer than 4 requests
    with pytest.raises(ValueError, match="prompts"):
        load.poisson(items[:3], 4.0, 10, seed=0)


def test_prompts_are_windows_of_the_text_with_the_lengths_asked():
    # a whitespace tokenizer, so that a prompt's length can be checked exactly
    words = load.text_pool(TEXT).split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    inverse = {i: w for w, i in vocab.items()}
    encode = lambda text: [vocab[w] for w in text.split()]  # noqa: E731
    decode = lambda ids: " ".join(inverse[i] for i in ids)  # noqa: E731
    items = load.prompts(encode, decode, " ".join(words), 200, (16, 512), (4, 9), seed=1)
    assert items == load.prompts(encode, decode, " ".join(words), 200, (16, 512), (4, 9), seed=1)
    lengths = [i.prompt_tokens for i in items]
    assert min(lengths) >= 16 and max(lengths) <= 512
    assert all(len(encode(i.prompt)) == i.prompt_tokens for i in items)
    assert all(i.prompt in " ".join(words) for i in items[:20])
    assert {i.max_tokens for i in items} == set(range(4, 10))
    # log-uniform: as many prompts below the geometric middle (about 90 tokens) as above it
    below = sum(n < math.sqrt(16 * 512) for n in lengths)
    assert 70 < below < 130


class _Script(BaseHTTPRequestHandler):
    """A server whose answers the test chooses: 3 pieces 10 ms apart, a 429, or a stream that breaks."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["prompt"] == "full":
            self.send_response(429)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(3):
            time.sleep(0.01)
            if body["prompt"] == "broken" and i == 1:
                self.wfile.write(b'data: {"error": {"message": "graph failed"}}\n\n')
                break
            final = {"finish_reason": "length"} if i == 2 else {}
            usage = {"usage": {"completion_tokens": 4}} if i == 2 else {}
            self.wfile.write(f"data: {json.dumps({'choices': [{'text': 'ab', **final}], **usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_client_counts_what_the_server_did():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        items = [load.Item(p, 5, 4) for p in ("ok", "ok", "full", "broken")]
        work = load.Workload(items, [0.0, 0.01, 0.02, 0.03])
        records, wall = load.replay("127.0.0.1", server.server_address[1], work,
                                    lambda item: {"prompt": item.prompt}, timeout=10)
    finally:
        server.shutdown()
    ok = [r for r in records if r.ok]
    assert [r.status for r in records] == [200, 200, 429, 200] and len(ok) == 2
    assert all(len(r.arrivals) == 3 and r.output_tokens == 4 and r.finish == "length" for r in ok)
    assert "graph failed" in records[3].error
    s = load.summary(records, wall)
    assert (s["completed"], s["rejected"], s["failed"], s["output_tokens"]) == (2, 1, 1, 8)
    assert 5 <= s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"] < 5000
    assert 5 <= s["itl_ms"]["p50"] <= s["itl_ms"]["p99"]
    assert s["output_tokens_per_s"] == pytest.approx(8 / wall)


def test_pop_load_runs_every_system_and_writes_its_report(exports, tmp_path):
    artifacts = exports("tiny-llama")
    out = cli("pop-load", artifacts, "--systems", "pop,full,pop-serial", "--rates", "3,12", "--duration", "2",
              "--prompt-lens", "8,200", "--output-lens", "4,12", "--threads", "1", "--idle-prompts", "3",
              "--text", TEXT, "--json", tmp_path / "load.json", "--plot", tmp_path / "load.png", timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "load.json").read_text())
    assert list(report["systems"]) == ["pop", "full", "pop-serial"]
    for system, data in report["systems"].items():
        assert data["idle"]["completed"] == 3 and data["idle"]["output_tokens"] == 3
        assert [r["rate"] for r in data["rates"]] == [3.0, 12.0]
        for row in data["rates"]:
            # every request answered, and every requested token generated (ignore_eos)
            assert row["completed"] == row["requests"] >= 4 and row["rejected"] == row["failed"] == 0, row
            assert 4 * row["requests"] <= row["output_tokens"] <= 12 * row["requests"]
    # the same arrivals for every system
    counts = {s: [r["requests"] for r in d["rates"]] for s, d in report["systems"].items()}
    assert len({tuple(c) for c in counts.values()}) == 1
    outputs = {s: [r["output_tokens"] for r in d["rates"]] for s, d in report["systems"].items()}
    assert len({tuple(c) for c in outputs.values()}) == 1
    assert report["findings"]["pop_batching"]["rate"] == 12.0
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
    assert "TTFT p50" in out.stdout and "precision: pop float32" in out.stdout


def test_pop_load_refuses_bad_input_in_one_line(exports, tmp_path):
    artifacts = exports("tiny-llama")
    for args, fragment in ((("--systems", "pop,vllm"), "unknown system vllm"),
                           (("--systems", "llama.cpp", "--prompt-lens", "8,64"), "--gguf"),
                           (("--systems", "llama.cpp", "--prompt-lens", "8,64", "--gguf", tmp_path / "no.gguf"),
                            "no GGUF file"),
                           (("--prompt-lens", "8,600"), "max_seq_len"),
                           (("--rates", "0"), "positive")):
        out = cli("pop-load", artifacts, "--text", TEXT, *args, "--json", tmp_path / "x.json", timeout=120)
        last = out.stderr.strip().splitlines()[-1]  # argparse prints its usage first
        assert out.returncode == 2 and last.startswith("pop-load: error") and fragment in last, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "x.json").exists()
