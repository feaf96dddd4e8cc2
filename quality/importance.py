"""Stage importance with the paper's virtual gates (POP, arXiv 2602.03295, Sec. 3).

A scalar gate g_l scales both residual branches of layer l.  Prompt positions
0..N-2 (prefill) and positions N-1.. (decode, the boundary token first) have
separate gates.  With targets sampled from the model itself, the loss is the
cross-entropy over the decode positions, and I_l = E[(dLoss/dg_l)^2] at g = 1
(the Fisher approximation of the second-order Taylor term).  One
forward-backward pass per sample gives both vectors.

The forward is pop.py's layer, written once over the family adapters.
"""
import torch

from pop.exporter.pop import PopGraph

RULE = ("recommended K = the smallest K whose pruned layers K..L-1 together hold at most "
        "{budget:.0%} of the total prefill importance")


def recommend(prefill, budget=0.05):
    """Smallest K with sum(prefill[K:]) <= budget * sum(prefill); L when nothing qualifies."""
    total = float(sum(prefill))
    for k in range(1, len(prefill) + 1):
        if float(sum(prefill[k:])) <= budget * total:
            return k
    return len(prefill)


def gated_loss(graph, ids, prompt_len, g_prefill, g_decode):
    """Cross-entropy of ids[prompt_len:] predicted from decode positions prompt_len-1.., gates applied."""
    ad = graph.ad
    b, t = ids.shape
    positions = None
    if ad.position_axes > 1:  # M-RoPE: text advances every axis alike
        positions = torch.arange(t)[None, None].expand(ad.position_axes, b, t)
    step = graph.step(torch.full((b,), t - 1, dtype=torch.int32), torch.tensor(t, dtype=torch.int32), t, positions,
                      {}, False)
    decode_pos = (torch.arange(t) >= prompt_len - 1)[None, :, None]
    gates = [torch.where(decode_pos, g_decode[l], g_prefill[l]) for l in range(ad.num_layers)]
    _, x, _ = graph.layers(graph.embed(ids), step, [(None, None)] * ad.num_layers, gates=gates)
    logits = ad.lm_head(x[:, prompt_len - 1:t - 1]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, prompt_len:].reshape(-1))


def stage_importance(hf_model, adapter, prompts, new_tokens=32, seed=0, progress=None):
    """(prefill importance [L], decode importance [L]) averaged over the prompts."""
    graph = PopGraph(adapter, "plain", max(len(p) for p in prompts) + new_tokens).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    n_layers = adapter.num_layers
    pre, dec = torch.zeros(n_layers, dtype=torch.float64), torch.zeros(n_layers, dtype=torch.float64)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        torch.manual_seed(seed + i)
        with torch.no_grad():  # targets sampled from the model itself
            sampled = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                        top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        pad_token_id=0)  # batch 1: never used for padding
        g_pre = torch.ones(n_layers, requires_grad=True)
        g_dec = torch.ones(n_layers, requires_grad=True)
        loss = gated_loss(graph, sampled, ids.shape[1], g_pre, g_dec)
        d_pre, d_dec = torch.autograd.grad(loss, (g_pre, g_dec))
        pre += d_pre.double() ** 2
        dec += d_dec.double() ** 2
        if progress:
            progress(i + 1)
    return (pre / len(prompts)).tolist(), (dec / len(prompts)).tolist()
