"""PopSession: drive the exported graphs through one KV buffer.

    POP mode   prompt[:-1] -> prefill graph (K layers + KV heads) -> cache slots 0..N-2
               prompt[-1]  -> decode graph, full model            -> first token (TTFT)
    full mode  prompt      -> decode graph with an empty past      -> first token
    then       each token  -> decode graph, one slot at a time     -> next token

A request is encoded once (`encode`: tokens, left padding, positions, and for
VLM artifacts the vision graph's features, runtime/multimodal.py) into a
`Request`, which holds everything per request; `run` is the one place that
sequences the graph calls over it.  `steps`, `generate` and `stream` are thin
wrappers, and the exporter's verification drives `run` too, so what is
verified is what serves.

The session owns the buffers the graphs touch: token, position and group
buffers, the logits, and the KV buffer, allocated for the largest batch seen.
A step rebinds views of them and runs; nothing is allocated or copied per step.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import open_backend
from .errors import PopError
from .kv import KVBuffer, decode_io, prefill_io
from .manifest import Manifest, np_dtype
from .multimodal import Multimodal
from .sampling import Sampler

MODES = ("pop", "full")


class ChatText(str):
    """A prompt rendered by the chat template, which already holds any BOS the
    model wants: it is tokenized as is, as HF's apply_chat_template does."""


@dataclass
class Request:
    """One batch of prompts, encoded: everything the graphs need, nothing the session keeps."""
    rows: list  # prompt ids per row, without padding
    ids: np.ndarray  # [B, N], left-padded: every row's last prompt token sits in slot N-1
    mask: np.ndarray  # [B, N], 1 on real tokens
    positions: np.ndarray  # [B, N], or [axes, B, N] for M-RoPE
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


