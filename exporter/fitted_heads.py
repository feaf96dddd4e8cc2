"""Fitted KV heads: POP's independent KV projections, refitted in closed form.

POP fills a pruned layer l's cache from h, the hidden state leaving layer K-1,
through l's own weights: W norm_l(h).  The full model would have used x_l, the
input of layer l, which differs from h by everything layers K..l-1 add.  That
drift is POP's whole error.  Here each pruned layer's K and V matrices are
refitted so that W' norm_l(h) predicts the true W norm_l(x_l) over calibration
tokens, by ridge regression pulled toward W:

    minimise ||Z W'^T - Y||^2 + lam ||W' - W||^2,   Z = norm_l(h), Y = W norm_l(x_l)
    =>  W'^T = W^T + (Z^T Z + lam I)^-1 Z^T (Y - Z W^T)

Written as a correction to W, lam -> inf gives back W, and so the paper's POP,
exactly (a correction below float rounding adds nothing).  Z^T (Y - Z W^T) is
the correlation of the input with POP's own error: no error, no correction.

The fit is linear and before the k-norm and RoPE, which stay the layer's own:
the family adapter applies them to whatever projection it is given.  Statistics
are accumulated in float64, so the token count does not limit precision.  The
ridge strength is chosen per layer and matrix on held-out calibration tokens,
among relative values (lam = value x the mean eigenvalue of Z^T Z, so that one
value means the same for every layer and model), with inf, the original
matrix, always a candidate: a fitted head is never worse on held-out text.

Held-out tokens of the calibration text alone cannot see a fit that only holds
in its domain: calibrated on Austen, SmolLM2-135M's fitted heads were worse than
the original ones on a sea novel (KL 0.73 against 0.49 at K=20).  So the choice
is guarded by a second, different text: by default the model's own samples
(text from its prior, no domain of the user's), or a file.  Half of the guard
text chooses, half checks.  Each matrix takes the candidate whose worse ratio
to the original head's error, on the calibration's held-out tokens and on the
guard's, is smallest (worst case, not average); candidates are fitted on the
calibration text alone or on it and the guard text together, token-balanced.
The original matrix scores 1 on both, so a fit that helps one domain by hurting
the other loses to it.  The checking half says how much the heads gain in and
out of the calibration domain, and warns when they lose outside it.
"""
import math
import sys

import torch
from torch import nn
from tqdm import tqdm

from pop.runtime.errors import PopError

from .sources import read_text

KINDS = ("key", "value")
RIDGE_GRID = tuple(10.0 ** e for e in range(-6, 4))  # relative strengths `auto` tries, and inf
DEFAULT_TOKENS = 65536
CHUNK = 256  # tokens per calibration sequence: long enough for real attention context, short enough to batch
# Relative squared error of the original head below which float32 rounding of the targets explains it all
# ((1e-7 relative per value)^2 is 1e-14; a margin of 1e4 above that)
ROUNDING = 1e-10
HELD_OUT_EVERY = 10  # every 10th calibration sequence (at least one) is held out to choose the ridge strength
GUARDS = ("samples", "off")  # --guard: the model's own samples (default), or off; anything else is a file
GUARD_TOKENS = 8192  # guard text: half chooses among the fits, half checks the chosen one
SPLITS = ("fit", "held", "guard", "check")
MIXES = (0.0, 1.0)  # weight of the guard text in a candidate's fit, relative to the calibration text's tokens


def parse_ridge(value):
    """'auto', a positive number or 'inf' -> 'auto' or a float; PopError otherwise."""
    if value is None or value == "auto":
        return "auto"
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise PopError(f"--ridge must be auto, a positive number or inf, got {value!r}") from None
    if not r > 0 or math.isnan(r):
        raise PopError(f"--ridge must be auto, a positive number or inf, got {value!r}")
    return r


