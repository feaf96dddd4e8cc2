"""The continuous-batching engine (runtime/engine.py) on real ONNX Runtime sessions: requests that arrive
while others decode, join and leave at any step, and each one's tokens equal its run alone."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pop.runtime.engine import Closed, Engine, QueueFull
from pop.runtime.errors import PopError
from pop.runtime.sampling import Sampler
from pop.runtime.session import PopSession


def _prompts(vocab, count, seed=0):
    """Prompts of mixed lengths (3 to 40 tokens: beyond tiny-gemma3's sliding window of 8)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(n)).tolist() for n in rng.integers(3, 41, count)]


def _alone(session, prompt, max_tokens, mode, seed=None):
    sampler = Sampler(0.8, 20, 0.95, seed) if seed is not None else None
    return session.generate(prompt, max_tokens, mode, sampler, stop_at_eos=False).output_ids[0]


@pytest.mark.parametrize("model,mode", [("tiny-llama", "pop"), ("tiny-gemma3", "pop"), ("tiny-gemma3", "full"),
                                        ("tiny-qwen3-vl", "pop")])
def test_staggered_requests_equal_their_runs_alone(model, mode, exports):
    """Nine requests, three rows: they arrive while others decode, wait, take freed rows (the lowest
    first, leaving holes that decode dummy tokens) and finish at different steps.  Greedy and seeded
    sampling both give each request what it gives alone."""
    directory = exports(model)
    alone = PopSession.load(directory, threads=1)
    prompts = _prompts(alone.vocab_size, 9)
    lengths = [5 + 7 * (i % 4) for i in range(9)]
    seeds = [None if i % 3 else 100 + i for i in range(9)]
    want = [_alone(alone, p, n, mode, s) for p, n, s in zip(prompts, lengths, seeds)]
    engine = Engine(PopSession.load(directory, threads=1), max_batch=3, max_queue=16, mode=mode)
    try:
        handles = []
        for i, (p, n, s) in enumerate(zip(prompts, lengths, seeds)):
            sampler = Sampler(0.8, 20, 0.95, s) if s is not None else None
            handles.append(engine.submit(p, n, sampler, ignore_eos=True))
            time.sleep(0.002 * (i % 3))  # some arrive together, some while others decode
        got = [h.result(timeout=60) for h in handles]
    finally:
        engine.close()
    assert [g[0] for g in got] == want
    assert all(g[1] == "length" for g in got)
    snap = engine.snapshot()
    assert snap["completed"] == 9 and snap["running"] == 0 and snap["waiting"] == 0


def test_images_and_text_requests_share_steps(exports):
    """A VLM request with an image decodes beside text-only ones; each equals its run alone."""
    directory = exports("tiny-gemma3-vl")
    alone = PopSession.load(directory, threads=1)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    with_image = alone.chat_prompt("What is this?", 1)
    texts = [alone.chat_prompt("Tell me a story."), alone.chat_prompt("Count to ten.")]
    want_image = alone.generate(with_image, 10, images=[[image]], stop_at_eos=False).output_ids[0]
    want_texts = [alone.generate(t, 12, stop_at_eos=False).output_ids[0] for t in texts]
    engine = Engine(PopSession.load(directory, threads=1), max_batch=2)
    try:
        first = engine.submit(texts[0], 12, ignore_eos=True)
        second = engine.submit(with_image, 10, images=[image], ignore_eos=True)
        third = engine.submit(texts[1], 12, ignore_eos=True)
        assert second.result(60)[0] == want_image
        assert [first.result(60)[0], third.result(60)[0]] == want_texts
    finally:
        engine.close()


def test_eos_cancel_errors_and_limits(exports):
    directory = exports("tiny-llama")
    session = PopSession.load(directory, threads=1)
    engine = Engine(session, max_batch=1, max_queue=1)
    try:
        # one row: a long request holds it, one more waits, the next is refused; nothing is lost
        long = engine.submit([5, 6, 7], 400, ignore_eos=True)
        next(iter(long))  # it holds the row (its first token is out)
        waiting = engine.submit([8, 9], 3, ignore_eos=True)
        with pytest.raises(QueueFull, match="queue is full"):
            engine.submit([10, 11], 3)
        assert engine.snapshot()["rejected"] == 1
        long.cancel()  # what a client that went away does: the row is free at the next step
        assert long.result(30)[1] == "cancelled" and len(long.tokens) < 400
        assert waiting.result(30) == (_alone(session, [8, 9], 3, "pop"), "length")
        # a bad prompt fails in the caller's thread; the engine goes on
        with pytest.raises(PopError, match="outside the vocabulary"):
            engine.submit([10 ** 9], 3)
        with pytest.raises(PopError, match="at most"):
            engine.submit([5] * (session.max_seq_len + 1), 3)
        with pytest.raises(PopError, match="text-only"):
            engine.submit("hi", 3, images=[Image.new("RGB", (8, 8))])
        # a prompt that fills the cache gets one token and stops there
        full = engine.submit([5] * session.max_seq_len, 10, ignore_eos=True)
        assert full.result(30) == (full.tokens, "max_seq_len") and len(full.tokens) == 1
        # eos stops a request unless it is ignored
        eos = next(iter(session.eos_ids))
        stops = engine.submit([5, 6, eos], 50)  # whatever it generates, eos or 50 tokens end it
        tokens, reason = stops.result(30)
        assert (reason == "eos") == (eos in tokens) and (reason == "eos" or len(tokens) == 50)
    finally:
        assert engine.drain(grace_s=5) == 0
        with pytest.raises(Closed):
            engine.submit([5, 6], 3)
        engine.close()


def test_drain_cancels_what_outlives_the_grace(exports):
    engine = Engine(PopSession.load(exports("tiny-llama"), threads=1), max_batch=1, max_queue=4)
    long = engine.submit([5, 6, 7], 100000, ignore_eos=True)  # runs to the cache's end unless cancelled
    queued = engine.submit([5, 6], 3)
    seen = threading.Event()
    threading.Thread(target=lambda: (next(iter(long)), seen.set()), daemon=True).start()
    assert seen.wait(30)
    cancelled = engine.drain(grace_s=0.0)
    engine.close()
    assert cancelled >= 1 and long.finish_reason in ("cancelled", "max_seq_len")
    assert queued.done  # finished or cancelled, never left waiting
