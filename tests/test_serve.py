"""pop-serve as a client meets it: a real server process on 127.0.0.1, real sockets, OpenAI's API.

Answers equal pop-generate's for the same request, streamed or not; concurrent requests each equal
their own run; a client that goes away frees its row; a full queue refuses cleanly and the server
goes on; malformed requests get JSON errors; SIGTERM lets running requests finish and exits 0."""
import base64
import json
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, cli, generate_json
from pop.bench.servers import ServerProcess


class Server(ServerProcess):
    """pop-serve on a free port of 127.0.0.1, one thread."""

    def __init__(self, directory, *flags):
        super().__init__("pop-serve", [BIN / "pop-serve", directory, "--port", "{port}", "--threads", "1", *flags],
                         start_timeout=120)

    def stream(self, path, body):
        """(response, connection) of a streamed request; events() reads it."""
        c = self.connection()
        c.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        return r, c

    def metrics(self):
        text = self.get("/metrics")[1]
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#")}


def events(response):
    """The JSON events of a server-sent stream, up to [DONE]."""
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[6:])


@pytest.fixture(scope="module")
def tiny(exports):
    """A tiny VLM (it has a chat template, M-RoPE and images) on 3 rows."""
    server = Server(exports("tiny-qwen3-vl"), "--max-batch", 3)
    yield server, exports("tiny-qwen3-vl")
    server.stop()


def test_completions_equal_pop_generate(tiny):
    server, directory = tiny
    want = json.loads(cli("pop-generate", directory, "--prompt", "The garden was", "--max-new-tokens", 12,
                          "--ignore-eos", "--json").stdout)
    body = {"prompt": "The garden was", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    status, out, _ = server.post("/v1/completions", body)
    assert status == 200, out
    assert out["choices"][0]["text"] == want["text"] and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(want["prompt_ids"]), "completion_tokens": 12,
                            "total_tokens": len(want["prompt_ids"]) + 12}
    response, _ = server.stream("/v1/completions", body)
    chunks = list(events(response))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12
    # token ids in, as OpenAI's API allows
    ids = generate_json(directory, [5, 6, 7, 8], 6, extra=("--ignore-eos",))
    status, out, _ = server.post("/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0,
                                                     "ignore_eos": True})
    assert out["choices"][0]["text"] == ids["text"] and out["usage"]["prompt_tokens"] == 4


def test_chat_streamed_and_whole_equal_pop_generate_chat(tiny):
    server, directory = tiny
    want = json.loads(cli("pop-generate", directory, "--prompt", "Hello there", "--chat", "--max-new-tokens", 10,
                          "--ignore-eos", "--json").stdout)
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    status, out, _ = server.post("/v1/chat/completions", body)
    assert status == 200 and out["object"] == "chat.completion", out
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want["text"]}
    response, _ = server.stream("/v1/chat/completions", body)
    chunks = list(events(response))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want["text"]
    # the same conversation with parts instead of a string renders the same prompt
    parts = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]}
    assert server.post("/v1/chat/completions", parts)[1]["choices"][0]["message"]["content"] == want["text"]


def test_chat_with_an_image_equals_pop_generate(tiny, tmp_path):
    server, directory = tiny
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 72, 3), dtype=np.uint8)).save(picture)
    want = json.loads(cli("pop-generate", directory, "--image", picture, "--prompt", "What is it?",
                          "--max-new-tokens", 8, "--ignore-eos", "--json").stdout)
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    status, out, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                          "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == want["text"]
    assert out["usage"]["prompt_tokens"] == len(want["prompt_ids"])
    broken = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    status, out, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": broken}]})
    assert status == 400 and "no readable image" in out["error"]["message"]


