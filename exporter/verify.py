"""Run the exported graphs in ONNX Runtime at fresh shapes and compare them with
the eager PyTorch reference (reference.py, which runs HF's own modules).

Shapes differ from the trace sample on purpose: batch 3, left-padded rows of
three lengths, and a prompt longer than any sliding window, so that a shape
frozen at trace time, a wrong mask or a wrong window shows up here.
"""
import numpy as np
import torch

from pop.runtime.backends import open_backend
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


class _TextRequest:
    """Random token prompts, left-padded: positions by the text rule, no images."""

    def __init__(self, adapter, manifest):
        windows = [adapter.sliding_window(l) for l in range(adapter.num_layers)]
        self.lengths = verify_lengths(max((w for w in windows if w), default=None), manifest["max_seq_len"])
        self.ids, self.mask = _inputs(adapter.cfg.vocab_size, self.lengths)
        self.pos = reference.positions(self.mask)
        self.report = {"prompt_lengths": self.lengths}

    def hf_images(self, end):
        return {}

    def extra(self, window, end):
        return None


class _ImageRequest:
    """Prompts with images of different sizes (two in the first row), built by the
    model's own HF processor; the vision graph's output is checked against HF's
    image features, and then feeds the prefill and decode graphs."""

    def __init__(self, hf_model, adapter, manifest, backend, processor, report):
        from PIL import Image

        from pop.runtime.multimodal import Multimodal
        spec = manifest["vision"]
        rng = np.random.default_rng(0)
        images = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
                  for sizes in (((70, 45), (40, 96)), ((64, 64),))]
        ph = spec["image_token"] if spec["family"] == "gemma3" else "<|vision_start|><|image_pad|><|vision_end|>"
        texts = [f"Look: {ph} and then {ph}, compare the two pictures.", f"One more {ph} to describe"]
        inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        self.ids, self.mask = inputs["input_ids"], inputs["attention_mask"]
        self.images = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        self.pos, self.hf_images = reference.image_inputs(hf_model, inputs)
        self.qwen = spec["family"] == "qwen3_vl"
        self.lengths = self.mask.sum(-1).tolist()
        types = inputs.get("mm_token_type_ids", inputs.get("token_type_ids"))
        self.report = {"prompt_lengths": self.lengths, "image_tokens": int((types == 1).sum())}

        self.mm = Multimodal(spec, backend, manifest)
        pixels = self.images["pixel_values"].float().numpy().astype(self.mm.dtype)
        if self.qwen:  # HF's pixels, the runtime's tables: the graph is what is checked here
            grids = self.images["image_grid_thw"].numpy()
            request = ({"pixel_values": pixels, **self.mm.images.vision_inputs(grids)}, grids)
        else:
            request = ({"pixel_values": pixels}, len(pixels))
        self.encoded, _ = self.mm.encode(request)
        with torch.no_grad():
            ref = hf_model.model.get_image_features(**self.images, return_dict=True)
        ref_embeds = ref.pooler_output
        ref_embeds = torch.cat(ref_embeds) if isinstance(ref_embeds, (tuple, list)) else ref_embeds
        ref_embeds = ref_embeds.reshape(-1, ref_embeds.shape[-1]).float().numpy()
        report["vision_max_abs"] = _max_diff(self.encoded["image_embeds"], ref_embeds)
        report["vision_scale"] = max(1.0, _scale(ref_embeds))
        if self.qwen:
            deep = np.stack([torch.cat(f).float().numpy() for f in ref.deepstack_features])
            report["deepstack_max_abs"] = _max_diff(self.encoded["deepstack_embeds"], deep)
            report["deepstack_scale"] = max(1.0, _scale(deep))
        groups = self.mm.groups(self.ids.numpy(), self.mask.numpy())
        self.groups = None if groups is None else np.ascontiguousarray(groups.T)

    def extra(self, window, end):
        groups = None if self.groups is None else np.ascontiguousarray(self.groups[:end])
        return self.mm.feeds(np.ascontiguousarray(window), self.encoded, groups)


def verify(hf_model, adapter, keep, directory, manifest, dtype_name, threads=None, progress=print, processor=None,
           heads=None):
    """Returns a report of max abs differences; the caller acts on report["passed"].

    The graphs are driven through the runtime's own bindings (pop.runtime.kv),
    so what is verified is what PopSession runs.  Argmax agreement is reported
    but not required: random prompts can leave two logits closer than the
    tolerance, and then either order is correct.  heads: the fitted KV heads the
    prefill graph was traced with, which the reference then uses too.
    """
    backend = open_backend(None, directory, manifest, threads)  # the artifacts' own: ONNX Runtime or AOTInductor
    report = {"tolerance": TOLERANCE[dtype_name]}
    if adapter.image_inputs:
        progress("verify: vision graph against HF's image features")
        req = _ImageRequest(hf_model, adapter, manifest, backend, processor, report)
    else:
        req = _TextRequest(adapter, manifest)
    ids, mask, pos = req.ids, req.mask, req.pos
    b, n = ids.shape
    ids_np, pos_np = ids.numpy(), pos.numpy()
    real = np.ascontiguousarray(mask.numpy().T).astype(bool)  # [slot, batch]; padded slots are don't-care
    names = layer_names(manifest)
    logits_spec = next(o for o in manifest["graphs"]["decode"]["outputs"] if o["name"] == "logits")
    logits = np.zeros((b, adapter.cfg.vocab_size), np.dtype(logits_spec["dtype"]))

    def fresh_kv():
        kv = KVBuffer(adapter.num_layers, adapter.num_kv_heads, adapter.head_dim, n, manifest["kv_cache"]["dtype"], b)
        kv.mask[:] = real
        return kv

    def window(a, start, end):
        return np.ascontiguousarray(a[..., start:end])
    report.update({"batch": b, **req.report})

    progress(f"verify: prefill graph, batch {b}, prompt lengths {req.lengths}")
    kv = fresh_kv()
    backend.run("prefill", *prefill_io(kv, names, window(ids_np, 0, n - 1), window(pos_np, 0, n - 1), n - 1,
                                       req.extra(ids_np[:, :n - 1], n - 1)))
    ref_cache = reference.prefill(hf_model, ids[:, :-1], mask[:, :-1], keep, pos[..., :-1], heads,
                                 **req.hf_images(n - 1))
    _compare_cache(kv, ref_cache, n - 1, real, report, "prefill_kv")

    progress("verify: decode graph at the boundary (past from the prefill graph)")
    backend.run("decode", *decode_io(kv, names, window(ids_np, n - 1, n), window(pos_np, n - 1, n), n - 1, 1, logits,
                                     req.extra(ids_np[:, n - 1:], n)))
    _compare_logits(logits, reference.step(hf_model, ids[:, -1:], mask, ref_cache, pos[..., -1:]).numpy(), report,
                    "boundary_logits")

    progress("verify: decode graph over the whole prompt with an empty past (full mode)")
    kv = fresh_kv()
    backend.run("decode", *decode_io(kv, names, ids_np, pos_np, 0, n, logits, req.extra(ids_np, n)))
    with torch.no_grad():
        hf_out = hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **req.hf_images(n))
    _compare_logits(logits, hf_out.logits[:, -1].float().numpy(), report, "full_logits")
    _compare_cache(kv, hf_out.past_key_values, n, real, report, "full_kv")

    tol = report["tolerance"]
    checked = [k[:-len("_max_abs")] for k in report if k.endswith("_max_abs")]
    report["passed"] = all(report[f"{what}_max_abs"] <= tol * max(1.0, report[f"{what}_scale"]) for what in checked)
    return report
