"""Run the exported graphs through the runtime's own step sequence at fresh shapes, and compare
them with the eager PyTorch reference (reference.py, which runs HF's own modules).

Shapes differ from the trace sample on purpose: batch 3, left-padded rows of
three lengths, and a prompt longer than any sliding window, so that a shape
frozen at trace time, a wrong mask or a wrong window shows up here.  VLMs get
prompts with images of different sizes (two in the first row), built by the
model's own HF processor; the vision graph gets HF's pixels, so that the graph
itself is what is compared.

The graphs run through PopSession.run, the sequence every user runs: POP mode
(prefill, then the boundary step) and full mode (the decode graph over the
whole prompt).  What the KV buffer holds after each phase is compared with
the reference's cache.
"""
import numpy as np
import torch

from pop.runtime.manifest import Check, Verification
from pop.runtime.session import PopSession, Request

from . import reference

# Max abs difference allowed per dtype, relative to the scale of what is compared
# (max |reference value|, at least 1): float rounding grows with magnitude, and
# real models carry keys and logits in the tens or hundreds.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def verify_lengths(sliding_window, max_seq_len):
    n = 37 if not sliding_window else sliding_window + 5
    n = max(4, min(n, max_seq_len - 1))
    return [n, n - 3, max(2, n // 2)]  # three rows, left-padded to n


def _text_prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
    return ids, mask


def _check(ours, ref, mask=None, floor=0.0, argmax=False):
    """Max abs difference and reference scale (over mask, where given)."""
    d = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    r = np.abs(ref.astype(np.float64))
    if mask is not None:
        d, r = d[mask], r[mask]
    return Check(float(d.max()) if d.size else 0.0, max(floor, float(r.max()) if r.size else 0.0),
                 bool((ours.argmax(-1) == ref.argmax(-1)).all()) if argmax else None)


def _cache_check(kv, ref_cache, lengths):
    """Every layer's cached K/V of each row's `lengths[b]` tokens, against HF's (left-padded) cache.
    Row b's token j is our slot j and HF's slot width - lengths[b] + j; HF keeps only a sliding layer's
    window, its last `stored` slots."""
    diff, scale = 0.0, 0.0
    cache = kv.cache
    if isinstance(cache, torch.Tensor):  # AOTInductor packages for CUDA keep the buffer on the device
        cache = cache.detach().float().cpu().numpy()
    for l, (k_ref, v_ref) in enumerate(reference.cache_tensors(ref_cache)):  # [slot, batch, heads, dim]
        stored = k_ref.shape[0]
        for i, r in enumerate((k_ref, v_ref)):
            r = r.float().numpy()
            for b, n in enumerate(lengths):
                first = max(0, n - stored)  # the earliest of this row's tokens HF still holds
                ours = cache[l, i, b, :, first:n].transpose(1, 0, 2)  # [tokens, heads, dim]
                theirs = r[stored - n + first:stored, b]
                c = _check(ours, theirs)
                diff, scale = max(diff, c.max_abs), max(scale, c.scale)
    return Check(diff, scale)


def _image_request(job, session, manifest, report):
    """(Request, HF's processor output, HF's image inputs for a forward over tokens [:end])."""
    from PIL import Image
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
              for sizes in (((70, 45), (40, 96)), ((64, 64),))]
    texts = [session.chat_prompt("Look at these and compare the two pictures.", 2),
             session.chat_prompt("One more to describe", 1)]
    inputs = job.loaded.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt",
                                  add_special_tokens=False)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    hf_images = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    pos, images_until = reference.image_inputs(job.hf, inputs)
    grids = hf_images["image_grid_thw"].numpy() if "image_grid_thw" in hf_images else None
    features, _ = session.mm.encode(session.mm.from_pixels(hf_images["pixel_values"].float().numpy(), grids))
    for name, ref in job.adapter.reference_image_features(hf_images).items():
        report.checks["vision" if name == "image_embeds" else name.removesuffix("_embeds")] = \
            _check(features[name], ref, floor=1.0)
    types = inputs.get("mm_token_type_ids", inputs.get("token_type_ids"))
    report.facts["image_tokens"] = int((types == 1).sum())
    request = _request(ids, mask, pos)
    session.attach_images(request, features)
    return request, ids, mask, pos, images_until


def _request(ids, mask, pos):
    """The runtime's Request for HF's left-padded batch: the same rows, right-padded."""
    lengths = mask.sum(-1).tolist()
    n = ids.shape[1]
    right = [np.zeros(ids.shape, np.int64), np.zeros(ids.shape, np.int64), np.zeros(pos.shape, np.int64)]
    for b, length in enumerate(lengths):
        for out, src in zip(right, (ids.numpy(), mask.numpy(), pos.numpy())):
            out[..., b, :length] = src[..., b, n - length:]
    return Request([r[:length].tolist() for r, length in zip(right[0], lengths)], *right)


def verify(job, manifest) -> Verification:
    """A Verification of the graphs in job.directory; the caller acts on its `passed`.

    Argmax agreement is reported but not required: random prompts can leave two
    logits closer than the tolerance, and then either order is correct.  Fitted
    KV heads (job.heads) go into the reference too.
    """
    hf, ad = job.hf, job.adapter
    session = PopSession.load(job.directory, threads=job.options.threads)  # the artifacts' own backend
    report = Verification(tolerance=TOLERANCE[manifest.dtype])
    if ad.image_inputs:
        job.progress("verify: vision graph against HF's image features")
        request, ids, mask, pos, images_until = _image_request(job, session, manifest, report)
    else:
        windows = [ad.sliding_window(l) for l in range(ad.num_layers)]
        lengths = verify_lengths(max((w for w in windows if w), default=None), manifest.max_seq_len)
        ids, mask = _text_prompts(ad.cfg.vocab_size, lengths)
        pos = reference.positions(mask)
        request, images_until = _request(ids, mask, pos), (lambda end: {})
    b, n = ids.shape
    lengths = mask.sum(-1).tolist()
    report.facts.update({"batch": b, "prompt_lengths": lengths})

    job.progress(f"verify: prefill and boundary (POP mode), batch {b}, prompt lengths {report.facts['prompt_lengths']}")
    ref_cache = reference.prefill(hf, ids[:, :-1], mask[:, :-1], job.prefill_layers, pos[..., :-1], job.heads,
                                  **images_until(n - 1))

    def observe_pop(phase, logits):
        if phase == "prefill":
            report.checks["prefill_kv"] = _cache_check(session.kv, ref_cache, [length - 1 for length in lengths])
        elif phase == "boundary":
            ref = reference.step(hf, ids[:, -1:], mask, ref_cache, pos[..., -1:]).numpy()
            report.checks["boundary_logits"] = _check(logits, ref, floor=1.0, argmax=True)
    next(session.run(request, 1, "pop", observe=observe_pop))

    job.progress("verify: the decode graph over the whole prompt with an empty past (full mode)")
    with torch.no_grad():
        hf_out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **images_until(n))

    def observe_full(phase, logits):
        report.checks["full_logits"] = _check(logits, hf_out.logits[:, -1].float().numpy(), floor=1.0, argmax=True)
        report.checks["full_kv"] = _cache_check(session.kv, hf_out.past_key_values, lengths)
    next(session.run(request, 1, "full", observe=observe_full))

    tol = report.tolerance
    report.passed = all(c.max_abs <= tol * max(1.0, c.scale) for c in report.checks.values())
    return report
