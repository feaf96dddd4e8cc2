"""PopSession: drive the exported graphs through one KV buffer.

    POP mode   prompt[:-1] -> prefill graph (K layers + KV heads) -> cache slots 0..N-2
               prompt[-1]  -> decode graph, full model            -> first token (TTFT)
    full mode  prompt      -> decode graph with an empty past      -> first token
                              (or its copy with integer GEMMs, "prompt", where the artifacts have one)
    then       each token  -> decode graph, one slot at a time     -> next token

A request is encoded once (`encode`: tokens, left padding, positions, and for
VLM artifacts the vision graph's features, runtime/multimodal.py) into a
`Request`, which holds everything per request; `run` is the one place that
sequences the graph calls over it.  `steps`, `generate` and `stream` are thin
wrappers, and the exporter's verification drives `run` too, so what is
verified is what serves.

Rows are right-padded and keep their own lengths: row r's token j is in slot j
of the KV buffer, and every call tells the graphs, per row, the slot of its
last real token (`seqlens_k`).  Nothing forces rows to line up, so rows of
different lengths waste no slot and no compute on padding in decode.

The session owns the buffers the graphs touch: token, position and group
buffers, the logits, the KV buffer and the staging for outputs it places,
allocated for the largest batch seen.  A step rebinds views of them and runs;
a decode step allocates nothing and copies no cache.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import BackendOptions, open_backend
from .errors import PopError
from .kv import KVBuffer, Staging
from .manifest import Manifest, np_dtype
from .multimodal import Multimodal
from .sampling import Sampler

MODES = ("pop", "full")


def check_modes(modes) -> tuple:
    modes = tuple(modes)
    if not modes:
        raise PopError(f"no mode given; use one or both of {', '.join(MODES)}")
    for mode in modes:
        if mode not in MODES:
            raise PopError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return modes


class ChatText(str):
    """A prompt rendered by the chat template, which already holds any BOS the
    model wants: it is tokenized as is, as HF's apply_chat_template does."""


@dataclass
class Request:
    """One batch of prompts, encoded: everything the graphs need, nothing the session keeps."""
    rows: list  # prompt ids per row, without padding
    ids: np.ndarray  # [B, N], right-padded: row r's token j sits in slot j
    mask: np.ndarray  # [B, N], 1 on real tokens
    positions: np.ndarray  # [B, N], or [axes, B, N] for M-RoPE (the rotary positions; text: the slot)
    images: dict | None = None  # VLMs: the vision graph's features of every image token (M = 0 without images)
    groups: np.ndarray | None = None  # [B, N] image number per token (bidirectional images), else None
    timings_ms: dict = field(default_factory=dict)  # prepare (tokenizing, image preprocessing) and vision


@dataclass
class Generation:
    prompt_ids: list  # per row, without padding
    output_ids: list  # per row, generated ids only (an eos that stopped the row included)
    text: list
    ttft_ms: float  # prompt ids in, first token out
    decode_ms_per_token: float | None  # None when only one token was generated
    finish_reasons: list = field(default_factory=list)  # "eos" | "length" | "max_seq_len"
    timings_ms: dict = field(default_factory=dict)  # vision / prefill / boundary / decode steps


