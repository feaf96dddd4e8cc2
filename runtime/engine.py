"""Engine: many requests through one PopSession at once (continuous batching).

The rows of the one KV buffer, allocated at start-up for `max_batch` rows of
`max_seq_len` slots, are what requests hold.  A request waits in a bounded
queue until a row is free; then its prompt phase runs on that row alone (POP:
the shallow prefill graph and the boundary step; full mode: the decode graph
over the prompt), which gives its first token.  From the next step on it
decodes with every other running row: one call of the decode graph per step
for all of them.  A request that finishes (eos, max_tokens, the cache's end)
or is cancelled leaves at that step and its row takes the next waiting
request.  No request waits for another to finish.

Why rows need nothing more: every row keeps its own length (`seqlens_k`), so
rows of different lengths share a step without padding or copies, and a row's
slots are its own.  A step covers rows 0..n-1, n the highest running row + 1
(new requests take the lowest free row, so holes are rare and short-lived); a
free row inside that range decodes a dummy token into its own slots, which
nothing reads, at the shortest running row's length, so that it changes
neither the longest length (`total_sequence_length`) nor where sliding layers'
windows start.  Each request samples with its own Sampler (its own seed), so
its tokens do not depend on who else is running.

The engine's thread is the only one that calls the session.  `submit` checks
and tokenizes a text prompt in the caller's thread, so a bad request fails
there; images are encoded by the engine's thread (the vision graph is a graph
call).  Tokens reach the caller through its Handle: iterate it, or give
`on_event` a callback (a server hands them to its event loop).
"""
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import PopError
from .sampling import Sampler


class QueueFull(PopError):
    """The engine's queue holds max_queue waiting requests; try again later."""


class Closed(PopError):
    """The engine no longer admits requests (it is draining or closed)."""


@dataclass
class Event:
    kind: str  # "token" | "done" | "error"
    token: int | None = None
    finish_reason: str | None = None  # done: "eos" | "length" | "max_seq_len" | "cancelled"
    error: str | None = None
    at: float = 0.0  # time.perf_counter() when the engine emitted it


@dataclass
class Handle:
    """A submitted request, as its caller sees it."""
    id: int
    prompt_ids: list | None  # None until a request with images is encoded
    max_tokens: int
    on_event: object = None  # callable(Event), called from the engine's thread
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    first_token_at: float | None = None
    _events: deque = field(default_factory=deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)
    _cancelled: bool = False

    @property
    def done(self):
        return self.finish_reason is not None or self.error is not None

    def cancel(self):
        """Frees the request's row at the engine's next step (a client that went away)."""
        self._cancelled = True

    def _emit(self, event):
        event.at = time.perf_counter()
        if event.kind == "token":
            self.tokens.append(event.token)
            self.first_token_at = self.first_token_at or event.at
        elif event.kind == "done":
            self.finish_reason = event.finish_reason
        else:
            self.error = event.error
        if self.on_event is not None:
            self.on_event(event)
        with self._ready:
            self._events.append(event)
            self._ready.notify_all()

    def __iter__(self):
        """Yields the generated token ids as they come; raises PopError if the request failed."""
        while True:
            with self._ready:
                while not self._events:
                    self._ready.wait()
                event = self._events.popleft()
            if event.kind == "token":
                yield event.token
            elif event.kind == "error":
                raise PopError(event.error)
            else:
                return

    def result(self, timeout=None):
        """Waits until the request is done: (token ids, finish reason)."""
        with self._ready:
            if not self._ready.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} not done after {timeout} s")
        if self.error is not None:
            raise PopError(self.error)
        return self.tokens, self.finish_reason


@dataclass
class _Job:
    handle: Handle
    prompt: object  # text or ids
    images: list | None
    request: object  # session.Request once encoded
    sampler: Sampler
    stop_ids: set


@dataclass
class _Row:
    job: _Job
    length: int  # slots the row holds; the next token goes to this slot
    position: np.ndarray | None  # M-RoPE: [axes] position of the next token


