"""PopSession: drive the two exported graphs through one KV buffer.

    POP mode   prompt[:-1] -> prefill graph (K layers + KV heads) -> cache slots 0..N-2
               prompt[-1]  -> decode graph, full model            -> first token (TTFT)
    full mode  prompt      -> decode graph with an empty past      -> first token
    then       each token  -> decode graph, one slot at a time     -> next token

VLM artifacts add a vision graph in front (runtime/multimodal.py): its
embeddings replace the image tokens' in whichever graph runs over them.

Everything the graphs touch is allocated when the batch is first seen: the
token, position and mask buffers, the logits, and the KV buffer.  A step
rebinds views of them and runs; nothing is allocated or copied per step.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import manifest as manifest_io
from .manifest import np_dtype
from .backends import open_backend
from .errors import PopError
from .kv import KVBuffer, decode_io, layer_names, prefill_io
from .multimodal import Multimodal
from .sampling import Sampler

MODES = ("pop", "full")


class ChatText(str):
    """A prompt rendered by the chat template, which already holds any BOS the
    model wants: it is tokenized as is, as HF's apply_chat_template does."""


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
    def __init__(self, directory, manifest, backend, tokenizer):
        self.directory, self.manifest, self.backend, self.tokenizer = Path(directory), manifest, backend, tokenizer
        kv = manifest["kv_cache"]
        layers = kv["layers"]
        self.num_layers = len(layers)
        self.max_seq_len = int(manifest["max_seq_len"])
        self.eos_ids = set(manifest["tokenizer"]["eos_ids"])
        self.names = layer_names(manifest)
        self.kv = KVBuffer(self.num_layers, layers[0]["kv_heads"], layers[0]["head_dim"], self.max_seq_len,
                           np_dtype(kv["dtype"]), zeros=backend.zeros)
        logits = next(o for o in manifest["graphs"]["decode"]["outputs"] if o["name"] == "logits")
        self.vocab_size, self.logits_dtype = logits["shape"][-1], np_dtype(logits["dtype"])
        self.position_axes = int(manifest.get("positions", {}).get("axes", 1))
        self.mm = Multimodal(manifest["vision"], backend, manifest) if "vision" in manifest else None
        self._batch = 0
        self._ensure(1)

    @classmethod
    def load(cls, directory, backend=None, threads=None, prepack=False):
        """backend: ort (CPU), ort-cuda, trt or aoti (runtime/backends); None: the artifacts' own
        (aoti for AOTInductor packages, else ort).  prepack=True trades a
        private copy of the weights per graph for faster matmuls (ONNX Runtime on the CPU)."""
        directory = Path(directory)
        manifest = manifest_io.load(directory)
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(str(directory / manifest["tokenizer"]["file"]))
        except Exception as e:
            raise PopError(f"{manifest['tokenizer']['file']} is not a readable tokenizer: {e}") from None
        return cls(directory, manifest, open_backend(backend, directory, manifest, threads, prepack), tokenizer)

    # --- text <-> ids ------------------------------------------------------
    def encode(self, text: str, chat: bool = False) -> list:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        tok = self.manifest["tokenizer"]
        return ([tok["bos_id"]] if tok.get("add_bos") and not chat else []) + ids

    def chat_prompt(self, text: str, num_images: int = 0) -> str:
        """text as one user turn in the model's chat template, image placeholders first."""
        from .chat import render, user_message
        tok = self.manifest["tokenizer"]
        if not tok.get("chat_template"):
            raise PopError("these artifacts have no chat template; pass the prompt as plain text")
        template = (self.directory / tok["chat_template"]).read_text()
        specials = {"bos_token": self.tokenizer.id_to_token(tok["bos_id"]) if tok.get("bos_id") is not None else ""}
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

    def _tokens(self, buf, rows, start, length):
        """[batch, length] contiguous view of buf holding rows[:, start:start+length]."""
        view = buf[:rows.shape[0] * length].reshape(rows.shape[0], length)
        view[:] = rows[:, start:start + length]
        return view

    def _positions(self, pos, start, length):
        """[B, length] (or [axes, B, length]) contiguous view holding pos[..., start:start+length]."""
        shape = pos.shape[:-1] + (length,)
        view = self._pos[:int(np.prod(shape))].reshape(shape)
        view[:] = pos[..., start:start + length]
        return view

    def _extra(self, window, end):
        """The VLM inputs of a graph run over window [B, T] ending at slot end."""
        if self.mm is None:
            return None
        groups = self._groups[:end * self._rows].reshape(end, self._rows)
        return self.mm.feeds(window, self._encoded, groups)

    def _run_prefill(self, ids, pos, length):
        extra = self._extra(ids, length)
        return self.backend.run("prefill", *prefill_io(self.kv, self.names, ids, pos, length, extra))

    def _run_decode(self, ids, pos, past, new):
        logits = self._logits[:ids.shape[0]]
        extra = self._extra(ids, past + new)
        gpu_ms = self.backend.run("decode", *decode_io(self.kv, self.names, ids, pos, past, new, logits, extra))
        return logits, gpu_ms

    # --- generation ----------------------------------------------------------
    def _prepare(self, prompts, images=None):
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        request = None  # a VLM request's images, once preprocessed
        chat = [isinstance(p, ChatText) for p in prompts]
        if images is not None:
            if self.mm is None:
                raise PopError(f"these artifacts ({self.manifest['model']['name']}) are text-only: "
                               f"images need a vision-language model export")
            if not all(isinstance(p, str) for p in prompts):
                raise PopError("images go with text prompts (their placeholders are expanded before tokenizing)")
            prompts, request = self.mm.prepare(prompts, images)
        rows = [self.encode(p, c) if isinstance(p, str) else [int(t) for t in p] for p, c in zip(prompts, chat)]
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
            mrope = self.mm.positions(ids, mask, request) if request is not None else None
            pos = mrope if mrope is not None else np.broadcast_to(pos, (self.position_axes, *pos.shape))
        return rows, ids, mask, pos, request

    def steps(self, prompts, max_new_tokens=64, mode="pop", sampler=None, stats=None, images=None):
        """Yields the next token of every row, [batch], once per step.

        images (VLM artifacts): one list of images (paths or PIL images) per
        prompt, whose text holds one placeholder per image.  stats (a dict),
        when given, receives the per-phase timings in ms.
        """
        if mode not in MODES:
            raise PopError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        sampler = sampler or Sampler()
        t0 = time.perf_counter()  # TTFT starts with the raw prompt: image preprocessing counts
        rows, ids, mask, pos, request = self._prepare(prompts, images)
        b, n = ids.shape
        self._ensure(b)
        self._rows = b
        self.kv.mask[:n] = mask.T
        stats = {} if stats is None else stats
        gpu = stats["gpu_ms"] = {}  # GPU backends: each graph's time on the device, from CUDA events
        stats["prepare_ms"] = (time.perf_counter() - t0) * 1e3  # tokenizing; for images also loading and resizing
        stats["vision_ms"] = 0.0
        if self.mm is not None:
            self._encoded, stats["vision_ms"] = self.mm.encode(request)
            self.mm.check(ids, mask, self._encoded)
            groups = self.mm.groups(ids, mask)
            slots = self._groups[:self.max_seq_len * b].reshape(self.max_seq_len, b)
            slots[:] = 0
            if groups is not None:
                slots[:n] = groups.T
        t1 = time.perf_counter()
        if mode == "pop" and n > 1:
            gpu["prefill"] = self._run_prefill(self._tokens(self._ids, ids, 0, n - 1),
                                               self._positions(pos, 0, n - 1), n - 1)
            t2 = time.perf_counter()
            stats["prefill_ms"] = (t2 - t1) * 1e3
            logits, gpu["boundary"] = self._run_decode(self._tokens(self._ids, ids, n - 1, 1),
                                                       self._positions(pos, n - 1, 1), n - 1, 1)
            stats["boundary_ms"] = (time.perf_counter() - t2) * 1e3
        else:
            logits, gpu["prefill"] = self._run_decode(self._tokens(self._ids, ids, 0, n), self._positions(pos, 0, n), 0, n)
            stats["prefill_ms"], stats["boundary_ms"] = (time.perf_counter() - t1) * 1e3, 0.0
            gpu["boundary"] = 0.0 if gpu["prefill"] is not None else None
        token = sampler(logits)
        stats["ttft_ms"] = (time.perf_counter() - t0) * 1e3
        stats["decode_ms"] = []
        gpu["decode"] = []
        stats["prompt_ids"] = rows
        yield token
        next_pos = pos[..., -1].max(axis=0) + 1 if pos.ndim == 3 else pos[:, -1] + 1
        step_ids = self._ids[:b].reshape(b, 1)
        step_pos = self._pos[:pos.shape[0] * b if pos.ndim == 3 else b].reshape(*pos.shape[:-2], b, 1)
        for slot in range(n, min(n + max_new_tokens - 1, self.max_seq_len)):
            t = time.perf_counter()
            step_ids[:, 0] = token
            step_pos[..., 0] = next_pos
            self.kv.mask[slot] = 1
            logits, step_gpu = self._run_decode(step_ids, step_pos, slot, 1)
            token = sampler(logits)
            next_pos += 1
            stats["decode_ms"].append((time.perf_counter() - t) * 1e3)
            if step_gpu is not None:
                gpu["decode"].append(step_gpu)
            yield token

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