class GraphIO:
    """What one graph takes and returns, from its manifest entry: which inputs are KV buffers, and for
    each present output, whether the graph writes it in place (aliased to its past input) or returns
    the new tokens' entries for the runtime to place."""

    def __init__(self, graph, manifest):
        kv = {}
        for l, names in enumerate(manifest.layer_names()):
            for kind, name in enumerate(names[:2]):
                kv[name] = (l, kind)
            for kind, name in enumerate(names[2:]):
                kv[name] = (l, kind)
        self.past = [(i.name, kv[i.name]) for i in graph.inputs if i.name in kv]
        self.aliased = [(o.name, kv[o.name]) for o in graph.outputs if o.name in kv and o.alias]
        self.placed = [(o.name, kv[o.name]) for o in graph.outputs if o.name in kv and not o.alias]
        self.logits = any(o.name == "logits" for o in graph.outputs)
        self.slots = any(i.name == "cache_slots" for i in graph.inputs)
        # a fused decode graph's sliding layers may read their past from a later slot (window_shift); with
        # windows of several widths, the widest decides what has left all of them
        windows = {layer.index: layer.sliding_window for layer in manifest.kv_cache.layers if layer.sliding_window}
        self.windowed = any(i.name == "window_seqlens_k" for i in graph.inputs)
        self.window = max(windows.values()) if self.windowed and windows else None
        self.sliding = set(windows) if self.window else set()
        first = manifest.kv_cache.layers[0]
        self.kv_heads, self.head_dim = first.kv_heads, first.head_dim

    def window_shift(self, seqlens, new):
        """Slots the sliding layers' past may skip on a call over `new` tokens per row: those before every
        row's window (row r's one new token, at slot seqlens[r], sees slots seqlens[r] - window + 1 on),
        in steps of a quarter window, so that their bindings change every window/4 decode steps, not at
        each.  0 for a prompt: its queries reach back to the first slot."""
        if self.window is None or new != 1:
            return 0
        quarter = max(1, self.window // 4)
        return max(0, int(seqlens.min()) - self.window + 1) // quarter * quarter

    def bind(self, kv, staging, ids, seqlens, total, extra, logits, shift=0, first=0):
        """(inputs, outputs, [((layer, k|v), staged array)]) for a call over ids [B, T] whose rows are KV
        rows first..first+B-1; shift: the slots the sliding layers' past skips (extra then holds their
        window_* lengths)."""
        b, t = ids.shape
        inputs = {"input_ids": ids, "seqlens_k": seqlens, "total_sequence_length": total, **extra}
        if self.slots:
            inputs["cache_slots"] = kv.slots[:int(total)]

        def past(l, kind):
            return kv.shifted(l, kind, b, shift, first) if l in self.sliding else kv.block(l, kind, b, first)
        for name, (l, kind) in self.past:
            inputs[name] = past(l, kind)
        outputs = {"logits": logits} if self.logits else {}
        for name, (l, kind) in self.aliased:
            outputs[name] = past(l, kind)
        staged = staging.views([(b, self.kv_heads, t, self.head_dim)] * len(self.placed))
        for (name, _), array in zip(self.placed, staged):
            outputs[name] = array
        return inputs, outputs, [(where, array) for (_, where), array in zip(self.placed, staged)]


WINDOW_INPUTS = {"window_seqlens_k", "window_total_sequence_length"}  # written in place, as seqlens_k is


def check_prompt_chunk(n):
    """None (the backend's choice), 0 (one call) or a number of tokens per call; else one line."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise PopError(f"--prompt-chunk takes a number of tokens (0: the whole prompt in one call), got {n!r}")


class PopSession:
    # Sliding layers read their past from the first slot any row's window reaches (GraphIO.window_shift);
    # False binds it from slot 0, which computes the same, slower at long contexts (for A/B and tests).
    window_shift = True

    def __init__(self, directory, manifest: Manifest, backend, tokenizer, modes=MODES):
        self.directory, self.manifest, self.backend, self.tokenizer = Path(directory), manifest, backend, tokenizer
        self.modes = tuple(modes)  # the prompt modes whose graphs the backend opened
        layers = manifest.kv_cache.layers
        self.num_layers = len(layers)
        self.max_seq_len = int(manifest.max_seq_len)
        self.eos_ids = set(manifest.tokenizer.eos_ids)
        self.kv_dtype = np_dtype(manifest.kv_cache.dtype)
        self.kv = KVBuffer(self.num_layers, layers[0].kv_heads, layers[0].head_dim, self.max_seq_len, self.kv_dtype,
                           zeros=backend.zeros, place=getattr(backend, "place", None))
        self.staging = Staging(self.kv_dtype, backend.zeros)
        logits = manifest.graphs["decode"].output("logits")
        self.vocab_size, self.logits_dtype = int(logits.shape[-1]), np_dtype(logits.dtype)
        self.position_axes = int(manifest.positions.axes)
        self.mm = Multimodal(manifest.vision, backend, manifest) if manifest.vision else None
        self.io = {name: GraphIO(graph, manifest) for name, graph in manifest.graphs.items() if name != "vision"}
        # full mode's prompt: a copy of the decode graph for calls of many tokens where the artifacts have one
        # (int4 exports: its products are integer GEMMs, docs/MANIFEST.md), else the decode graph
        self.full_prompt_graph = "prompt" if "prompt" in manifest.graphs else "decode"
        # Tokens per graph call in a prompt phase (None: the whole prompt in one call), the backend's choice:
        # see prompt_calls().
        self.prompt_chunk = getattr(backend, "prompt_chunk", None)
        self._batch = 0
        self._ensure(1)

    @classmethod
    def load(cls, directory, backend=None, threads=None, prepack=True, tf32=False, prompt_chunk=None, modes=MODES):
        """backend: ort (CPU), ort-cuda, trt or aoti (runtime/backends); None: the artifacts' own
        (aoti for AOTInductor packages, else ort).  prepack (ONNX Runtime on the CPU): its matrix
        products read weights re-laid out for its kernels, one copy per graph (the default: decoding a
        batch is twice as fast); False holds the weights once, as the mapped file, and is slower.
        tf32 (GPU backends, fp32 artifacts): matrix products in TF32, faster and about 1e-3 off;
        off by default, so that fp32 on a GPU gives fp32's answers.  prompt_chunk: tokens per graph call in
        a prompt phase, 0 for one call, None for the backend's choice (see prompt_calls()).  modes: the prompt
        modes this session will run; the other mode's graphs are not opened (Manifest.graphs_for), which on
        ONNX Runtime saves the weights their sessions pack: a server or a command runs one mode."""
        check_prompt_chunk(prompt_chunk)
        modes = check_modes(modes)
        directory = Path(directory)
        manifest = Manifest.load(directory)
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(str(directory / manifest.tokenizer.file))
        except Exception as e:
            raise PopError(f"{manifest.tokenizer.file} is not a readable tokenizer: {e}") from None
        options = BackendOptions(threads=threads, prepack=prepack, tf32=tf32, modes=modes)
        session = cls(directory, manifest, open_backend(backend, directory, manifest, options), tokenizer, modes)
        if prompt_chunk is not None:
            session.prompt_chunk = prompt_chunk or None
        return session

    # --- text <-> ids ------------------------------------------------------
    def encode_text(self, text: str, chat: bool = False) -> list:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        tok = self.manifest.tokenizer
        return ([tok.bos_id] if tok.add_bos and not chat else []) + ids

    def chat_prompt(self, text: str, num_images: int = 0) -> str:
        """text as one user turn in the model's chat template, image placeholders first."""
        from .chat import user_message
        return self.render_chat(user_message(text, num_images))

    def render_chat(self, messages: list) -> str:
        """A conversation ([{role, content}], content a string or HF's parts: {"type": "text", "text"} and
        {"type": "image"}) in the model's chat template, ending where the assistant's turn begins."""
        from .chat import render
        tok = self.manifest.tokenizer
        if not tok.chat_template:
            raise PopError("these artifacts have no chat template; pass the prompt as plain text")
        template = (self.directory / tok.chat_template).read_text()
        specials = {"bos_token": self.tokenizer.id_to_token(tok.bos_id) if tok.bos_id is not None else ""}
        return ChatText(render(template, messages, True, **specials))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)

    # --- buffers -----------------------------------------------------------
    def _ensure(self, batch):
        if batch > self._batch:
            s = self.max_seq_len
            self._ids = np.zeros(batch * s, np.int64)
            self._pos = np.zeros(self.position_axes * batch * s, np.int64)
            self._groups = np.zeros((batch, s), np.int64)  # image number per slot, per row
            self._seqlens = np.zeros(batch, np.int32)
            self._window_seqlens = np.zeros(batch, np.int32)
            # pinned host memory where the backend has it: the device writes the logits every step
            self._logits = getattr(self.backend, "host_zeros", np.zeros)((batch, self.vocab_size), self.logits_dtype)
            self._batch = batch
        self._total = np.zeros((), np.int32)
        self._window_total = np.zeros((), np.int32)
        self.kv.use(batch)
        self._steady = None  # the arrays above may be new: the next decode step binds afresh

    def _tokens(self, rows):
        """[batch, T] contiguous view of the token buffer holding rows."""
        view = self._ids[:rows.size].reshape(rows.shape)
        view[:] = rows
        return view

    def _positions(self, pos):
        """[axes, B, T] contiguous view of the position buffer holding pos."""
        view = self._pos[:pos.size].reshape(pos.shape)
        view[:] = pos
        return view

    def _run(self, graph, images, ids, seqlens, total, positions=None, first=0):
        """One graph call over ids [B, T] in KV rows first..first+B-1: per row, seqlens = the slot of its
        last real token after the call, total = the longest row's length after it; images: the vision
        features of the window's image tokens (VLMs; None: none).  Places what the graph returns for
        placing."""
        b, t = ids.shape
        self._seqlens[:b] = seqlens
        self._total[...] = total
        extra = {}
        if positions is not None:
            extra["position_ids"] = self._positions(positions)
        if self.mm is not None:
            extra.update(self.mm.feeds(ids, self.mm.empty() if images is None else images,
                                       self._groups[first:first + b]))
        io, shift = self.io[graph], 0
        if io.windowed:
            shift = io.window_shift(self._seqlens[:b], t) if self.window_shift else 0
            np.subtract(self._seqlens[:b], shift, out=self._window_seqlens[:b])
            self._window_total[...] = total - shift
            extra["window_seqlens_k"], extra["window_total_sequence_length"] = \
                self._window_seqlens[:b], self._window_total
        # A text model's decode steps bind the same arrays step after step (the values above are written
        # into them): the step before's inputs and outputs are passed again, the same dict objects, which
        # tells the backend that nothing needs binding (backends/ort.py).  Building them anew cost about
        # 0.2 ms of Python per step, 3-4% of a 4-bit step (benchmarks/int8-gemm/README.md).
        key = (graph, b, t, shift, first)
        text_only = not extra.keys() - WINDOW_INPUTS  # no positions or image inputs, which change each call
        if self._steady is not None and self._steady[0] == key and text_only:
            inputs, outputs = self._steady[1]
            inputs["input_ids"][...] = ids
            return outputs["logits"], self.backend.run(graph, inputs, outputs)
        logits = self._logits[:b]
        inputs, outputs, placed = io.bind(self.kv, self.staging, self._tokens(ids), self._seqlens[:b], self._total,
                                          extra, logits, shift, first)
        # steady: one token per row and nothing to place
        self._steady = (key, (inputs, outputs)) if t == 1 and text_only and not placed else None
        gpu_ms = self.backend.run(graph, inputs, outputs)
        if placed:  # a first prompt fills every row from slot 0; later calls continue each row
            start = np.zeros(b, np.int64) if total == t else self._seqlens[:b].astype(np.int64) + 1 - t
            for (layer, kv), new in placed:
                self.kv.place(layer, kv, new, start, first)
        return logits, gpu_ms

    # --- requests -----------------------------------------------------------
    def encode(self, prompts, images=None) -> Request:
        """Tokenize (text) or take (ids) one prompt or a batch of them, right-pad, derive positions,
        and for VLM artifacts run the vision graph.  images: one list of images per prompt."""
        t0 = time.perf_counter()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        state = None  # a VLM request's images, once preprocessed
        chat = [isinstance(p, ChatText) for p in prompts]
        if images is not None:
            if self.mm is None:
                raise PopError(f"these artifacts ({self.manifest.model.name}) are text-only: "
                               f"images need a vision-language model export")
            if not all(isinstance(p, str) for p in prompts):
                raise PopError("images go with text prompts (their placeholders are expanded before tokenizing)")
            prompts, state = self.mm.prepare(prompts, images)
        rows = [self.encode_text(p, c) if isinstance(p, str) else [int(t) for t in p] for p, c in zip(prompts, chat)]
        if not rows or any(len(r) == 0 for r in rows):
            raise PopError("empty prompt")
        n = max(map(len, rows))
        if n > self.max_seq_len:
            raise PopError(f"prompt has {n} tokens; these artifacts hold at most {self.max_seq_len} "
                           f"(re-export with a larger --max-seq-len)")
        bad = [t for r in rows for t in r if not 0 <= t < self.vocab_size]
        if bad:
            raise PopError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        ids = np.zeros((len(rows), n), np.int64)
        mask = np.zeros((len(rows), n), np.int64)
        for i, r in enumerate(rows):  # right padding: row i's token j sits in slot j
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        pos = np.broadcast_to(np.arange(n), ids.shape)
        if self.position_axes > 1:
            mrope = self.mm.positions(ids, mask, state) if state is not None else None
            pos = mrope if mrope is not None else np.broadcast_to(pos, (self.position_axes, *pos.shape))
        request = Request(rows, ids, mask, np.ascontiguousarray(pos))
        request.timings_ms["prepare_ms"] = (time.perf_counter() - t0) * 1e3
        if self.mm is not None:
            self.attach_images(request, *self.mm.encode(state))
        return request

    def attach_images(self, request: Request, features: dict, vision_ms=0.0):
        """The vision graph's features for a request's image tokens, checked against its ids."""
        self.mm.check(request.ids, request.mask, features)
        request.images = features
        request.groups = self.mm.groups(request.ids, request.mask)
        request.timings_ms["vision_ms"] = vision_ms

    def prompt_calls(self, tokens):
        """Where the graph calls over one row's `tokens` prompt slots begin and end: [0, tokens], or chunks
        of at most prompt_chunk tokens, of near-equal size.  On the CPU, chunks of 512 took 0.92 of one
        call's time at 2048 tokens (fp32, ONNX Runtime 1.32, whose fp32 GroupQueryAttention skips key
        blocks past the causal limit; 0.77 with that kernel turned off, whose attention scores the whole
        square and masks it: benchmarks/chunked-prompt).  The matrix products do the same work either way,
        and each call adds its fixed cost.  VLM prompts take one call: their image spans would cross
        chunks."""
        c = self.prompt_chunk
        if not c or tokens <= c or self.mm is not None:
            return [0, tokens]
        k = -(-tokens // c)
        return [round(i * tokens / k) for i in range(k + 1)]

    def _prompt_phase(self, graph, request, end, lengths, first):
        """Prompt slots 0..end-1 through `graph` (lengths: each row's real tokens among them): the logits of
        each row's last one (the decode graph's) and the GPU time (None on the CPU).  In one call for all
        rows, or, where prompt_calls() chunks, row by row (ONNX Runtime's attention continues a row's
        past with several tokens only at batch 1), each row in its own chunks."""
        ids, pos, images = request.ids, request.positions, request.images
        if len(self.prompt_calls(end)) == 2:
            return self._run(graph, images, ids[:, :end], np.minimum(lengths - 1, end - 1), end,
                             pos[..., :end] if self.position_axes > 1 else None, first)
        gpu = None
        for r in reversed(range(ids.shape[0])):  # row 0 last: each call writes its logits to row 0's place
            edges = self.prompt_calls(int(lengths[r]))
            for a, z in zip(edges, edges[1:]):
                logits, ms = self._run(graph, None, ids[r:r + 1, a:z], np.array([z - 1]), z, None, first + r)
                gpu = ms if gpu is None else gpu + (ms or 0.0)
            if self.io[graph].logits and r:
                self._logits[r] = logits[0]
        return self._logits[:ids.shape[0]], gpu

    def prompt(self, request: Request, mode="pop", first=0, stats=None, observe=None):
        """The prompt phase of a request's rows in KV rows first..first+B-1: returns the logits [B, vocab]
        of each row's first new token.  POP: tokens 0..len-2 of each row through the prefill graph, the
        last one through the decode graph (the boundary); full: the whole prompt through the decode graph.
        stats and observe as in run()."""
        self.require_mode(mode)
        observe = observe or (lambda phase, logits: None)
        stats = {} if stats is None else stats
        ids, pos = request.ids, request.positions
        b, n = ids.shape
        lengths = np.array([len(r) for r in request.rows], np.int64)
        rows = np.arange(b)
        self._ensure(first + b)
        mrope = self.position_axes > 1
        gpu = stats["gpu_ms"] = {}  # GPU backends: each graph's time on the device, from CUDA events
        if self.mm is not None:
            self._groups[first:first + b] = 0
            if request.groups is not None:
                self._groups[first:first + b, :n] = request.groups
        t1 = time.perf_counter()
        last = ids[rows, lengths - 1][:, None]  # each row's last prompt token: the boundary
        last_pos = pos[..., rows, lengths - 1][..., None] if mrope else None
        if mode == "pop" and n > 1:
            # Prompt tokens 0..len-2 of each row; a one-token row has none, and its slot 0 is written
            # again by the boundary step.
            gpu["prefill"] = self._prompt_phase("prefill", request, n - 1, np.maximum(lengths - 1, 1), first)[1]
            observe("prefill", None)
            t2 = time.perf_counter()
            stats["prefill_ms"] = (t2 - t1) * 1e3
            logits, gpu["boundary"] = self._run("decode", request.images, last, lengths - 1, n, last_pos, first)
            stats["boundary_ms"] = (time.perf_counter() - t2) * 1e3
            observe("boundary", logits)
        else:
            logits, gpu["prefill"] = self._prompt_phase(self.full_prompt_graph, request, n, lengths, first)
            stats["prefill_ms"], stats["boundary_ms"] = (time.perf_counter() - t1) * 1e3, 0.0
            gpu["boundary"] = 0.0 if gpu["prefill"] is not None else None
            observe("full", logits)
        return logits

    def require_mode(self, mode):
        """Refuses a prompt mode that is unknown or whose graphs this session did not open (load's modes)."""
        check_modes([mode])
        if mode not in self.modes:
            raise PopError(f"this session was loaded for {' and '.join(self.modes)} mode only, without the graphs "
                           f"of {mode} mode: load it with modes including {mode!r}")

    def next_positions(self, request: Request):
        """[axes, B, 1] M-RoPE position of each row's first generated token (each step adds 1), else None."""
        if self.position_axes == 1:
            return None
        return (request.positions.max(axis=(0, 2)) + 1)[None, :, None].repeat(self.position_axes, 0)

    def step(self, tokens, seqlens, positions=None):
        """One decode step over KV rows 0..B-1: tokens [B, 1] at slots seqlens [B] (each row's own length
        before the step), positions [axes, B, 1] for M-RoPE.  Returns the logits [B, vocab] (a view of the
        session's buffer, overwritten by the next call) and the GPU time.  Rows need not be related: a row
        whose request is done may take any token at any slot of its own, which nothing reads."""
        seqlens = np.asarray(seqlens, np.int64)
        return self._run("decode", None, tokens, seqlens, int(seqlens.max()) + 1, positions)

    def run(self, request: Request, max_new_tokens=64, mode="pop", sampler=None, stats=None, observe=None):
        """Yields the next token of every row, [batch], once per step: the one sequence of graph calls.

        stats (a dict), when given, receives the per-phase timings in ms.  observe(phase, logits),
        when given, is called after each prompt phase ("prefill", "boundary", "full") with the KV
        buffer as the graphs left it (the exporter's verification compares it with the reference),
        and after each decode step ("decode").
        """
        sampler = sampler or Sampler()
        observe = observe or (lambda phase, logits: None)
        t0 = time.perf_counter()
        stats = {} if stats is None else stats
        stats["prepare_ms"] = request.timings_ms.get("prepare_ms", 0.0)
        stats["vision_ms"] = request.timings_ms.get("vision_ms", 0.0)
        token = sampler(self.prompt(request, mode, 0, stats, observe))
        gpu = stats["gpu_ms"]
        # TTFT starts with the raw prompt: tokenizing and image preprocessing count
        stats["ttft_ms"] = (time.perf_counter() - t0) * 1e3 + stats["prepare_ms"] + stats["vision_ms"]
        stats["decode_ms"] = []
        gpu["decode"] = []
        stats["prompt_ids"] = request.rows
        yield token
        b, n = request.ids.shape
        seqlens = np.array([len(r) for r in request.rows], np.int64) - 1
        next_pos = self.next_positions(request)
        step_ids = np.zeros((b, 1), np.int64)
        for _ in range(min(max_new_tokens - 1, self.max_seq_len - n)):
            t = time.perf_counter()
            step_ids[:, 0] = token
            seqlens = seqlens + 1
            logits, step_gpu = self.step(step_ids, seqlens, next_pos)
            observe("decode", logits)
            token = sampler(logits)
            if next_pos is not None:
                next_pos = next_pos + 1
            stats["decode_ms"].append((time.perf_counter() - t) * 1e3)
            if step_gpu is not None:
                gpu["decode"].append(step_gpu)
            yield token

    def steps(self, prompts, max_new_tokens=64, mode="pop", sampler=None, stats=None, images=None):
        """Yields the next token of every row, [batch], once per step.

        images (VLM artifacts): one list of images (paths or PIL images) per
        prompt, whose text holds one placeholder per image.  stats (a dict),
        when given, receives the per-phase timings in ms.
        """
        yield from self.run(self.encode(prompts, images), max_new_tokens, mode, sampler, stats)

    def generate(self, prompts, max_new_tokens=64, mode="pop", sampler=None, stop_at_eos=True,
                 images=None) -> Generation:
        """Generate for one prompt (text or ids) or a batch of them; images as in steps()."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        out = [[] for _ in prompts]
        reasons = [None] * len(prompts)
        stats = {}
        for token in self.steps(prompts, max_new_tokens, mode, sampler, stats, images):
            for i, t in enumerate(token):
                if reasons[i] is None:
                    out[i].append(int(t))
                    if stop_at_eos and int(t) in self.eos_ids:
                        reasons[i] = "eos"
                    elif len(out[i]) == max_new_tokens:
                        reasons[i] = "length"
            if all(reasons):
                break
        reasons = [r or "max_seq_len" for r in reasons]
        decode = stats["decode_ms"]
        return Generation(stats["prompt_ids"], out, [self.decode(o) for o in out], stats["ttft_ms"],
                          float(np.mean(decode)) if decode else None, reasons,
                          {"vision_ms": stats["vision_ms"], "prefill_ms": stats["prefill_ms"],
                           "boundary_ms": stats["boundary_ms"], "decode_ms": decode,
                           **({"gpu_ms": stats["gpu_ms"]} if stats["gpu_ms"].get("prefill") is not None else {})})

    def stream(self, prompt, max_new_tokens=64, mode="pop", sampler=None, stop_at_eos=True, images=None):
        """Yields text pieces of one prompt's continuation as they are generated."""
        ids, shown = [], ""
        for token in self.steps(prompt, max_new_tokens, mode, sampler, images=None if images is None else [images]):
            t = int(token[0])
            if stop_at_eos and t in self.eos_ids:
                return
            ids.append(t)
            text = self.decode(ids)
            # hold back an incomplete multi-byte character until it is complete
            if not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
            if len(ids) == max_new_tokens:
                return
