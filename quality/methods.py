"""The methods pop-eval compares, run on HF's own modules in eager PyTorch.

A method is a few switches over the ordinary model:

* prefill_skip: layers bypassed (output = input) while the prompt is encoded.
  A bypassed layer still runs its attention on the hidden state it receives,
  which is the input of the bypassed block, so HF writes exactly the
  independent KV projection into its cache: norm, W_k/W_v, k-norm, RoPE.
* kv_projection=False: those cache entries are then hidden from attention, as
  if the layer had none for the prompt (the paper's ablation).
* boundary=False: the last prompt token is prefilled with the rest, and the
  first token comes from the shallow stack's own logits.
* decode_skip: layers bypassed for generated tokens too (ShortGPT-style).
* heads: fitted KV heads (exporter/fitted_heads.py): while the prompt is
  encoded, the bypassed layers' K/V matrices are swapped for the fitted ones,
  so their cache entries are the fitted projections.

POP at K is prefill_skip = K..L-1.  With no switch set it is the full model.
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class Method:
    name: str
    prefill_skip: tuple = ()
    kv_projection: bool = True
    boundary: bool = True
    decode_skip: tuple = ()
    prefill_layers: int | None = None  # K, where the method has one, for plots
    kind: str = "ablation"  # "full" | "pop" | "pop-fitted" | "ablation": how reports group and plot it
    heads: object = None  # FittedHeads for prefill_skip, or None for the layers' own K/V matrices


def standard_methods(num_layers, ks, default_k, fitted=None, original=True):
    """full, POP at each K (with the layers' own KV heads and/or the fitted ones, {K: FittedHeads}),
    and the paper's Table 3 ablations at the default K."""
    pruned = tuple(range(default_k, num_layers))
    first = tuple(range(len(pruned)))
    fitted = fitted or {}
    return [
        Method("full", prefill_layers=num_layers, kind="full"),
        *[Method(f"POP K={k}", tuple(range(k, num_layers)), prefill_layers=k, kind="pop")
          for k in sorted(set(ks), reverse=True) if original],
        *[Method(f"POP K={k}, fitted heads", tuple(range(k, num_layers)), prefill_layers=k, kind="pop-fitted",
                 heads=fitted[k]) for k in sorted(fitted, reverse=True)],
        Method(f"ShortGPT-style: drop {default_k}..{num_layers - 1} in every stage", pruned, decode_skip=pruned,
               prefill_layers=default_k),
        Method(f"POP K={default_k} without KV projections", pruned, kv_projection=False, prefill_layers=default_k),
        Method(f"POP K={default_k} without boundary handling", pruned, boundary=False, prefill_layers=default_k),
        Method(f"prune the first third (0..{len(first) - 1}) in prefill", first, prefill_layers=default_k),
    ]


@dataclass
class Outcome:
    first_logits: torch.Tensor  # [vocab], float32: the distribution of the first generated token
    continuation_nll: list  # teacher-forced NLL of each continuation token
    greedy: list  # greedily generated ids


def _hidden_in(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class HFRunner:
    """Runs methods on one HF causal LM (batch 1)."""

    def __init__(self, hf_model):
        self.hf = hf_model.eval()
        # eager attention receives an explicit additive mask per layer, which the
        # "without KV projections" ablation edits
        self.hf.set_attn_implementation("eager")
        self.layers = self.hf.model.layers

    @contextmanager
    def _bypassed(self, layers):
        def identity(module, args, kwargs, out):
            h = _hidden_in(args, kwargs)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles = [self.layers[l].register_forward_hook(identity, with_kwargs=True) for l in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _hidden_prompt(self, layers, prompt_len, state):
        """Mask, in these layers, the cache entries of the first prompt_len positions."""
        def hide(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            t = kwargs["hidden_states"].shape[1]
            columns = mask.shape[-1]
            first = state["seen"] + t - columns  # absolute position of column 0 (sliding layers keep a tail)
            hidden = max(0, min(columns, prompt_len - first))
            if hidden:
                mask = mask.clone()
                mask[..., :hidden] = torch.finfo(mask.dtype).min
                kwargs["attention_mask"] = mask
            return args, kwargs
        handles = [self.layers[l].self_attn.register_forward_pre_hook(hide, with_kwargs=True) for l in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _fitted(self, heads):
        """The fitted K/V matrices in place of the pruned layers' own, for the shallow prefill, which starts at
        position 0.  Position 0 keeps the layer's own matrix: the fit never saw it (fitted_heads.collect)."""
        def swap(fit):
            def hook(module, args, out):
                fitted = torch.nn.functional.linear(args[0], fit.weight, fit.bias)
                return torch.cat([out[:, :1], fitted[:, 1:]], 1)
            return hook
        handles = []
        for l in range(heads.keep, len(self.layers)) if heads is not None else ():
            attn = self.layers[l].self_attn
            for kind, own in (("key", attn.k_proj), ("value", attn.v_proj)):
                fit = heads.proj(kind, l)
                if fit is not None:
                    handles.append(own.register_forward_hook(swap(fit)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward(self, ids, cache, state):
        t = ids.shape[1]
        pos = torch.arange(state["seen"], state["seen"] + t)[None]
        out = self.hf(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        state["seen"] += t
        return out.logits[0].float()

    def _decode(self, method, ids, cache, state):
        hidden = method.prefill_skip if not method.kv_projection else ()
        with self._bypassed(method.decode_skip), self._hidden_prompt(hidden, state["prompt"], state):
            return self._forward(ids, cache, state)

    @torch.no_grad()
    def prefill(self, method: Method, prompt):
        """The prompt under this method: (first-token logits, cache, state) ready for decoding."""
        ids = torch.tensor([prompt])
        n = ids.shape[1]
        shallow = n - 1 if method.boundary else n
        cache = DynamicCache(config=self.hf.config)
        state = {"seen": 0, "prompt": shallow}
        logits = None
        if shallow:
            with self._bypassed(method.prefill_skip), self._fitted(method.heads):
                logits = self._forward(ids[:, :shallow], cache, state)[-1]
        if method.boundary:
            logits = self._decode(method, ids[:, -1:], cache, state)[-1]
        return logits, cache, state

    @torch.no_grad()
    def run(self, method: Method, prompt, continuation, greedy_tokens=16) -> Outcome:
        logits, cache, state = self.prefill(method, prompt)
        greedy_cache, greedy_state = copy.deepcopy(cache), dict(state)

        cont = torch.tensor([continuation])
        nll = [torch.nn.functional.cross_entropy(logits[None], cont[:, 0]).item()]
        if cont.shape[1] > 1:
            rest = self._decode(method, cont[:, :-1], cache, state)
            nll += torch.nn.functional.cross_entropy(rest, cont[0, 1:], reduction="none").tolist()

        greedy, token = [], int(logits.argmax())
        for i in range(greedy_tokens):
            greedy.append(token)
            if i + 1 < greedy_tokens:
                token = int(self._decode(method, torch.tensor([[token]]), greedy_cache, greedy_state)[-1].argmax())
        return Outcome(logits, nll, greedy)


class RuntimeRunner:
    """The exported graphs through pop's runtime, in "pop" or "full" mode."""

    def __init__(self, session):
        self.session = session

    def _steps(self, prompt, mode, n, choose):
        recorded = []

        def sampler(logits):
            recorded.append(torch.from_numpy(logits[0].astype("float32").copy()))
            return [choose(len(recorded) - 1, recorded[-1])]
        for _ in self.session.steps(prompt, n, mode, sampler):
            pass
        return recorded

    def run(self, mode, prompt, continuation, greedy_tokens=16) -> Outcome:
        forced = self._steps(prompt, mode, len(continuation), lambda i, logits: continuation[i])
        nll = [torch.nn.functional.cross_entropy(l[None], torch.tensor([t])).item()
               for l, t in zip(forced, continuation)]
        greedy = [int(l.argmax()) for l in self._steps(prompt, mode, greedy_tokens, lambda i, l: int(l.argmax()))]
        return Outcome(forced[0], nll, greedy)
