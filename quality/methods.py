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
from pop.exporter.pop import PopGraph, sink_mask


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
    """A sequence under one method (batch 1): each layer's K/V buffer [1, kv_heads, max_len, head_dim],
    how many slots it holds, and how many of them came from the prompt's shallow prefill."""
    keys: list
    values: list
    seen: int = 0
    prompt: int = 0

    def entries(self, layer):
        """(K, V) of the filled slots, [slots, 1, kv_heads, head_dim] (the reference's cache_tensors layout)."""
        return tuple(t[:, :, :self.seen].permute(2, 0, 1, 3) for t in (self.keys[layer], self.values[layer]))


class Runner:
    """Runs methods on one model (batch 1), eager, in the model's dtype, over the same layers the plain
    graphs are traced from (exporter/pop.py)."""

    def __init__(self, hf_model, max_len=1024):
        self.graph = PopGraph(adapter_for(hf_model.eval()), "plain", max_len)
        self.ad = self.graph.ad
        self.max_len = max_len

    def empty(self) -> State:
        ad = self.ad
        dtype = next(self.graph.hf.parameters()).dtype
        buffers = [torch.zeros(2, 1, ad.num_kv_heads, self.max_len, ad.head_dim, dtype=dtype)
                   for _ in range(ad.num_layers)]
        return State([b[0] for b in buffers], [b[1] for b in buffers])

    def _step(self, state, t, with_past):
        n = state.seen + t
        positions = None
        if self.ad.position_axes > 1:  # text: M-RoPE's three axes advance together
            positions = torch.arange(state.seen, n)[None, None].expand(self.ad.position_axes, 1, t)
        return self.graph.step(torch.tensor([n - 1], dtype=torch.int32), torch.tensor(n, dtype=torch.int32), t,
                               positions, {}, with_past, torch.arange(n))

    def _place(self, state, presents, t):
        for l, (k, v) in presents.items():
            state.keys[l][:, :, state.seen:state.seen + t] = k
            state.values[l][:, :, state.seen:state.seen + t] = v
        state.seen += t

    @torch.no_grad()
    def shallow(self, method: Method, ids, state: State):
        """The prompt's shallow prefill: layers in method.prefill_skip fill their cache through their KV head
        from the hidden state they receive.  Returns the shallow stack's last-position logits."""
        g = self.graph
        t = ids.shape[1]
        step = self._step(state, t, False)
        h = g.embed(ids)
        sink = sink_mask(step.positions).to(h.dtype)[..., None] if method.heads is not None else None
        heads = method.heads
        if heads is not None:  # fitted heads apply to the layers they were fitted for
            kv_only = [l for l in method.prefill_skip if l >= heads.prefill_layers]
            assert kv_only == list(method.prefill_skip), "fitted heads for another K"
        _, x, presents = g.layers(h, step, [(None, None)] * self.ad.num_layers, kv_only=method.prefill_skip,
                                  heads=heads, sink=sink)
        self._place(state, presents, t)
        state.prompt = t
        return self.ad.lm_head(x[:, -1])[0].float()

    @torch.no_grad()
    def decode(self, method: Method, ids, state: State):
        """The full model (less method.decode_skip) over new tokens after the state's cache; logits of each."""
        g = self.graph
        t = ids.shape[1]
        step = self._step(state, t, True)
        if not method.kv_projection:  # the prompt's entries of the pruned layers are unseen
            step.hide = (tuple(method.prefill_skip), state.prompt)
        pasts = list(zip(state.keys, state.values))
        _, x, presents = g.layers(g.embed(ids), step, pasts, bypass=method.decode_skip)
        self._place(state, presents, t)
        return self.ad.lm_head(x)[0].float()

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