def check_options(kv_heads, calib, calib_tokens, ridge, guard="samples"):
    """One-line errors for bad options, before any model loads.  Returns the calibration (text, sha256) or None."""
    if kv_heads not in ("original", "fitted"):
        raise PopError(f"--kv-heads must be original or fitted, got {kv_heads!r}")
    if kv_heads == "original":
        if calib is not None:
            raise PopError("--calib is only used with --kv-heads fitted")
        if guard not in (None, "samples"):
            raise PopError("--guard is only used with --kv-heads fitted")
        return None
    if guard not in (None, *GUARDS):
        read_text(guard)  # a guard file: missing or empty is one line now
    if calib is None:
        raise PopError("--kv-heads fitted needs calibration text: --calib FILE")
    if calib_tokens is not None and calib_tokens < 2 * CHUNK:
        raise PopError(f"--calib-tokens must be at least {2 * CHUNK}, got {calib_tokens}")
    parse_ridge(ridge)
    return read_text(calib)


# --- calibration statistics ---------------------------------------------------------

def calibration_chunks(text, tokenizer, tokens, bos_id=None, path="calibration text"):
    """Token sequences of CHUNK ids (BOS first where the model wants one), spread evenly over the text."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    body = CHUNK - (bos_id is not None)
    count = len(ids) // body
    if count < 2:
        raise PopError(f"{path} has {len(ids)} tokens; fitted heads need at least {2 * body} "
                       f"(two sequences of {CHUNK}, one of them held out)")
    want = max(2, math.ceil(tokens / CHUNK))
    step = count / min(want, count)
    chunks = [ids[int(i * step) * body:(int(i * step) + 1) * body] for i in range(min(want, count))]
    return [[bos_id] + c if bos_id is not None else c for c in chunks]


def _projections(adapter, l):
    return dict(zip(KINDS, adapter.kv_proj(l)))


def _augment(z, has_bias):
    """A column of ones stands for the bias, which is fitted (and regularised) like any weight."""
    return torch.cat([z, z.new_ones(z.shape[0], 1)], 1) if has_bias else z


def _original(proj):
    w = proj.weight.detach().double()
    return torch.cat([w, proj.bias.detach().double()[:, None]], 1) if proj.bias is not None else w


class Stats:
    """Z^T Z, Z^T Y and sum Y^2 of one (K, layer, kind) per split: the calibration text's fit and held-out
    sequences, and the guard text's choosing and checking halves (SPLITS)."""

    def __init__(self, d, o):
        self.zz = {s: torch.zeros(d, d, dtype=torch.float64) for s in SPLITS}
        self.zy = {s: torch.zeros(d, o, dtype=torch.float64) for s in SPLITS}
        self.yy = {s: 0.0 for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}

    def add(self, split, z, y, zz=None):
        self.zz[split] += z.T @ z if zz is None else zz
        self.zy[split] += z.T @ y
        self.yy[split] += float((y * y).sum())
        self.tokens[split] += z.shape[0]


