"""Run the exported graphs in ONNX Runtime at fresh shapes and compare them with
the eager PyTorch reference (reference.py, which runs HF's own modules).

Shapes differ from the trace sample on purpose: batch 3, left-padded rows of
three lengths, and a prompt longer than any sliding window, so that a shape
frozen at trace time, a wrong mask or a wrong window shows up here.
"""
import numpy as np
import torch

from pop.runtime.backends.ort import OrtBackend

from . import reference

# Max abs difference allowed per dtype, relative to the scale of what is compared
# (max |reference value|, at least 1): float rounding grows with magnitude, and
# real models carry keys and logits in the tens or hundreds.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
BATCH = 3


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


def _kv_names(manifest):
    return [(l["past_key"], l["past_value"], l["present_key"], l["present_value"])
            for l in manifest["kv_cache"]["layers"]]


def verify(hf_model, adapter, keep, directory, manifest, dtype_name, threads=None, progress=print):
    """Returns a report of max abs differences; the caller acts on report["passed"].

    Argmax agreement is reported but not required: random prompts can leave two
    logits closer than the tolerance, and then either order is correct.
    """
    backend = OrtBackend(directory, manifest, threads)
    np_dtype = np.float32 if dtype_name == "float32" else np.dtype(manifest["kv_cache"]["dtype"])
    windows = [adapter.sliding_window(l) for l in range(adapter.num_layers)]
    window = max((w for w in windows if w), default=None)
    lengths = verify_lengths(window, manifest["max_seq_len"])
    ids, mask = _inputs(adapter.cfg.vocab_size, lengths)
    b, n = ids.shape
    pos = reference.positions(mask)
    names = _kv_names(manifest)
    shape = (n, b, adapter.num_kv_heads, adapter.head_dim)
    report = {"batch": b, "prompt_lengths": lengths, "tolerance": TOLERANCE[dtype_name]}

    # 1. prefill graph vs reference POP prefill, over prompt[:-1]
    progress(f"verify: prefill graph, batch {b}, prompt lengths {lengths}")
    cache = np.zeros((adapter.num_layers, 2) + shape, np_dtype)
    outputs = {}
    for l, (_, _, pk, pv) in enumerate(names):
        outputs[pk], outputs[pv] = cache[l, 0, :n - 1], cache[l, 1, :n - 1]
    ids_np, pos_np, mask_np = ids.numpy(), pos.numpy(), np.ascontiguousarray(mask.numpy().T)
    backend.run("prefill", {"input_ids": np.ascontiguousarray(ids_np[:, :-1]),
                            "position_ids": np.ascontiguousarray(pos_np[:, :-1]),
                            "attention_mask": np.ascontiguousarray(mask_np[:-1])}, outputs)
    ref_cache = reference.prefill(hf_model, ids[:, :-1], mask[:, :-1], keep)
    real = mask_np[:-1].astype(bool)  # [n-1, b]: padded slots hold don't-care values
    kv_diff, kv_scale = 0.0, 0.0
    for l, (k_ref, v_ref) in enumerate(reference.cache_tensors(ref_cache)):
        stored = k_ref.shape[0]  # HF keeps only a sliding layer's window
        sel = real[-stored:]
        for i, r in enumerate((k_ref, v_ref)):
            r = r.float().numpy()
            kv_diff = max(kv_diff, _max_diff(cache[l, i, n - 1 - stored:n - 1], r, sel))
            kv_scale = max(kv_scale, _scale(r, sel))
    report["prefill_kv_max_abs"], report["prefill_kv_scale"] = kv_diff, kv_scale

    # 2. decode graph at the boundary: past = the graph's own prefill, one new token
    progress("verify: decode graph at the boundary (past from the prefill graph)")
    logits = np.zeros((b, adapter.cfg.vocab_size), np.float32 if dtype_name == "float32" else np_dtype)
    inputs = {"input_ids": np.ascontiguousarray(ids_np[:, -1:]), "position_ids": np.ascontiguousarray(pos_np[:, -1:]),
              "attention_mask": mask_np}
    outputs = {"logits": logits}
    for l, (k, v, pk, pv) in enumerate(names):
        inputs[k], inputs[v] = cache[l, 0, :n - 1], cache[l, 1, :n - 1]
        outputs[pk], outputs[pv] = cache[l, 0, n - 1:n], cache[l, 1, n - 1:n]
    backend.run("decode", inputs, outputs)
    ref_logits = reference.step(hf_model, ids[:, -1:], mask, ref_cache).numpy()
    scale = max(1.0, float(np.abs(ref_logits).max()))
    report["boundary_logits_max_abs"] = _max_diff(logits, ref_logits)
    report["boundary_logits_scale"] = scale
    report["boundary_argmax_equal"] = bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())

    # 3. decode graph as the full model: empty past, all n tokens (full mode)
    progress("verify: decode graph over the whole prompt with an empty past (full mode)")
    full = np.zeros((adapter.num_layers, 2) + shape, np_dtype)
    inputs = {"input_ids": ids_np, "position_ids": pos_np, "attention_mask": mask_np}
    outputs = {"logits": logits}
    for l, (k, v, pk, pv) in enumerate(names):
        inputs[k], inputs[v] = full[l, 0, :0], full[l, 1, :0]
        outputs[pk], outputs[pv] = full[l, 0], full[l, 1]
    backend.run("decode", inputs, outputs)
    with torch.no_grad():
        hf_out = hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    ref_full = hf_out.logits[:, -1].float().numpy()
    report["full_logits_max_abs"] = _max_diff(logits, ref_full)
    report["full_argmax_equal"] = bool((logits.argmax(-1) == ref_full.argmax(-1)).all())
    full_kv, full_scale = 0.0, 0.0
    for l, (k_ref, v_ref) in enumerate(reference.cache_tensors(hf_out.past_key_values)):
        stored = k_ref.shape[0]
        sel = mask_np[-stored:].astype(bool)
        for i, r in enumerate((k_ref, v_ref)):
            r = r.float().numpy()
            full_kv = max(full_kv, _max_diff(full[l, i, n - stored:], r, sel))
            full_scale = max(full_scale, _scale(r, sel))
    report["full_kv_max_abs"], report["full_kv_scale"] = full_kv, full_scale
    report["full_logits_scale"] = max(1.0, _scale(ref_full))

    tol = report["tolerance"]
    report["passed"] = all(report[f"{what}_max_abs"] <= tol * max(1.0, report[f"{what}_scale"])
                           for what in ("prefill_kv", "boundary_logits", "full_logits", "full_kv"))
    return report