class Engine:
    def __init__(self, session, max_batch=4, max_queue=64, mode="pop"):
        session.require_mode(mode)
        if max_batch < 1 or max_queue < 0:
            raise PopError("need max_batch >= 1 and max_queue >= 0")
        self.session, self.max_batch, self.max_queue, self.mode = session, max_batch, max_queue, mode
        session._ensure(max_batch)  # the KV buffer for every row, once, before any request
        self._waiting = deque()
        self._rows = {}  # KV row -> _Row
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._admitting, self._stop = True, False
        self._tokens = np.zeros((max_batch, 1), np.int64)
        self._lengths = np.zeros(max_batch, np.int64)
        self._positions = np.zeros((session.position_axes, max_batch, 1), np.int64)  # M-RoPE only
        self.counts = {"submitted": 0, "rejected": 0, "completed": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="pop-engine", daemon=True)
        self._thread.start()

    # --- the caller's side -------------------------------------------------
    def submit(self, prompt, max_tokens=64, sampler=None, images=None, ignore_eos=False, on_event=None) -> Handle:
        """Queue one prompt (text, or a list of token ids); images (VLM artifacts): a list of images for
        the placeholders in the text.  Raises PopError on a bad prompt, QueueFull, Closed."""
        if max_tokens < 1:
            raise PopError("max_tokens must be at least 1")
        request = None
        if images is not None and self.session.mm is None:
            raise PopError(f"these artifacts ({self.session.manifest.model.name}) are text-only: "
                           f"images need a vision-language model export")
        if images is None:  # tokenize and check here, so that a bad prompt fails in the caller's thread
            request = self.session.encode(prompt)
        handle = Handle(next(self._ids), request.rows[0] if request else None, max_tokens, on_event)
        job = _Job(handle, prompt, images, request, sampler or Sampler(),
                   set() if ignore_eos else self.session.eos_ids)
        with self._lock:
            if not self._admitting:
                raise Closed("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self.counts["submitted"] += 1
            self._waiting.append(job)
            self._lock.notify_all()
        return handle

    def snapshot(self):
        """What a metrics endpoint shows: queue depth, running rows, KV rows in use, counters."""
        with self._lock:
            return {"waiting": len(self._waiting), "running": len(self._rows), "kv_rows_in_use": len(self._rows),
                    "kv_rows": self.max_batch, **self.counts}

    def drain(self, grace_s=30.0):
        """Stops admitting; lets what runs or waits finish within grace_s, then cancels the rest.
        Returns the number of requests cancelled."""
        with self._lock:
            self._admitting = False
            self._lock.wait_for(lambda: not self._rows and not self._waiting, grace_s)
            left = [row.job.handle for row in self._rows.values()] + [job.handle for job in self._waiting]
        for handle in left:
            handle.cancel()
        with self._lock:
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._rows and not self._waiting, 10.0)
        return len(left)

    def close(self):
        with self._lock:
            self._admitting, self._stop = False, True
            self._lock.notify_all()
        self._thread.join()

    # --- the engine's thread -----------------------------------------------
    def _loop(self):
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stop or self._waiting or self._rows)
                if self._stop:
                    return
            try:
                self._admit()
                if self._rows:
                    self._step()
            except Exception as e:  # a failed graph call fails what runs, not the engine
                self._fail_running(f"{type(e).__name__}: {e}")

    def _free_row(self):
        return min(set(range(self.max_batch)) - set(self._rows))

    def _admit(self):
        """Prompt phases of waiting requests, one at a time, while rows are free."""
        while len(self._rows) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            handle = job.handle
            if handle._cancelled:
                self._finish(job, "cancelled")
                continue
            row = self._free_row()
            try:
                if job.request is None:
                    job.request = self.session.encode(job.prompt, [job.images])
                    handle.prompt_ids = job.request.rows[0]
                logits = self.session.prompt(job.request, self.mode, first=row)
            except Exception as e:  # noqa: BLE001 - this request fails, the engine goes on
                self._fail(job, str(e) if isinstance(e, PopError) else f"{type(e).__name__}: {e}")
                continue
            n = len(job.request.rows[0])
            position = self.session.next_positions(job.request)
            state = _Row(job, n, None if position is None else position[:, 0, 0].copy())
            self._rows[row] = state
            self._emit_token(row, state, int(job.sampler(logits)[0]))

    def _step(self):
        """One decode step over rows 0..n-1."""
        n = max(self._rows) + 1
        shortest = min(state.length for state in self._rows.values())
        self._lengths[:n] = shortest  # free rows: a dummy token in their own slots (see the docstring)
        self._tokens[:n] = 0
        positions = self._positions[:, :n] if self.session.position_axes > 1 else None
        for row, state in self._rows.items():
            self._tokens[row, 0] = state.job.handle.tokens[-1]
            self._lengths[row] = state.length
            if positions is not None:
                positions[:, row, 0] = state.position
        logits, _ = self.session.step(self._tokens[:n], self._lengths[:n], positions)
        for row, state in list(self._rows.items()):
            state.length += 1
            if state.position is not None:
                state.position += 1
            self._emit_token(row, state, int(state.job.sampler(logits[row:row + 1])[0]))

    def _emit_token(self, row, state, token):
        """Hands a row's new token over, and frees the row if that ends its request."""
        handle = state.job.handle
        if handle._cancelled:
            return self._release(row, "cancelled")
        handle._emit(Event("token", token))
        self.counts["tokens"] += 1
        if token in state.job.stop_ids:
            self._release(row, "eos")
        elif len(handle.tokens) >= handle.max_tokens:
            self._release(row, "length")
        elif state.length >= self.session.max_seq_len:  # no slot left for the next token
            self._release(row, "max_seq_len")

    def _release(self, row, reason):
        job = self._rows.pop(row).job
        self._finish(job, reason)

    def _finish(self, job, reason):
        self.counts["cancelled" if reason == "cancelled" else "completed"] += 1
        job.handle._emit(Event("done", finish_reason=reason))
        with self._lock:
            self._lock.notify_all()

    def _fail(self, job, message):
        self.counts["failed"] += 1
        job.handle._emit(Event("error", error=message))
        with self._lock:
            self._lock.notify_all()

    def _fail_running(self, message):
        for row in list(self._rows):
            self._fail(self._rows.pop(row).job, message)
