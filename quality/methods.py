"""The methods pop-eval compares, run eagerly through the family adapters and pop.py's layers.

A method is a few switches over the ordinary model:

* prefill_skip: layers bypassed (output = input) while the prompt is encoded.
  Each fills its cache for the prompt through its own KV head (pop.PopGraph.kv_head)
  from the hidden state it receives, which for POP at K is the output of layer
  K-1: norm, W_k/W_v, k-norm, RoPE.
* kv_projection=False: those cache entries are then hidden from attention, as
  if the layer had none for the prompt (the paper's ablation).
* boundary=False: the last prompt token is prefilled with the rest, and the
  first token comes from the shallow stack's own logits.
* decode_skip: layers bypassed for generated tokens too (ShortGPT-style).
* heads: fitted KV heads (exporter/fitted_heads.py) for the bypassed layers'
  KV heads; the attention sink keeps each layer's own matrices (pop.sink_mask).

POP at K is prefill_skip = K..L-1.  With no switch set it is the full model.
The layers are the same code the exported graphs are traced from, over any
family's adapter, VLMs included (text windows).
"""
import copy
from dataclasses import dataclass

import torch

from pop.exporter.families import adapter_for
from pop.exporter.pop import PopGraph, seq_major, sink_mask


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


@dataclass
class State:
    """A sequence under one method (batch 1): each layer's cache, seq-major as the graphs keep it,
    and how many of its slots came from the prompt's shallow prefill."""
    keys: list
    values: list
    prompt: int = 0  # slots written by the shallow prefill

    @property
    def seen(self):
        return self.keys[0].shape[0]


class Runner:
    """Runs methods on one model (batch 1), eager, in the model's dtype."""

    def __init__(self, hf_model):
        self.graph = PopGraph(adapter_for(hf_model.eval()))
        self.ad = self.graph.ad

    def _positions(self, start, length):
        pos = torch.arange(start, start + length)[None]
        return pos[None].expand(self.ad.position_axes, 1, length) if self.ad.position_axes > 1 else pos

    def empty(self) -> State:
        ad = self.ad
        blank = torch.zeros(0, 1, ad.num_kv_heads, ad.head_dim, dtype=next(self.graph.hf.parameters()).dtype)
        return State([blank] * ad.num_layers, [blank] * ad.num_layers)

    @torch.no_grad()
    def shallow(self, method: Method, ids, state: State):
        """The prompt's shallow prefill: layers in method.prefill_skip fill their cache through their KV head
        from the hidden state they receive.  Returns the shallow stack's last-position logits."""
        g, ad = self.graph, self.ad
        t = ids.shape[1]
        pos = self._positions(0, t)
        h = g.embed(ids)
        rope = g.ropes(pos, h)
        masks = g.masks(torch.ones(t, 1, dtype=torch.long), 0, t)
        empty = h.new_zeros(0, 1, ad.num_kv_heads, ad.head_dim)
        sink = sink_mask(pos).to(h.dtype)[..., None] if method.heads is not None else None
        for l in range(ad.num_layers):
            if l in method.prefill_skip:
                heads = method.heads if method.heads is not None and l >= method.heads.prefill_layers else None
                k, v = g.kv_head(l, h, rope, heads, sink if heads is not None else None)
            else:
                h, k, v = g.layer(l, h, rope, masks, empty, empty)
            state.keys[l], state.values[l] = seq_major(k), seq_major(v)
        state.prompt = t
        return ad.logits(h[:, -1])[0].float()

    @torch.no_grad()
    def decode(self, method: Method, ids, state: State):
        """The full model (less method.decode_skip) over new tokens after the state's cache; logits of each."""
        g, ad = self.graph, self.ad
        past, t = state.seen, ids.shape[1]
        h = g.embed(ids)
        rope = g.ropes(self._positions(past, t), h)
        seen = torch.ones(past + t, 1, dtype=torch.long)
        masks = g.masks(seen, past, t)
        hidden = seen.clone()
        hidden[:state.prompt] = 0  # the prompt's entries, for layers whose KV projections the method drops
        hidden_masks = g.masks(hidden, past, t)
        for l in range(ad.num_layers):
            if l in method.decode_skip:
                continue
            lm = hidden_masks if (not method.kv_projection and l in method.prefill_skip) else masks
            h, k, v = g.layer(l, h, rope, lm, state.keys[l], state.values[l])
            state.keys[l] = torch.cat([state.keys[l], seq_major(k)])
            state.values[l] = torch.cat([state.values[l], seq_major(v)])
        return ad.logits(h)[0].float()

    @torch.no_grad()
    def prefill(self, method: Method, prompt):
        """The prompt under this method: (first-token logits, state) ready for decoding."""
        ids = torch.tensor([prompt])
        n = ids.shape[1]
        shallow = n - 1 if method.boundary else n
        state = self.empty()
        logits = self.shallow(method, ids[:, :shallow], state) if shallow else None
        if method.boundary:
            logits = self.decode(method, ids[:, -1:], state)[-1]
        return logits, state

    @torch.no_grad()
    def run(self, method: Method, prompt, continuation, greedy_tokens=16) -> Outcome:
        logits, state = self.prefill(method, prompt)
        greedy_state = copy.deepcopy(state)

        cont = torch.tensor([continuation])
        nll = [torch.nn.functional.cross_entropy(logits[None], cont[:, 0]).item()]
        if cont.shape[1] > 1:
            rest = self.decode(method, cont[:, :-1], state)
            nll += torch.nn.functional.cross_entropy(rest, cont[0, 1:], reduction="none").tolist()

        greedy, token = [], int(logits.argmax())
        for i in range(greedy_tokens):
            greedy.append(token)
            if i + 1 < greedy_tokens:
                token = int(self.decode(method, torch.tensor([[token]]), greedy_state)[-1].argmax())
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
