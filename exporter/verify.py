"""Run the exported graphs in ONNX Runtime at fresh shapes and compare them with
the eager PyTorch reference (reference.py, which runs HF's own modules).

Shapes differ from the trace sample on purpose: batch 3, left-padded rows of
three lengths, and a prompt longer than any sliding window, so that a shape
frozen at trace time, a wrong mask or a wrong window shows up here.
"""
import numpy as np
import torch

from pop.runtime.backends.ort import OrtBackend
from pop.runtime.kv import KVBuffer, decode_io, layer_names, prefill_io

from . import reference

# Max abs difference allowed per dtype, relative to the scale of what is compared
# (max |reference value|, at least 1): float rounding grows with magnitude, and
# real models carry keys and logits in the tens or hundreds.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def verify_lengths(sliding_window, max_seq_len):
    n = 37 if not sliding_window else sliding_window + 5
    n = max(4, min(n, max_seq_len - 1))
    return [n, n - 3, max(2, n // 2)]  # three rows, left-padded to n


def _inputs(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
    return ids, mask


def _max_diff(a, b, mask=None):
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if mask is not None:
        d = d[mask]
    return float(d.max()) if d.size else 0.0


def _scale(b, mask=None):
    b = np.abs(b.astype(np.float64))
    if mask is not None:
        b = b[mask]
    return float(b.max()) if b.size else 0.0


def _compare_cache(kv, ref_cache, end, real, report, what):
    """Max abs difference and reference scale over slots < end, real tokens only."""
    diff, scale = 0.0, 0.0
    for l, (k_ref, v_ref) in enumerate(reference.cache_tensors(ref_cache)):
        stored = k_ref.shape[0]  # HF keeps only a sliding layer's window
        sel = real[end - stored:end]
        for i, r in enumerate((k_ref, v_ref)):
            r = r.float().numpy()
            diff = max(diff, _max_diff(kv.cache[l, i, end - stored:end], r, sel))
            scale = max(scale, _scale(r, sel))
    report[f"{what}_max_abs"], report[f"{what}_scale"] = diff, scale


def _compare_logits(logits, ref, report, what):
    report[f"{what}_max_abs"] = _max_diff(logits, ref)
    report[f"{what}_scale"] = max(1.0, _scale(ref))
    report[f"{what}_argmax_equal"] = bool((logits.argmax(-1) == ref.argmax(-1)).all())


def verify(hf_model, adapter, keep, directory, manifest, dtype_name, threads=None, progress=print):
    """Returns a report of max abs differences; the caller acts on report["passed"].

    The graphs are driven through the runtime's own bindings (pop.runtime.kv),
    so what is verified is what PopSession runs.  Argmax agreement is reported
    but not required: random prompts can leave two logits closer than the
    tolerance, and then either order is correct.
    """
    backend = OrtBackend(directory, manifest, threads)
    windows = [adapter.sliding_window(l) for l in range(adapter.num_layers)]
    window = max((w for w in windows if w), default=None)
    lengths = verify_lengths(window, manifest["max_seq_len"])
    ids, mask = _inputs(adapter.cfg.vocab_size, lengths)
    b, n = ids.shape
    pos = reference.positions(mask)
    ids_np, pos_np = ids.numpy(), pos.numpy()
    real = np.ascontiguousarray(mask.numpy().T).astype(bool)  # [slot, batch]; padded slots are don't-care
    names = layer_names(manifest)
    logits_spec = next(o for o in manifest["graphs"]["decode"]["outputs"] if o["name"] == "logits")
    logits = np.zeros((b, adapter.cfg.vocab_size), np.dtype(logits_spec["dtype"]))

    def fresh_kv():
        kv = KVBuffer(adapter.num_layers, adapter.num_kv_heads, adapter.head_dim, n, manifest["kv_cache"]["dtype"], b)
        kv.mask[:] = real
        return kv
    report = {"batch": b, "prompt_lengths": lengths, "tolerance": TOLERANCE[dtype_name]}

    progress(f"verify: prefill graph, batch {b}, prompt lengths {lengths}")
    kv = fresh_kv()
    backend.run("prefill", *prefill_io(kv, names, np.ascontiguousarray(ids_np[:, :-1]),
                                       np.ascontiguousarray(pos_np[:, :-1]), n - 1))
    ref_cache = reference.prefill(hf_model, ids[:, :-1], mask[:, :-1], keep)
    _compare_cache(kv, ref_cache, n - 1, real, report, "prefill_kv")

    progress("verify: decode graph at the boundary (past from the prefill graph)")
    backend.run("decode", *decode_io(kv, names, np.ascontiguousarray(ids_np[:, -1:]),
                                     np.ascontiguousarray(pos_np[:, -1:]), n - 1, 1, logits))
    _compare_logits(logits, reference.step(hf_model, ids[:, -1:], mask, ref_cache).numpy(), report, "boundary_logits")

    progress("verify: decode graph over the whole prompt with an empty past (full mode)")
    kv = fresh_kv()
    backend.run("decode", *decode_io(kv, names, ids_np, pos_np, 0, n, logits))
    with torch.no_grad():
        hf_out = hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    _compare_logits(logits, hf_out.logits[:, -1].float().numpy(), report, "full_logits")
    _compare_cache(kv, hf_out.past_key_values, n, real, report, "full_kv")

    tol = report["tolerance"]
    report["passed"] = all(report[f"{what}_max_abs"] <= tol * max(1.0, report[f"{what}_scale"])
                           for what in ("prefill_kv", "boundary_logits", "full_logits", "full_kv"))
    return report