def test_stop_strings_and_seeded_sampling(tiny):
    server, directory = tiny
    base = {"prompt": "Once upon", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    full = server.post("/v1/completions", base)[1]["choices"][0]["text"]
    stop = full[3:5]  # two characters from inside the continuation
    out = server.post("/v1/completions", {**base, "stop": [stop]})[1]
    assert out["choices"][0]["text"] == full[:full.index(stop)] and out["choices"][0]["finish_reason"] == "stop"
    streamed = list(events(server.stream("/v1/completions", {**base, "stop": stop})[0]))
    assert "".join(c["choices"][0]["text"] for c in streamed) == full[:full.index(stop)]
    seeded = {**base, "temperature": 0.9, "top_k": 40, "seed": 7}
    want = json.loads(cli("pop-generate", directory, "--prompt", "Once upon", "--max-new-tokens", 16,
                          "--temperature", 0.9, "--top-k", 40, "--seed", 7, "--ignore-eos", "--json").stdout)
    assert server.post("/v1/completions", seeded)[1]["choices"][0]["text"] == want["text"]


def test_concurrent_requests_each_equal_their_own_run(tiny):
    server, directory = tiny
    prompts = [[5 + i, 9, 11 + 2 * i, 7] * (1 + i) for i in range(6)]
    want = [generate_json(directory, p, 8 + i, extra=("--ignore-eos",))["text"] for i, p in enumerate(prompts)]
    got = [None] * len(prompts)

    def one(i):
        time.sleep(0.01 * i)  # staggered arrivals onto 3 rows
        got[i] = server.post("/v1/completions", {"prompt": prompts[i], "max_tokens": 8 + i, "temperature": 0,
                                                 "ignore_eos": True})[1]["choices"][0]["text"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert got == want


@pytest.mark.parametrize("body,status,fragment", [
    ('{"prompt": "x", "max_tokens": "lots"}', 400, "max_tokens"),
    ('{"prompt": "x", ', 400, "malformed JSON"),
    ('["x"]', 400, "valid dictionary"),
    ('{"max_tokens": 3}', 400, "prompt"),
    ('{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ('{"prompt": "x", "n": 2}', 400, "n:"),
    ('{"prompt": "x", "model": "another-model"}', 404, "not served here"),
    ('{"prompt": [1, 2, 99999999]}', 400, "outside the vocabulary"),
])
def test_malformed_requests_get_openai_errors(tiny, body, status, fragment):
    server, _ = tiny
    got, out, _ = server.post("/v1/completions", body)
    assert got == status and fragment in out["error"]["message"], out
    assert set(out["error"]) == {"message", "type", "param", "code"}


def test_too_long_prompt_and_bad_chat(tiny):
    server, directory = tiny
    limit = json.loads((directory / "pop_manifest.json").read_text())["max_seq_len"]
    status, out, _ = server.post("/v1/completions", {"prompt": [5] * (limit + 3)})
    assert status == 400 and f"{limit + 3} tokens" in out["error"]["message"] and str(limit) in out["error"]["message"]
    status, out, _ = server.post("/v1/chat/completions", {"messages": []})
    assert status == 400 and "messages" in out["error"]["message"]
    image = {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}
    status, out, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [image]}]})
    assert status == 400 and "data: URL" in out["error"]["message"]
    assert server.get("/v1/models")[1].count('"id"') == 1 and server.get("/nowhere")[0] == 404
    assert server.get("/health")[0] == 200  # still serving


@pytest.fixture(scope="module")
def slow(exports):
    """A real model on one row, slow enough (tens of ms per token) to hold a request while others arrive."""
    server = Server(exports("smollm2-135m"), "--max-batch", 1, "--max-queue", 1, "--grace", 30)
    yield server
    server.stop()


@pytest.mark.slow
def test_disconnect_frees_the_row_and_full_queue_refuses(slow):
    server = slow
    long = {"prompt": "The", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    response, connection = server.stream("/v1/completions", long)
    stream = events(response)
    next(stream), next(stream)  # it runs: the one row is held
    waiting = threading.Thread(target=lambda: server.post("/v1/completions", {**long, "max_tokens": 3}))
    waiting.start()
    deadline = time.time() + 30
    while server.metrics()["pop_queue_depth"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    status, out, headers = server.post("/v1/completions", {**long, "max_tokens": 3})
    assert status == 429 and out["error"]["code"] == "queue_full" and headers.get("retry-after") == "1"
    assert server.metrics()["pop_requests_rejected_total"] == 1
    response.close(), connection.close()  # the client goes away mid-stream
    waiting.join(60)
    assert not waiting.is_alive()  # the waiting request got the freed row and finished
    deadline = time.time() + 30
    while time.time() < deadline and json.loads(server.get("/health")[1])["cancelled"] < 1:
        time.sleep(0.05)
    health = json.loads(server.get("/health")[1])
    assert health["cancelled"] == 1 and health["running"] == 0 and health["kv_rows_in_use"] == 0
    status, out, _ = server.post("/v1/completions", {**long, "max_tokens": 2})
    assert status == 200 and out["usage"]["completion_tokens"] == 2  # and it goes on serving


@pytest.mark.slow
def test_sigterm_lets_running_requests_finish_and_exits_0(exports):
    server = Server(exports("smollm2-135m"), "--max-batch", 2, "--grace", 60)
    try:
        response, _ = server.stream("/v1/completions", {"prompt": "The", "max_tokens": 40, "temperature": 0,
                                                        "ignore_eos": True})
        stream = events(response)
        first = next(stream)
        server.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        pieces = [first, *rest]
        assert pieces[-1]["choices"][0]["finish_reason"] == "length"
        assert pieces[-1]["usage"]["completion_tokens"] == 40
        assert server.proc.wait(60) == 0
        with pytest.raises(OSError):
            server.get("/health")
    finally:
        server.stop()