@torch.no_grad()
def collect(adapter, chunks, ks, progress=True, guard=()):
    """{(K, l, kind): Stats} for every K in ks and every layer l >= K, from one full-model pass per chunk
    (calibration chunks, then guard chunks, which alternate between choosing and checking).

    The first position of each sequence is left out: its hidden states are the
    model's attention sink, orders of magnitude larger than any other token's,
    and would dominate a least-squares fit made for the tokens that follow.
    The graphs and references keep the layers' own matrices there in turn: a
    fit applied to a token far outside its data moved the sink's keys enough to
    undo its gain (SmolLM2-135M, K=20: first-token KL 0.53 against POP's 0.20;
    0.05 with the sink left alone).
    """
    ks = sorted(set(ks))
    stats = {}
    held = set(range(HELD_OUT_EVERY - 1, len(chunks), HELD_OUT_EVERY)) or {len(chunks) - 1}
    labelled = [("held" if i in held else "fit", c) for i, c in enumerate(chunks)]
    labelled += [(("guard", "check")[i % 2], c) for i, c in enumerate(guard)]
    bar = tqdm(total=len(labelled), desc="fitted heads: calibration", unit="seq", file=sys.stderr,
               disable=not progress)
    for split, chunk in labelled:
        ids = torch.tensor([chunk])
        # hidden_states[l] is the input of layer l for l < L (the last entry is after the final norm)
        hs = adapter.body(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for l in range(min(ks), adapter.num_layers):
            projs = _projections(adapter, l)
            target_in = adapter.attn_norm(l, hs[l])[0, 1:]
            targets = {kind: proj(target_in).double() for kind, proj in projs.items()}
            for k in (k for k in ks if k <= l):
                z_in = adapter.attn_norm(l, hs[k])[0, 1:].double()
                grams = {}  # K and V share their input: one Z^T Z for both when both or neither have a bias
                for kind, proj in projs.items():
                    has_bias = proj.bias is not None
                    z = _augment(z_in, has_bias)
                    if has_bias not in grams:
                        grams[has_bias] = z.T @ z
                    key = (k, l, kind)
                    if key not in stats:
                        stats[key] = Stats(z.shape[1], targets[kind].shape[1])
                    stats[key].add(split, z, targets[kind], grams[has_bias])
        bar.update(1)
    bar.close()
    return stats


# --- the solve ----------------------------------------------------------------------

def solve(zz, zy, w, lam):
    """W' (o x d) minimising ||Z W'^T - Y||^2 + lam ||W' - W||^2 from Z^T Z and Z^T Y; lam = inf gives W."""
    if math.isinf(lam):
        return w.clone()
    residual = zy - zz @ w.T  # Z^T (Y - Z W^T): what POP's heads get wrong, seen from their input
    eye = torch.eye(zz.shape[0], dtype=zz.dtype)
    return w + torch.linalg.solve(zz + lam * eye, residual).T


def squared_error(zz, zy, yy, w):
    """||Z W^T - Y||^2 from the statistics: sum Y^2 - 2 tr(W Z^T Y) + tr(W Z^T Z W^T)."""
    return yy - 2 * float((w.T * zy).sum()) + float(((zz @ w.T) * w.T).sum())


def scale(zz):
    """The mean eigenvalue of Z^T Z: relative ridge strengths are multiples of it."""
    return float(torch.trace(zz)) / zz.shape[0]


def _relative(st, split, w):
    return squared_error(st.zz[split], st.zy[split], st.yy[split], w) / max(st.yy[split], 1e-300)


def fit_one(st: Stats, w, ridge="auto", guarded=True):
    """(fitted W', report) for one matrix.  Candidates are fitted on the calibration's fit split (and, mixed in,
    the guard's choosing half) and scored on held-out tokens: by their error relative to the original head's on
    the calibration's held-out split, or, guarded, by the worse of that and the same ratio on the guard's
    choosing half.  W' is then refitted at the chosen candidate on all the tokens that chose it.  The report's
    errors are relative (||.||^2 / ||Y||^2), of the candidate fitted without the held-out tokens; check_* are on
    the guard's checking half, which chose nothing."""
    guarded = guarded and st.tokens["guard"] > 0
    balance = st.tokens["fit"] / max(st.tokens["guard"], 1)  # the guard's tokens count as many as the fit's

    def stats(mix, splits):
        zz = sum(st.zz[s] for s in splits) + mix * balance * st.zz["guard"]
        return zz, sum(st.zy[s] for s in splits) + mix * balance * st.zy["guard"]

    original = {s: _relative(st, s, w) for s in ("held", "guard", "check")}
    strengths = (*RIDGE_GRID, math.inf) if ridge == "auto" else (ridge,)
    scores, solved = {}, {}
    for mix in MIXES if guarded else (0.0,):
        zz, zy = stats(mix, ("fit",))
        for r in strengths:
            if mix and math.isinf(r):
                continue  # the original matrix is one candidate, whatever the mix
            cand = solved[mix, r] = solve(zz, zy, w, r * scale(zz))
            ratios = [_relative(st, "held", cand) / max(original["held"], 1e-300)]
            if guarded:
                ratios.append(_relative(st, "guard", cand) / max(original["guard"], 1e-300))
            scores[mix, r] = max(ratios)
    # ties go to the stronger pull toward W, then to the calibration text alone
    chosen = min(scores, key=lambda c: (scores[c], -c[1], c[0]))
    if original["held"] <= ROUNDING and (0.0, math.inf) in scores:
        # The original head is already exact up to float32 rounding (the layer right after K, whose
        # input is its own): a "gain" there is noise, so the original matrix stays, bit-exact.
        chosen = (0.0, math.inf)
    mix, r = chosen
    zz_all, zy_all = stats(mix, ("fit", "held"))
    fitted = solve(zz_all, zy_all, w, r * scale(zz_all))
    report = {"ridge": "inf" if math.isinf(r) else r, "heldout_rel_error": _relative(st, "held", solved[chosen]),
              "original_rel_error": original["held"]}
    if guarded:
        report["guard_mix"] = mix
    if st.tokens["check"]:
        report["check_rel_error"] = _relative(st, "check", solved[chosen])
        report["check_original_rel_error"] = original["check"]
    return fitted, report


def gains(layers):
    """How much fitted heads cut the K/V error of the original ones, summed over the pruned layers' matrices:
    on the calibration text's held-out tokens (in domain) and on the guard's checking half (out of it).
    1 - fitted/original: 0.6 is 60% less error, below 0 more error than the original heads."""
    reports = [row[kind] for row in layers for kind in KINDS]

    def gain(fitted, original):
        den = sum(r[original] for r in reports if original in r)
        return None if not den else 1 - sum(r[fitted] for r in reports if fitted in r) / den
    return {"in_domain": gain("heldout_rel_error", "original_rel_error"),
            "out_of_domain": gain("check_rel_error", "check_original_rel_error")}


def gain_line(gain):
    """The gains in one line, for progress output."""
    def change(g):
        return f"{'-' if g >= 0 else '+'}{abs(g):.0%}"
    return (f"fitted heads change the pruned layers' K/V error by {change(gain['in_domain'])} on held-out "
            f"calibration text and by {change(gain['out_of_domain'])} on text unlike it (against the original heads)")


def warning(gain, guard_name):
    """One line when the fitted heads lose to the original ones outside the calibration domain, else None."""
    ood = gain.get("out_of_domain")
    if ood is None or ood >= 0:
        return None
    return (f"fitted heads: on text unlike the calibration ({guard_name}) their K/V error is {-ood:.0%} above the "
            f"original heads'; prompts outside the calibration domain may be answered worse than with "
            f"--kv-heads original")


class FittedHeads(nn.Module):
    """The fitted K/V projections of the pruned layers at one K, as nn.Linear modules.

    A layer and kind whose chosen strength is inf keeps the original matrix and
    has no entry: proj() returns None and the graph uses the layer's own module.
    """

    def __init__(self, prefill_layers):
        super().__init__()
        self.prefill_layers = prefill_layers
        self.heads = nn.ModuleDict()
        self.layers = []  # per pruned layer: {"index", "key": report, "value": report}

    @staticmethod
    def _name(kind, l):
        return f"{kind}_{l}"

    def proj(self, kind, l):
        name = self._name(kind, l)
        return self.heads[name] if name in self.heads else None

    def add(self, kind, l, like: nn.Linear, weight):
        """weight: o x d, or o x (d+1) with the bias as its last column (see _augment)."""
        lin = nn.Linear(like.in_features, like.out_features, bias=like.bias is not None,
                        dtype=like.weight.dtype, device=like.weight.device)
        with torch.no_grad():
            lin.weight.copy_(weight[:, :like.in_features].to(like.weight.dtype))
            if like.bias is not None:
                lin.bias.copy_(weight[:, -1].to(like.bias.dtype))
        lin.requires_grad_(False)
        self.heads[self._name(kind, l)] = lin

    def parameter_count(self):
        return sum(p.numel() for p in self.parameters())


def fit(adapter, stats, k, ridge="auto", guarded=True):
    """FittedHeads for K = k from collect()'s statistics; guarded: the guard text takes part in the choice."""
    ridge = parse_ridge(ridge)
    heads = FittedHeads(k)
    for l in range(k, adapter.num_layers):
        row = {"index": l}
        for kind, proj in _projections(adapter, l).items():
            w = _original(proj)
            fitted, report = fit_one(stats[k, l, kind], w, ridge, guarded)
            if report["ridge"] != "inf":
                heads.add(kind, l, proj, fitted)
            row[kind] = report
        heads.layers.append(row)
    return heads


@torch.no_grad()
def model_samples(adapter, tokenizer, tokens, bos_id=None, seed=0, batch=16):
    """Sequences of CHUNK ids sampled from the model itself (temperature 1, top-p 0.95), from BOS or, where the
    model has none, from its end-of-text token: text from the model's own prior, of no user's domain."""
    start = bos_id if bos_id is not None else tokenizer.eos_token_id
    if start is None:
        raise PopError("--guard samples needs a BOS or end-of-text token to start from; pass --guard FILE")
    count = max(2, math.ceil(tokens / CHUNK))
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i in range(0, count, batch):
            n = min(batch, count - i)
            ids = torch.full((n, 1), start, dtype=torch.long)
            seqs = adapter.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                       temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=CHUNK - 1,
                                       min_new_tokens=CHUNK - 1, pad_token_id=start)
            out += seqs.tolist()
    return out


