"""Fidelity of a method against the full model, over text windows."""
import math

import torch


def compare(full, method) -> dict:
    """Per-window metrics of one method's Outcome against the full model's."""
    log_p = torch.log_softmax(full.first_logits, -1)
    log_q = torch.log_softmax(method.first_logits, -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0))
    prefix = 0
    for a, b in zip(full.greedy, method.greedy):
        if a != b:
            break
        prefix += 1
    return {"top1_agree": float(full.first_logits.argmax() == method.first_logits.argmax()), "kl": kl,
            "nll": list(method.continuation_nll), "exact_match": float(prefix == len(full.greedy)),
            "common_prefix": prefix}


def summarize(rows) -> dict:
    """Means over windows; perplexity over every continuation token."""
    nll = [x for r in rows for x in r["nll"]]
    return {"windows": len(rows), "top1_agreement": sum(r["top1_agree"] for r in rows) / len(rows),
            "kl_full_to_method": sum(r["kl"] for r in rows) / len(rows),
            "perplexity": math.exp(sum(nll) / len(nll)),
            "greedy_exact_match": sum(r["exact_match"] for r in rows) / len(rows),
            "greedy_common_prefix": sum(r["common_prefix"] for r in rows) / len(rows)}


COLUMNS = [("top1_agreement", "top-1 agree", "{:.3f}"), ("kl_full_to_method", "KL(full‖m)", "{:.4f}"),
           ("perplexity", "PPL", "{:.2f}"), ("greedy_exact_match", "greedy exact", "{:.3f}"),
           ("greedy_common_prefix", "common prefix", "{:.2f}")]


def markdown(results, title) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in results:
        lines.append(f"| {r['method']} | " + " | ".join(f.format(r[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