class PopSession:
    def __init__(self, directory, manifest: Manifest, backend, tokenizer):
        self.directory, self.manifest, self.backend, self.tokenizer = Path(directory), manifest, backend, tokenizer
        layers = manifest.kv_cache.layers
        self.num_layers = len(layers)
        self.max_seq_len = int(manifest.max_seq_len)
        self.eos_ids = set(manifest.tokenizer.eos_ids)
        self.names = manifest.layer_names()
        self.kv = KVBuffer(self.num_layers, layers[0].kv_heads, layers[0].head_dim, self.max_seq_len,
                           np_dtype(manifest.kv_cache.dtype), zeros=backend.zeros)
        logits = manifest.graphs["decode"].output("logits")
        self.vocab_size, self.logits_dtype = int(logits.shape[-1]), np_dtype(logits.dtype)
        self.position_axes = int(manifest.positions.axes)
        self.mm = Multimodal(manifest.vision, backend, manifest) if manifest.vision else None
        self._batch = 0
        self._ensure(1)

    @classmethod
    def load(cls, directory, backend=None, threads=None, prepack=False):
        """backend: ort (CPU), ort-cuda, trt or aoti (runtime/backends); None: the artifacts' own
        (aoti for AOTInductor packages, else ort).  prepack=True trades a
        private copy of the weights per graph for faster matmuls (ONNX Runtime on the CPU)."""
        directory = Path(directory)
        manifest = Manifest.load(directory)
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(str(directory / manifest.tokenizer.file))
        except Exception as e:
            raise PopError(f"{manifest.tokenizer.file} is not a readable tokenizer: {e}") from None
        return cls(directory, manifest, open_backend(backend, directory, manifest, threads, prepack), tokenizer)

    # --- text <-> ids ------------------------------------------------------
    def encode_text(self, text: str, chat: bool = False) -> list:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        tok = self.manifest.tokenizer
        return ([tok.bos_id] if tok.add_bos and not chat else []) + ids

    def chat_prompt(self, text: str, num_images: int = 0) -> str:
        """text as one user turn in the model's chat template, image placeholders first."""
        from .chat import render, user_message
        tok = self.manifest.tokenizer
        if not tok.chat_template:
            raise PopError("these artifacts have no chat template; pass the prompt as plain text")
        template = (self.directory / tok.chat_template).read_text()
        specials = {"bos_token": self.tokenizer.id_to_token(tok.bos_id) if tok.bos_id is not None else ""}
        return ChatText(render(template, user_message(text, num_images), True, **specials))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)

    # --- buffers -----------------------------------------------------------
    def _ensure(self, batch):
        if batch > self._batch:
            s = self.max_seq_len
            self._ids = np.zeros(batch * s, np.int64)
            self._pos = np.zeros(self.position_axes * batch * s, np.int64)
            self._groups = np.zeros(batch * s, np.int64)
            self._logits = np.zeros((batch, self.vocab_size), self.logits_dtype)
            self._batch = batch
        self.kv.use(batch)

    def _tokens(self, rows, start, length):
        """[batch, length] contiguous view of the token buffer holding rows[:, start:start+length]."""
        view = self._ids[:rows.shape[0] * length].reshape(rows.shape[0], length)
        view[:] = rows[:, start:start + length]
        return view

    def _positions(self, pos, start, length):
        """[B, length] (or [axes, B, length]) contiguous view holding pos[..., start:start+length]."""
        shape = pos.shape[:-1] + (length,)
        view = self._pos[:int(np.prod(shape))].reshape(shape)
        view[:] = pos[..., start:start + length]
        return view

    def _extra(self, request, window, end):
        """The VLM inputs of a graph run over window [B, T] ending at slot end."""
        if self.mm is None:
            return None
        b = window.shape[0]
        groups = self._groups[:end * b].reshape(end, b)
        return self.mm.feeds(window, request.images, groups)

    def _run_prefill(self, request, ids, pos, length):
        extra = self._extra(request, ids, length)
        return self.backend.run("prefill", *prefill_io(self.kv, self.names, ids, pos, length, extra))

    def _run_decode(self, request, ids, pos, past, new):
        logits = self._logits[:ids.shape[0]]
        extra = self._extra(request, ids, past + new)
        gpu_ms = self.backend.run("decode", *decode_io(self.kv, self.names, ids, pos, past, new, logits, extra))
        return logits, gpu_ms

    # --- requests -----------------------------------------------------------
    def encode(self, prompts, images=None) -> Request:
        """Tokenize (text) or take (ids) one prompt or a batch of them, left-pad, derive positions,
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
        for i, r in enumerate(rows):  # left padding: every row's last prompt token sits in slot n-1
            ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
        pos = np.where(mask == 1, mask.cumsum(-1) - 1, 1)  # as HF derives positions for padded rows
        if self.position_axes > 1:
            mrope = self.mm.positions(ids, mask, state) if state is not None else None
            pos = mrope if mrope is not None else np.broadcast_to(pos, (self.position_axes, *pos.shape))
        request = Request(rows, ids, mask, pos)
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

    def run(self, request: Request, max_new_tokens=64, mode="pop", sampler=None, stats=None, observe=None):
        """Yields the next token of every row, [batch], once per step: the one sequence of graph calls.

        stats (a dict), when given, receives the per-phase timings in ms.  observe(phase, logits),
        when given, is called after each prompt phase ("prefill", "boundary", "full") with the KV
        buffer as the graphs left it (the exporter's verification compares it with the reference).
        """
        if mode not in MODES:
            raise PopError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        sampler = sampler or Sampler()
        observe = observe or (lambda phase, logits: None)
        t0 = time.perf_counter()
        ids, pos = request.ids, request.positions
        b, n = ids.shape
        self._ensure(b)
        self.kv.mask[:n] = request.mask.T
        stats = {} if stats is None else stats
        gpu = stats["gpu_ms"] = {}  # GPU backends: each graph's time on the device, from CUDA events
        stats["prepare_ms"] = request.timings_ms.get("prepare_ms", 0.0)
        stats["vision_ms"] = request.timings_ms.get("vision_ms", 0.0)
        if self.mm is not None:
            slots = self._groups[:self.max_seq_len * b].reshape(self.max_seq_len, b)
            slots[:] = 0
            if request.groups is not None:
                slots[:n] = request.groups.T
        t1 = time.perf_counter()
        if mode == "pop" and n > 1:
            gpu["prefill"] = self._run_prefill(request, self._tokens(ids, 0, n - 1), self._positions(pos, 0, n - 1),
                                               n - 1)
            observe("prefill", None)
            t2 = time.perf_counter()
            stats["prefill_ms"] = (t2 - t1) * 1e3
            logits, gpu["boundary"] = self._run_decode(request, self._tokens(ids, n - 1, 1),
                                                       self._positions(pos, n - 1, 1), n - 1, 1)
            stats["boundary_ms"] = (time.perf_counter() - t2) * 1e3
            observe("boundary", logits)
        else:
            logits, gpu["prefill"] = self._run_decode(request, self._tokens(ids, 0, n), self._positions(pos, 0, n),
                                                      0, n)
            stats["prefill_ms"], stats["boundary_ms"] = (time.perf_counter() - t1) * 1e3, 0.0
            gpu["boundary"] = 0.0 if gpu["prefill"] is not None else None
            observe("full", logits)
        token = sampler(logits)
        # TTFT starts with the raw prompt: tokenizing and image preprocessing count
        stats["ttft_ms"] = (time.perf_counter() - t0) * 1e3 + stats["prepare_ms"] + stats["vision_ms"]
        stats["decode_ms"] = []
        gpu["decode"] = []
        stats["prompt_ids"] = request.rows
        yield token
        next_pos = pos[..., -1].max(axis=0) + 1 if pos.ndim == 3 else pos[:, -1] + 1
        step_ids = self._ids[:b].reshape(b, 1)
        step_pos = self._pos[:pos.shape[0] * b if pos.ndim == 3 else b].reshape(*pos.shape[:-2], b, 1)
        for slot in range(n, min(n + max_new_tokens - 1, self.max_seq_len)):
            t = time.perf_counter()
            step_ids[:, 0] = token
            step_pos[..., 0] = next_pos
            self.kv.mask[slot] = 1
            logits, step_gpu = self._run_decode(request, step_ids, step_pos, slot, 1)
            token = sampler(logits)
            next_pos += 1
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