def guard_chunks(adapter, tokenizer, guard, bos_id=None, tokens=GUARD_TOKENS, progress=print):
    """(chunks, record) of the guard text: the model's samples for "samples" and "off", or a file's chunks."""
    if guard in (None, *GUARDS):
        progress(f"fitted heads: sampling {tokens} tokens from the model as text unlike the calibration")
        return (model_samples(adapter, tokenizer, tokens, bos_id),
                {"source": "model samples", "tokens": tokens, "used_in_choice": guard != "off",
                 "sampling": "temperature 1, top-p 0.95, seed 0, from BOS or end-of-text"})
    text, sha = read_text(guard)
    chunks = calibration_chunks(text, tokenizer, tokens, bos_id, str(guard))
    return chunks, {"source": "file", "file": str(guard), "sha256": sha, "tokens": sum(map(len, chunks)),
                    "used_in_choice": True}


def calibrate(adapter, tokenizer, text, ks, tokens=DEFAULT_TOKENS, ridge="auto", bos_id=None,
              path="calibration text", progress=True, guard="samples", say=print):
    """{K: FittedHeads} for every K in ks, from one calibration pass; each carries .calibration for records
    (with the guard text's record, the in- and out-of-domain gains, and a warning or None).
    guard: "samples" (the model's own, default), "off" (sampled for the check only) or a text file."""
    chunks = calibration_chunks(text, tokenizer, tokens, bos_id, path)
    guarding, record = guard_chunks(adapter, tokenizer, guard, bos_id, progress=say if progress else lambda m: None)
    stats = collect(adapter, chunks, ks, progress, guarding)
    out = {}
    for k in sorted(set(ks)):
        if k >= adapter.num_layers:
            continue  # nothing is pruned, nothing to fit
        heads = fit(adapter, stats, k, ridge, guarded=record["used_in_choice"])
        any_key = stats[k, k, KINDS[0]]
        gain = gains(heads.layers)
        heads.calibration = {"tokens": any_key.tokens["fit"] + any_key.tokens["held"],
                             "heldout_tokens": any_key.tokens["held"], "sequences": len(chunks),
                             "sequence_len": CHUNK, "ridge": ridge if ridge == "auto" else float(ridge),
                             "guard": record, "gain": gain,
                             "warning": warning(gain, record.get("file", record["source"]))}
        out[k] = heads
    return out


def manifest_section(heads, calib_path, calib_sha256, model_params):
    """The manifest's optional "kv_heads" section for fitted heads (docs/MANIFEST.md)."""
    from pop.runtime.manifest import KVHeads
    return KVHeads("fitted", "prefill",
                   "ridge regression toward the layer's own W_k, W_v: W' norm_l(h) predicts W norm_l(x_l); "
                   "k-norm and RoPE unchanged (pop.exporter.fitted_heads)",
                   {"file": str(calib_path), "sha256": calib_sha256, **heads.calibration},
                   heads.parameter_count(), heads.parameter_count() / max(model_params, 1), heads.layers)

