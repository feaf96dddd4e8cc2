"""Load: what a server does under traffic.  A seeded Poisson arrival process of completion requests,
prompts cut from real text, replayed against any OpenAI-compatible server; per request the client
records when it was sent, when each streamed piece came, and how it ended.

The workload is fixed by its seed and the rate, so every system in a run sees the same prompts at the
same offsets.  Each request runs in its own thread on a plain HTTP/1.1 connection (http.client): the
client does nothing but wait on sockets, so it takes almost no CPU from the server it measures.
"""
import http.client
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Item:
    prompt: str
    prompt_tokens: int  # as the artifacts' tokenizer counts them (the server adds BOS where the model needs it)
    max_tokens: int


@dataclass
class Workload:
    items: list  # Item, in arrival order
    offsets: list  # seconds after the start at which each item is sent

    @property
    def span(self):
        return self.offsets[-1] if self.offsets else 0.0


def text_pool(folder):
    """Every text file of the evaluation corpus, concatenated in name order (whitespace kept)."""
    files = sorted(p for p in Path(folder).glob("*.txt") if "LICENSE" not in p.name.upper()
                   and p.name.lower() not in ("licenses.txt",))
    if not files:
        raise FileNotFoundError(f"no .txt files in {folder}")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def prompts(encode, decode, text, count, lengths, outputs, seed):
    """`count` Items: prompt lengths log-uniform in `lengths` (tokens, inclusive), output lengths uniform in
    `outputs`, each prompt a window of the text starting at a random token (encode: text -> ids, decode:
    ids -> text, the artifacts' tokenizer)."""
    rng = np.random.default_rng(seed)
    ids = encode(text)
    lo, hi = lengths
    if len(ids) < hi + 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the longest prompt ({hi})")
    items = []
    for _ in range(count):
        n = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        start = int(rng.integers(0, len(ids) - n))
        prompt = decode(ids[start:start + n])
        items.append(Item(prompt, n, int(rng.integers(outputs[0], outputs[1] + 1))))
    return items


def poisson(items, rate, duration, seed):
    """Arrivals at `rate` per second for `duration` seconds (at least 4 requests), drawing items in order."""
    rng = np.random.default_rng(seed)
    offsets, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t > duration and len(offsets) >= 4:
            break
        offsets.append(t)
    if len(offsets) > len(items):
        raise ValueError(f"{len(offsets)} arrivals need as many prompts; the workload has {len(items)}")
    return Workload(items[:len(offsets)], offsets)


@dataclass
class Record:
    sent: float  # perf_counter
    prompt_tokens: int
    max_tokens: int
    status: int = 0  # HTTP status; 0 when the connection failed
    arrivals: list = field(default_factory=list)  # perf_counter of each streamed piece with text
    finished_at: float | None = None  # perf_counter of the piece with the finish reason
    output_tokens: int | None = None  # from the final usage, when the server reports it
    finish: str | None = None
    error: str | None = None
    ended: float = 0.0

    @property
    def ok(self):
        return self.status == 200 and self.error is None and self.finish is not None

    @property
    def first(self):
        """When the first token showed: its text, or the end when no token had text of its own (a lone
        special or partial-UTF-8 token)."""
        return self.arrivals[0] if self.arrivals else self.finished_at


def request(host, port, body, record, timeout):
    """One streamed completion; fills `record` (never raises)."""
    record.sent = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        record.status = response.status
        if response.status != 200:
            record.error = response.read().decode(errors="replace")[:300]
            return
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                record.error = str(chunk["error"])[:300]
                break
            for choice in chunk.get("choices", ()):
                if choice.get("text"):
                    record.arrivals.append(time.perf_counter())
                if choice.get("finish_reason"):
                    record.finish, record.finished_at = choice["finish_reason"], time.perf_counter()
            if chunk.get("usage"):
                record.output_tokens = chunk["usage"].get("completion_tokens")
    except (OSError, http.client.HTTPException, ValueError) as e:
        record.error = f"{type(e).__name__}: {e}"
    finally:
        record.ended = time.perf_counter()
        conn.close()


def replay(host, port, workload, body_for, timeout=600.0, progress=None):
    """Sends every item at its offset (each in its own thread), waits for all; returns the Records and the
    wall time from the first send to the last end."""
    records = [Record(0.0, item.prompt_tokens, item.max_tokens) for item in workload.items]
    threads = []
    start = time.perf_counter()
    for item, offset, record in zip(workload.items, workload.offsets, records):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=request, args=(host, port, body_for(item), record, timeout), daemon=True)
        thread.start()
        threads.append(thread)
        if progress:
            progress(len(threads), len(records))
    for thread in threads:
        thread.join(timeout + 5)
    first = min((r.sent for r in records), default=start)
    last = max((r.ended for r in records), default=start)
    return records, last - first


def summary(records, wall_s):
    """Per-rate figures: TTFT and inter-token percentiles (ms), completed requests and output tokens per second
    of wall time, rejections (HTTP 429/503) and other failures."""
    done = [r for r in records if r.ok]
    ttft = [1e3 * (r.first - r.sent) for r in done]
    itl = [1e3 * (b - a) for r in done for a, b in zip(r.arrivals, r.arrivals[1:])]
    # a streamed piece may hold more than one token (text held back until it decodes cleanly); the server's
    # usage counts tokens when it reports one
    tokens = sum(r.output_tokens if r.output_tokens is not None else len(r.arrivals) for r in done)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {
        "requests": len(records), "completed": len(done),
        "rejected": sum(r.status in (429, 503) for r in records),
        "failed": sum(not r.ok and r.status not in (429, 503) for r in records),
        "wall_s": wall_s,
        "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
        "requests_per_s": len(done) / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "output_tokens": tokens,
        "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in records])) if records else None,
        "errors": sorted({r.error for r in records if r.error and r.status not in (429, 503)})[:3],
    }
