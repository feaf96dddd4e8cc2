"""The image side of a request, for VLM artifacts: preprocessing, the vision
graph, and the extra inputs the prefill and decode graphs take.

    text + images -> placeholders expanded -> ids
    images -> pixels (numpy) -> vision graph -> image_embeds [M, H] (+ DeepStack)
    ids -> image_index (flat b*T + t of each image token), positions, token_groups

Images of all rows run through the vision graph together, in reading order,
which is also the order of their tokens in the flattened batch, so row r's
features are simply the next ones.
"""
import time

import numpy as np

from .errors import PopError
from .manifest import np_dtype
from .vision import processor_for, split_placeholders


class Multimodal:
    """Family-independent: what differs per family is in runtime/vision/<family>.py."""

    def __init__(self, spec, backend, manifest):
        self.spec, self.backend = spec, backend
        self.images = processor_for(spec)
        self.inputs = spec.merge.inputs
        self.token_id = spec.image_token_id
        embeds = manifest.graphs["decode"].input("image_embeds")
        self.hidden, self.dtype = int(embeds.shape[-1]), np_dtype(embeds.dtype)
        self.deepstack = int(spec.deepstack_layers or 0)
        self._empty = self._features(0)  # allocated once: every decode step passes it

    # --- before tokenizing -------------------------------------------------
    def prepare(self, texts, images):
        """Expanded texts, and a request state: (vision graph inputs, family state), or None
        when no row has an image.  images: one list per text."""
        if len(images) != len(texts):
            raise PopError(f"{len(images)} image lists for {len(texts)} prompts")
        if not any(images):
            for text in texts:
                split_placeholders(text, self.spec.image_token, 0)  # a placeholder with no image fails here
            return texts, None
        expanded, feeds, state = self.images.request(texts, images)
        return expanded, (feeds, state)

    # --- the vision graph ----------------------------------------------------
    def encode(self, request):
        """Runs the vision graph: {"image_embeds": [M, H], ("deepstack_embeds": [n, M, H])}, ms.
        request: (vision graph inputs, family state), from prepare() or from_pixels(); None: no images."""
        if request is None:
            return self.empty(), 0.0
        feeds, state = request
        t = time.perf_counter()
        out = self._features(self.images.image_tokens(state))
        self.backend.run("vision", {k: np.ascontiguousarray(v) for k, v in feeds.items()}, out)
        return out, (time.perf_counter() - t) * 1e3

    def from_pixels(self, pixel_values, grids=None):
        """A request state for pixels preprocessed elsewhere (HF's processor, in the exporter's
        verification), so that the vision graph itself is what is compared."""
        return self.images.from_pixels(np.ascontiguousarray(pixel_values, self.dtype), grids)

    def empty(self):
        """What a text-only window passes: M = 0."""
        return self._empty

    def _features(self, tokens):
        out = {"image_embeds": np.zeros((tokens, self.hidden), self.dtype)}
        if self.deepstack:
            out["deepstack_embeds"] = np.zeros((self.deepstack, tokens, self.hidden), self.dtype)
        return out

    # --- after tokenizing ----------------------------------------------------
    def check(self, ids, mask, encoded):
        found = int(((ids == self.token_id) & (mask == 1)).sum())
        if found != encoded["image_embeds"].shape[0]:
            raise PopError(f"the prompt holds {found} image tokens but the images give "
                           f"{encoded['image_embeds'].shape[0]}: write image placeholders only where images are passed")
        last = ids[np.arange(len(ids)), mask.sum(-1) - 1]  # each row's last real token
        if (last == self.token_id).any():
            raise PopError("a prompt ends inside an image: the last prompt token must be text")

    def positions(self, ids, mask, request):
        """[3, B, N] M-RoPE positions (Qwen3-VL), else None: the text rule applies."""
        return self.images.positions(ids, mask, request[1])[0]

    def groups(self, ids, mask):
        """[B, N] image numbers per token for bidirectional attention (Gemma-3), else None."""
        return self.images.token_groups(ids, mask)

    def feeds(self, window, encoded, groups):
        """Extra inputs of a graph run over the token window [B, T].

        A window holds all of a request's image tokens (full mode, POP's prefill)
        or none (the boundary token and decode steps), because the last prompt
        token is text; so the features pass whole or not at all.
        """
        index = np.flatnonzero(window.reshape(-1) == self.token_id).astype(np.int64)
        chosen = encoded if len(index) else self.empty()
        if len(index) != chosen["image_embeds"].shape[0]:
            raise PopError("image tokens split across graph runs")  # the invariant above, broken
        out = {"image_index": index, **chosen}
        if groups is not None:
            out["token_groups"] = groups
        return {k: out[k] for k in self.inputs}
