"""Empirical checks of ONNX Runtime CPU contrib operators used by the POP exporter.

Reproduces every finding in docs/research/ort_contrib_ops.md. Tiny graphs, CPU only,
single thread, no timing. Run:  .venv/bin/python docs/research/ort_contrib_ops_checks.py
(--schema also prints the full GroupQueryAttention schema).

Each finding prints one PASS/FAIL line; a PASS means the behaviour stated in the
line was observed. The reference is plain float64 softmax attention in numpy.
"""
import sys
from collections import Counter
import tempfile, os

import numpy as np
import onnx
import onnx.numpy_helper as nh
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh

np.seterr(invalid="ignore", over="ignore")
ort.set_default_logger_severity(4)
F = TP.FLOAT
TOL = 2e-6
N_FAIL = 0


def check(name, ok, detail=""):
    global N_FAIL
    N_FAIL += 0 if ok else 1
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  [{detail}]" if detail else ""))


def err_text(e):
    s = str(e)
    return s.split("Status Message:")[-1].strip() if "Status Message:" in s else s


def expect_error(fn, needle):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        t = err_text(e)
        i = t.find(needle)
        return i >= 0, (t[i:i + 200] if i >= 0 else t[:200])
    return False, "no error"


# ----------------------------------------------------------------------------- graph helpers
GQA_INPUTS = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
              "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale",
              "q_norm_weight", "k_norm_weight", "query_seqlens"]
GQA_TYPES = {"seqlens_k": TP.INT32, "total_sequence_length": TP.INT32, "position_ids": TP.INT64,
             "query_seqlens": TP.INT32}
GQA_RANK = {"query": 3, "key": 3, "value": 3, "past_key": 4, "past_value": 4, "seqlens_k": 1,
            "total_sequence_length": 0, "cos_cache": 2, "sin_cache": 2, "position_ids": 2, "attention_bias": 4,
            "head_sink": 1, "k_scale": 1, "v_scale": 1, "q_norm_weight": 1, "k_norm_weight": 1, "query_seqlens": 1}
BASE = {"query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"}
ROT = {"cos_cache", "sin_cache"}


def vi(name, elem, rank):
    return oh.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(rank)])


def model_of(nodes, inputs, outputs, inits=(), opset=21, ms=True):
    g = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    ops = [oh.make_opsetid("", opset)] + ([oh.make_opsetid("com.microsoft", 1)] if ms else [])
    return oh.make_model(g, opset_imports=ops)


def gqa_model(used, **attrs):
    last = max(GQA_INPUTS.index(n) for n in used)
    ins = [n if n in used else "" for n in GQA_INPUTS[:last + 1]]
    outs = ["output", "present_key", "present_value"]
    node = oh.make_node("GroupQueryAttention", ins, outs, domain="com.microsoft", **attrs)
    return model_of([node], [vi(n, GQA_TYPES.get(n, F), GQA_RANK[n]) for n in ins if n],
                    [vi(o, F, 3 if o == "output" else 4) for o in outs])


def session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, opt_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    so.graph_optimization_level = level
    if opt_path:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_shared(model, feeds, kbuf, vbuf):
    """past_key/present_key (and value) bound by IOBinding to the same numpy buffer."""
    s = session(model)
    io = s.io_binding()
    for n, a in feeds.items():
        io.bind_cpu_input(n, a)
    bufs = {"past_key": kbuf, "past_value": vbuf}
    for n, b in bufs.items():
        io.bind_input(n, "cpu", 0, np.float32, list(b.shape), b.ctypes.data)
    outb = {"present_key": kbuf, "present_value": vbuf}
    names = [o.name for o in s.get_outputs()]
    for n in names:
        if n in outb:
            io.bind_output(n, "cpu", 0, np.float32, list(outb[n].shape), outb[n].ctypes.data)
        else:
            io.bind_output(n, "cpu")
    s.run_with_iobinding(io)
    o = dict(zip(names, io.get_outputs()))
    return o["output"].numpy(), o


# ----------------------------------------------------------------------------- numpy reference
def rope_cache(max_pos, dim, base=10000.0):
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope_hf(x, pos, cos, sin):
    """HF rotate_half RoPE. x [B,H,S,D], pos [B,S]."""
    c = cos[pos][:, None].astype(np.float64)
    s = sin[pos][:, None].astype(np.float64)
    c = np.concatenate([c, c], -1)
    s = np.concatenate([s, s], -1)
    h = x.shape[-1] // 2
    return x * c + np.concatenate([-x[..., h:], x[..., :h]], -1) * s


def rms_ref(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def heads(x, h):  # [B,S,H*D] -> [B,H,S,D]
    b, s, hd = x.shape
    return x.reshape(b, s, h, hd // h).transpose(0, 2, 1, 3)


def ref_attn(q, k, v, q_pos, k_len, scale=None, softcap=0.0, window=None, causal=True, bias=None,
             softcap_after_mask=False, bias_before_softcap=False):
    """q [B,Hq,S,D]; k,v [B,Hkv,T,D] at absolute positions 0..T-1; q_pos [B,S]; keys >= k_len[b] invalid;
    window: HF sliding window W (allowed iff q_pos - k_pos < W); bias additive [B|1,Hq|1,S,<=T]."""
    B, Hq, S, D = q.shape
    T = k.shape[2]
    g = Hq // k.shape[1]
    k = np.repeat(k.astype(np.float64), g, 1)
    v = np.repeat(v.astype(np.float64), g, 1)
    s = np.einsum("bhsd,bhtd->bhst", q.astype(np.float64), k) * (D ** -0.5 if scale is None else scale)
    kp = np.arange(T)[None, None, None, :]
    qp = np.asarray(q_pos)[:, None, :, None]
    valid = kp < np.asarray(k_len)[:, None, None, None]
    allow = np.broadcast_to(valid, (B, 1, S, T)).copy()
    if causal:
        allow &= kp <= qp
    if window is not None:
        allow &= qp - kp < window
    if softcap and softcap_after_mask:  # wrong order, for contrast: masked scores become -softcap
        s = softcap * np.tanh(np.where(allow, s, -np.inf) / softcap)
        allow = np.broadcast_to(valid, (B, 1, S, T)).copy()
    if bias is not None:
        bb = np.zeros(bias.shape[:3] + (T,))
        bb[..., :bias.shape[-1]] = bias
    if bias is not None and bias_before_softcap:
        s = s + bb
    if softcap and not softcap_after_mask:
        s = softcap * np.tanh(s / softcap)
    if bias is not None and not bias_before_softcap:
        s = s + bb
    s = np.where(allow, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhst,bhtd->bhsd", p, v).transpose(0, 2, 1, 3).reshape(B, S, Hq * v.shape[-1])


def maxerr(out, ref, nvalid):
    return max(float(np.abs(out[b, :n] - ref[b, :n]).max()) for b, n in enumerate(nvalid) if n > 0)


# ----------------------------------------------------------------------------- a generic GQA step
class Step:
    """One GQA call on a shared [B,Hkv,SM,D] buffer. past[b] tokens already cached (random), unused slots
    hold garbage (K=GK, V=GV). n[b] valid new tokens out of S (query_seqlens semantics)."""

    def __init__(self, rng, B, Hq, Hkv, D, SM, past, S, n=None, GK=3.0, GV=-100.0):
        self.B, self.Hq, self.Hkv, self.D, self.SM, self.S = B, Hq, Hkv, D, SM, S
        self.past = np.asarray(past)
        self.n = np.full(B, S) if n is None else np.asarray(n)
        self.k = rng.standard_normal((B, Hkv, SM, D)).astype(np.float32)
        self.v = rng.standard_normal((B, Hkv, SM, D)).astype(np.float32)
        for b in range(B):
            self.k[b, :, self.past[b]:] = GK
            self.v[b, :, self.past[b]:] = GV
        self.k0, self.v0 = self.k.copy(), self.v.copy()
        self.q_in = rng.standard_normal((B, S, Hq * D)).astype(np.float32)
        self.k_in = rng.standard_normal((B, S, Hkv * D)).astype(np.float32)
        self.v_in = rng.standard_normal((B, S, Hkv * D)).astype(np.float32)

    def feeds(self, tsl, **extra):
        f = dict(query=self.q_in, key=self.k_in, value=self.v_in,
                 seqlens_k=(self.past + self.n - 1).astype(np.int32), total_sequence_length=np.array(tsl, np.int32))
        f.update(extra)
        return f

    def run(self, model, tsl, **extra):
        self.out, self.ort_out = run_shared(model, self.feeds(tsl, **extra), self.k, self.v)
        return self.out

    def expected_cache(self, k_new=None):
        """Old buffer with the n[b] new (optionally rotated) K/V written at [past, past+n)."""
        K = heads(self.k_in, self.Hkv) if k_new is None else k_new
        V = heads(self.v_in, self.Hkv)
        ek, ev = self.k0.astype(np.float64), self.v0.copy()
        for b in range(self.B):
            p, n = self.past[b], self.n[b]
            ek[b, :, p:p + n] = K[b, :, :n]
            ev[b, :, p:p + n] = V[b, :, :n]
        return ek, ev

    def qpos(self):
        return self.past[:, None] + np.arange(self.S)[None]

    def ref(self, q=None, k_new=None, **kw):
        ek, ev = self.expected_cache(k_new)
        q = heads(self.q_in, self.Hq) if q is None else q
        return ref_attn(q, ek, ev, self.qpos(), self.past + self.n, **kw)

    def err(self, **kw):
        return maxerr(self.out, self.ref(**kw), self.n)


def print_schema(full):
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    s = [s for s in get_all_operator_schema() if s.name == "GroupQueryAttention" and s.domain == "com.microsoft"][0]
    print(f"== com.microsoft GroupQueryAttention since {s.since_version}: inputs {s.min_input}..{s.max_input}, "
          f"outputs {s.min_output}..{s.max_output}")
    for i, p in enumerate(s.inputs):
        print(f"   in{i:<2} {p.name:<22} {p.typeStr:<8} {p.option.name}" + (f"  {p.description}" if full else ""))
    for i, p in enumerate(s.outputs):
        print(f"   out{i} {p.name:<22} {p.typeStr:<8} {p.option.name}")
    for k in sorted(s.attributes):
        a = s.attributes[k]
        print(f"   attr {k:<22} {a.type.name:<7} {'required' if a.required else 'optional'}"
              + (f"  {a.description}" if full else ""))
    for t in s.type_constraints:
        print(f"   {t.type_param_str}: {', '.join(t.allowed_type_strs)}")
    return s


# ============================================================================= checks
def q1_schema():
    print("\n### Q1 GroupQueryAttention schema")
    s = print_schema("--schema" in sys.argv)
    opt = {p.name: p.option.name for p in s.inputs}
    check("schema: 17 inputs, seqlens_k and total_sequence_length are required (min_input=7)",
          len(s.inputs) == 17 and s.min_input == 7 and opt["seqlens_k"] == "Single"
          and opt["total_sequence_length"] == "Single")
    check("schema: q_norm_weight=in14, k_norm_weight=in15, query_seqlens=in16; seqlens_k/tsl int32",
          [p.name for p in s.inputs][14:] == ["q_norm_weight", "k_norm_weight", "query_seqlens"]
          and s.inputs[5].types == {"tensor(int32)"})


def q1a_shared_buffer(rng):
    print("\n### Q1a shared past/present buffer (IOBinding, same pointer)")
    B, Hq, Hkv, D, SM = 2, 4, 2, 8, 12
    m = gqa_model(BASE, num_heads=Hq, kv_num_heads=Hkv)
    # first prompt, right-padded: lens 5 and 3, S=5
    st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=5, GK=100.0, GV=100.0)
    st.n = np.array([5, 3])
    st.run(m, tsl=5)
    pk = st.ort_out["present_key"]
    check("prompt: tsl == S (=5) -> present shape [B,Hkv,S_max,D] at the bound address",
          pk.shape() == [B, Hkv, SM, D] and pk.data_ptr() == st.k.ctypes.data, f"shape {pk.shape()}")
    K = heads(st.k_in, Hkv)
    check("prompt: all S new rows (padding rows too) written at slots [0,S) of every batch row; [S,S_max) untouched",
          np.array_equal(st.k[:, :, :5], K) and np.all(st.k[:, :, 5:] == 100.0) and np.all(st.v[:, :, 5:] == 100.0))
    check("prompt: valid rows match reference (keys < seqlens_k[b]+1)", st.err() < TOL, f"max err {st.err():.1e}")
    ok, t = expect_error(lambda: st.run(m, tsl=SM), "batch_size must be 1 when sequence_length > 1 and past context")
    check("prompt B=2 with tsl=S_max (!= S) is refused", ok, t)
    ok, t = expect_error(lambda: st.run(m, tsl=4), "total_sequence_length must be at least kv_sequence_length")
    check("tsl < S is refused", ok, t)

    # decode with garbage beyond each row's length
    for tsl in (6, 9, SM, 3):
        st = Step(rng, B, Hq, Hkv, D, SM, past=[5, 3], S=1)
        st.run(m, tsl=tsl)
        ek, ev = st.expected_cache()
        same = np.array_equal(st.k, ek.astype(np.float32)) and np.array_equal(st.v, ev)
        check(f"decode B=2 past=[5,3] tsl={tsl}: only slot seqlens_k[b] written, rest of buffer bit-identical; "
              f"garbage (K=3,V=-100) in unused slots ignored", same and st.err() < TOL,
              f"present {st.ort_out['present_key'].shape()}, max err {st.err():.1e}")
    st = Step(rng, B, Hq, Hkv, D, SM, past=[5, 3], S=1)
    ok, t = expect_error(lambda: st.run(m, tsl=SM + 1), "computed output shape for this run is {2,2,13,8}")
    check("decode tsl = S_max+1: present would be [B,Hkv,max(S_max,tsl),D] -> mismatch with bound buffer", ok, t)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[5, 3], S=1)
    st.run(m, tsl=1)
    changed = [sorted(set(np.nonzero((st.k != st.k0)[b])[1].tolist())) for b in range(B)]
    check("decode with tsl == S == 1 is taken as a first prompt: new K written to slot 0 (cache corrupted)",
          changed == [[0], [0]], f"changed slots {changed}")
    ok, t = expect_error(lambda: Step(rng, B, Hq, Hkv, D, SM, past=[12, 3], S=1).run(m, tsl=SM),
                         "seqlens_k[0] = 12 is out of range [0, 12)")
    check("seqlens_k >= S_max is refused", ok, t)
    # without buffer sharing (plain run)
    q = rng.standard_normal((B, 1, Hq * D)).astype(np.float32)
    kv = rng.standard_normal((B, 1, Hkv * D)).astype(np.float32)
    shapes = []
    for P, tsl in ((5, 6), (7, 6)):
        pkv = rng.standard_normal((B, Hkv, P, D)).astype(np.float32)
        r = session(m).run(None, dict(query=q, key=kv, value=kv, past_key=pkv, past_value=pkv,
                                      seqlens_k=np.array([5, 3], np.int32),
                                      total_sequence_length=np.array(tsl, np.int32)))
        shapes.append(r[1].shape[2])
    check("no sharing: present length = P+1 when tsl=P+1 (P=5 -> 6), = P when tsl <= P (P=7,tsl=6 -> 7)",
          shapes == [6, 7], f"{shapes}")


def q1b_seqlens(rng):
    print("\n### Q1b seqlens_k semantics")
    B, Hq, Hkv, D, SM = 2, 4, 2, 8, 12
    m = gqa_model(BASE, num_heads=Hq, kv_num_heads=Hkv)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=5)
    st.n = np.array([5, 3])
    st.run(m, tsl=5)
    full = st.ref()
    pad_ref = ref_attn(heads(st.q_in, Hq), heads(st.k_in, Hkv), heads(st.v_in, Hkv), np.tile(np.arange(5), (2, 1)),
                       np.array([5, 3]))
    causal_all = ref_attn(heads(st.q_in, Hq), heads(st.k_in, Hkv), heads(st.v_in, Hkv),
                          np.tile(np.arange(5), (2, 1)), np.array([5, 5]))
    check("(i) prompt: seqlens_k = len-1 per row; valid rows exact", maxerr(st.out, full, st.n) < TOL)
    e_pad = np.abs(st.out[1, 3:] - pad_ref[1, 3:]).max()
    e_all = np.abs(st.out[1, 3:] - causal_all[1, 3:]).max()
    check("(i) prompt: padded query rows are finite = attention over keys [0, len) (not causal over padding)",
          np.isfinite(st.out).all() and e_pad < TOL and e_all > 1e-2, f"err {e_pad:.1e} (vs causal-all {e_all:.1e})")
    # (ii) covered in Q1a; (iii)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[4, 2], S=3)
    ok, t = expect_error(lambda: st.run(m, tsl=7), "batch_size must be 1 when sequence_length > 1 and past context")
    check("(iii) S>1 with past>0 and B=2 is refused", ok, t)
    for tsl in (7, SM):
        st = Step(rng, 1, Hq, Hkv, D, SM, past=[4], S=3)
        st.run(m, tsl=tsl)
        ek, _ = st.expected_cache()
        check(f"(iii) B=1 past=4 S=3 seqlens_k=6 tsl={tsl}: slots 4..6 written, rest untouched, output exact",
              np.array_equal(st.k, ek.astype(np.float32)) and st.err() < TOL, f"err {st.err():.1e}")
    st = Step(rng, 1, Hq, Hkv, D, SM, past=[4], S=3)
    st.run(m, tsl=3)
    changed = sorted(set(np.nonzero((st.k != st.k0)[0])[1].tolist()))
    check("(iii) B=1 past=4 S=3 with tsl == S: taken as first prompt, writes slots 0..2 (wrong)",
          changed == [0, 1, 2], f"changed {changed}")
    st = Step(rng, 1, Hq, Hkv, D, SM, past=[0], S=3)
    st.run(m, tsl=SM)
    check("B=1 first prompt with tsl=S_max (past path, past=seqlens_k+1-S=0) is also exact", st.err() < TOL)
    # query_seqlens: batched chunks
    mq = gqa_model(BASE | {"query_seqlens"}, num_heads=Hq, kv_num_heads=Hkv)
    for past, n, S in (([4, 2], [3, 1], 3), ([0, 0], [3, 2], 3), ([4, 2], [1, 0], 1)):
        st = Step(rng, B, Hq, Hkv, D, SM, past=past, S=S, n=n)
        st.run(mq, tsl=SM, query_seqlens=st.n.astype(np.int32))
        ek, ev = st.expected_cache()
        check(f"query_seqlens={n} past={past} S={S} tsl=S_max: only valid rows written at [past,past+n), "
              f"valid outputs exact", np.array_equal(st.k, ek.astype(np.float32)) and st.err() < TOL,
              f"err {st.err():.1e}")


def q1c_rotary(rng):
    print("\n### Q1c do_rotary / position_ids")
    B, Hq, Hkv, D, SM = 2, 4, 2, 16, 12
    cos, sin = rope_cache(32, D)
    m = gqa_model(BASE | ROT, num_heads=Hq, kv_num_heads=Hkv, do_rotary=1)
    mp = gqa_model(BASE | ROT | {"position_ids"}, num_heads=Hq, kv_num_heads=Hkv, do_rotary=1)
    mpq = gqa_model(BASE | ROT | {"position_ids", "query_seqlens"}, num_heads=Hq, kv_num_heads=Hkv, do_rotary=1)

    def go(model, past, S, tsl, n=None, ref_pos=None, b=B, **extra):
        st = Step(rng, b, Hq, Hkv, D, SM, past=past, S=S, n=n)
        st.run(model, tsl, cos_cache=cos, sin_cache=sin, **extra)
        pos = st.qpos() if ref_pos is None else ref_pos
        Kr = rope_hf(heads(st.k_in, Hkv), pos, cos, sin)
        Qr = rope_hf(heads(st.q_in, Hq), pos, cos, sin)
        kerr = max(np.abs(st.k[i, :, st.past[i]:st.past[i] + st.n[i]] - Kr[i, :, :st.n[i]]).max() for i in range(b))
        return kerr, maxerr(st.out, st.ref(q=Qr, k_new=Kr), st.n)

    ke, oe = go(m, [0, 0], 4, 4, n=[4, 2])
    check("(i) prompt: row b token s rotated at position s (cached K is rotated)", ke < TOL and oe < TOL,
          f"K err {ke:.1e}, out err {oe:.1e}")
    ke, oe = go(m, [5, 3], 1, 6)
    check("(ii) decode: position = seqlens_k[b] (= past length of row b)", ke < TOL and oe < TOL,
          f"K err {ke:.1e}, out err {oe:.1e}")
    ke, oe = go(m, [4], 3, 7, b=1)
    check("(iii) B=1 chunk: positions past..past+S-1", ke < TOL and oe < TOL, f"K err {ke:.1e}, out err {oe:.1e}")
    pid = np.array([[7, 8, 9, 10], [2, 3, 9, 9]], np.int64)
    ke1, _ = go(mp, [0, 0], 4, 4, n=[4, 2], ref_pos=pid, position_ids=pid)
    ke2, _ = go(mp, [0, 0], 4, 4, n=[4, 2], ref_pos=pid[0, 0] + np.tile(np.arange(4), (2, 1)), position_ids=pid)
    check("(i) first prompt + position_ids: only position_ids[0,0] is used, every row gets pid[0,0]+s",
          ke1 > 1e-2 and ke2 < TOL, f"K err per-element {ke1:.1e}, first-element {ke2:.1e}")
    dp = np.array([[11], [0]], np.int64)
    ke, oe = go(mp, [5, 3], 1, 6, ref_pos=dp, position_ids=dp)
    check("(ii) decode + position_ids [B,1]: honored per row", ke < TOL and oe < TOL, f"K err {ke:.1e}")
    cp = np.array([[9, 2, 20]], np.int64)
    ke, oe = go(mp, [4], 3, 7, b=1, ref_pos=cp, position_ids=cp)
    check("(iii) B=1 chunk + position_ids: honored per element (even non-monotonic)", ke < TOL and oe < TOL,
          f"K err {ke:.1e}")
    ke, oe = go(mpq, [0, 0], 4, 4, n=[4, 2], ref_pos=pid, position_ids=pid,
                query_seqlens=np.array([4, 2], np.int32))
    check("first prompt + position_ids + query_seqlens: honored per element", ke < TOL and oe < TOL,
          f"K err {ke:.1e}")
    st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=4)
    ok, t = expect_error(lambda: st.run(mp, 4, cos_cache=cos, sin_cache=sin, position_ids=pid[:1]),
                         "position_ids dimension 0 must be equal to the batch size")
    check("position_ids must be [B,S] (no broadcast of [1,S])", ok, t)
    c6, s6 = rope_cache(6, D)
    st = Step(rng, 1, Hq, Hkv, D, SM, past=[6], S=1)
    ok, t = expect_error(lambda: st.run(m, 7, cos_cache=c6, sin_cache=s6),
                         "cos_cache dimension 0 shall not be less than total_sequence_length")
    check("cos_cache rows must be >= total_sequence_length", ok, t)


def q1d_window(rng):
    print("\n### Q1d local_window_size")
    Hq, Hkv, D, SM, W = 4, 2, 8, 16, 4
    cases = (("prompt B=2 S=10 lens [10,7]", 2, [0, 0], 10, [10, 7], 10),
             ("decode B=2 past [9,6]", 2, [9, 6], 1, None, 10),
             ("B=1 chunk past 6 S=5", 1, [6], 5, None, 11))
    for lws in (W, W - 1):
        m = gqa_model(BASE, num_heads=Hq, kv_num_heads=Hkv, local_window_size=lws)
        for name, b, past, S, n, tsl in cases:
            st = Step(rng, b, Hq, Hkv, D, SM, past=past, S=S, n=n)
            st.run(m, tsl)
            e = {w: st.err(window=w) for w in (W - 1, W, W + 1)}
            best = min(e, key=e.get)
            check(f"local_window_size={lws} {name}: matches HF window W={lws} (key iff q-k < W)",
                  best == lws and e[best] < TOL, "errs " + ", ".join(f"W={w}:{v:.1e}" for w, v in e.items()))


def q1e_scale_softcap(rng):
    print("\n### Q1e scale / softcap")
    B, Hq, Hkv, D, SM = 2, 4, 2, 8, 12
    sc = 0.4
    m = gqa_model(BASE, num_heads=Hq, kv_num_heads=Hkv, scale=sc)
    for past, S, n, tsl in (([0, 0], 5, [5, 3], 5), ([6, 3], 1, None, 7)):
        st = Step(rng, B, Hq, Hkv, D, SM, past=past, S=S, n=n)
        st.run(m, tsl)
        check(f"scale={sc} ({'prompt' if S > 1 else 'decode'}): scores = scale * q.k", st.err(scale=sc) < TOL
              and st.err() > 1e-2, f"err {st.err(scale=sc):.1e}, vs default {st.err():.1e}")
    m = gqa_model(BASE, num_heads=Hq, kv_num_heads=Hkv, scale=sc, softcap=1.5)
    for past, S, n, tsl in (([0, 0], 5, [5, 3], 5), ([6, 3], 1, None, 7)):
        st = Step(rng, B, Hq, Hkv, D, SM, past=past, S=S, n=n)
        st.q_in *= 3
        st.run(m, tsl)
        e = st.err(scale=sc, softcap=1.5)
        e_no = st.err(scale=sc)
        e_after = st.err(scale=sc, softcap=1.5, softcap_after_mask=True)
        check(f"softcap=1.5 ({'prompt' if S > 1 else 'decode'}): softcap*tanh(scale*qk/softcap), then masking",
              e < TOL and e_no > 1e-2 and (S == 1 or e_after > 1e-2),
              f"err {e:.1e}; no-softcap {e_no:.1e}; softcap-after-mask {e_after:.1e}")
    m = gqa_model(BASE, num_heads=Hq, kv_num_heads=Hkv, softcap=1.5)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[6, 3], S=1)
    st.run(m, 7)
    check("softcap without scale attr uses 1/sqrt(D) inside tanh", st.err(softcap=1.5) < TOL)


def q1f_qknorm(rng):
    print("\n### Q1f q_norm_weight / k_norm_weight")
    Hq, Hkv, D, SM = 4, 2, 16, 8
    m = gqa_model(BASE | {"q_norm_weight", "k_norm_weight"}, num_heads=Hq, kv_num_heads=Hkv, qk_norm_epsilon=1e-6)
    session(m)  # session creation succeeds
    st = Step(rng, 1, Hq, Hkv, D, SM, past=[0], S=3)
    w = np.ones(D, np.float32)
    ok, t = expect_error(lambda: st.run(m, 3, q_norm_weight=w, k_norm_weight=w),
                         "q_norm_weight / k_norm_weight inputs are not supported")
    check("CPU: session builds, but Run fails when q_norm_weight/k_norm_weight are given", ok, t)
    # CPU alternative: explicit Reshape -> SimplifiedLayerNormalization(axis=-1) -> Reshape before GQA (do_rotary=1)
    cos, sin = rope_cache(16, D)
    I = lambda n, a: nh.from_array(a, n)
    qw, kw = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    Nd = oh.make_node
    nodes = [Nd("Reshape", ["q_in", "shq"], ["q1"]), Nd("SimplifiedLayerNormalization", ["q1", "qw"], ["q2"], axis=-1,
                                                        epsilon=1e-6), Nd("Reshape", ["q2", "sh3"], ["query"]),
             Nd("Reshape", ["k_in", "shk"], ["k1"]), Nd("SimplifiedLayerNormalization", ["k1", "kw"], ["k2"], axis=-1,
                                                        epsilon=1e-6), Nd("Reshape", ["k2", "sh3"], ["key"]),
             Nd("GroupQueryAttention", GQA_INPUTS[:9], ["output", "present_key", "present_value"],
                domain="com.microsoft", num_heads=Hq, kv_num_heads=Hkv, do_rotary=1)]
    inits = [I("qw", qw), I("kw", kw), I("cos_cache", cos), I("sin_cache", sin),
             I("shq", np.array([0, 0, Hq, D], np.int64)), I("shk", np.array([0, 0, Hkv, D], np.int64)),
             I("sh3", np.array([0, 0, -1], np.int64))]
    ins = [vi("q_in", F, 3), vi("k_in", F, 3)] + [vi(n, GQA_TYPES.get(n, F), GQA_RANK[n]) for n in GQA_INPUTS[2:7]]
    m2 = model_of(nodes, ins, [vi("output", F, 3), vi("present_key", F, 4), vi("present_value", F, 4)], inits)
    st = Step(rng, 2, Hq, Hkv, D, SM, past=[0, 0], S=3, n=[3, 2])
    f = st.feeds(3)
    f["q_in"], f["k_in"] = f.pop("query"), f.pop("key")
    out, _ = run_shared(m2, f, st.k, st.v)
    pos = np.tile(np.arange(3), (2, 1))
    Qn = rope_hf(rms_ref(heads(st.q_in, Hq), qw, 1e-6), pos, cos, sin)
    Kn = rope_hf(rms_ref(heads(st.k_in, Hkv), kw, 1e-6), pos, cos, sin)
    e = maxerr(out, st.ref(q=Qn, k_new=Kn), st.n)
    check("CPU alternative: Reshape[B,S,H,D] -> SimplifiedLayerNormalization(axis=-1, w[D]) -> Reshape, then GQA "
          "do_rotary=1 == per-head RMSNorm before RoPE (Qwen3); Gemma3: pass 1+w", e < TOL, f"err {e:.1e}")


def q1g_bias(rng):
    print("\n### Q1g causal / attention_bias")
    B, Hq, Hkv, D, SM = 2, 4, 2, 8, 12
    mb = lambda **a: gqa_model(BASE | {"attention_bias"}, num_heads=Hq, kv_num_heads=Hkv, **a)

    def img_bias(S, T, lo, hi, past=0, neg=-1e9):
        qp = past + np.arange(S)[:, None]
        kp = np.arange(T)[None]
        allow = (kp <= qp) | ((qp >= lo) & (qp < hi) & (kp >= lo) & (kp < hi))
        return np.where(allow, 0, neg).astype(np.float32)[None, None]

    S, n = 6, [6, 5]
    for neg in (-1e9, -np.inf):
        bias = img_bias(S, S, 1, 4, neg=neg)
        st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=S, n=n)
        st.run(mb(causal=0), S, attention_bias=bias)
        e0, e1 = st.err(causal=False, bias=bias), st.err(causal=True, bias=bias)
        check(f"prompt causal=0 + bias [1,1,S,S] ({neg}) image block 1..3 bidirectional: mask = bias only "
              f"(plus keys < seqlens_k+1)", e0 < TOL and e1 > 1e-2, f"err {e0:.1e}, vs bias+causal {e1:.1e}")
    bias = img_bias(S, S, 1, 4)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=S, n=n)
    st.run(mb(causal=1), S, attention_bias=bias)
    check("prompt causal=1 + bias: causal mask still applied (cannot open a bidirectional block)",
          st.err(causal=True, bias=bias) < TOL and st.err(causal=False, bias=bias) > 1e-2)
    rb = rng.standard_normal((B, Hq, S, S)).astype(np.float32)
    for shp, bb in (("[B,Hq,S,T]", rb), ("[1,Hq,S,T]", rb[:1]), ("[B,1,S,T]", rb[:, :1])):
        st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=S, n=n)
        st.run(mb(causal=1), S, attention_bias=bb)
        check(f"attention_bias {shp} additive float accepted", st.err(bias=bb) < TOL)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=S, n=n)
    ok, t = expect_error(lambda: st.run(mb(causal=1), S, attention_bias=np.zeros((1, 1, S, SM), np.float32)),
                         "attention_bias dimension 3 must be equal to total_sequence_length")
    check("bias last dim must equal total_sequence_length (not S_max)", ok, t)
    db = rng.standard_normal((B, 1, 1, 7)).astype(np.float32)
    for c in (1, 0):
        st = Step(rng, B, Hq, Hkv, D, SM, past=[6, 3], S=1)
        st.run(mb(causal=c), 7, attention_bias=db)
        check(f"decode shared buffer tsl=7, bias [B,1,1,7], causal={c}: exact, garbage ignored",
              st.err(bias=db, causal=bool(c)) < TOL, f"err {st.err(bias=db, causal=bool(c)):.1e}")
    for tsl in (9, SM):
        cb = img_bias(5, tsl, 5, 8, past=4)
        st = Step(rng, 1, Hq, Hkv, D, SM, past=[4], S=5)
        st.run(mb(causal=0), tsl, attention_bias=cb)
        check(f"B=1 chunk past=4 S=5 causal=0 bias [1,1,5,{tsl}] (image at 5..7): exact",
              st.err(causal=False, bias=cb) < TOL)
    mq = gqa_model(BASE | {"attention_bias", "query_seqlens"}, num_heads=Hq, kv_num_heads=Hkv, causal=0)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[4, 2], S=3)
    ok, t = expect_error(lambda: st.run(mq, SM, attention_bias=np.zeros((B, 1, 3, SM), np.float32),
                                        query_seqlens=np.array([3, 3], np.int32)), "query_seqlens requires causal=1")
    check("query_seqlens + causal=0 refused on CPU", ok, t)
    sb = (rng.standard_normal((1, 1, S, S)) * 3).astype(np.float32)
    st = Step(rng, B, Hq, Hkv, D, SM, past=[0, 0], S=S, n=n)
    st.run(mb(causal=1, softcap=1.0), S, attention_bias=sb)
    e = st.err(softcap=1.0, bias=sb)
    e_alt = st.err(softcap=1.0, bias=sb, bias_before_softcap=True)
    check("softcap then + bias (bias is not capped)", e < TOL and e_alt > 1e-2,
          f"err {e:.1e}; softcap(scores+bias) {e_alt:.1e}")
    for past, Sx, nx, tsl, bb in (([0, 0], S, n, S, rb), ([6, 3], 1, None, 7, db)):
        st = Step(rng, B, Hq, Hkv, D, SM, past=past, S=Sx, n=nx)
        st.run(mb(causal=1, local_window_size=3), tsl, attention_bias=bb)
        check(f"local_window_size=3 + bias ({'prompt' if Sx > 1 else 'decode'}): window and bias both applied",
              st.err(bias=bb, window=3) < TOL)
    ok, t = expect_error(lambda: session(mb(causal=0, local_window_size=3)),
                         "is_unidirectional_ || local_window_size_ == -1 was false")
    check("causal=0 with local_window_size != -1 refused at session creation", ok, t)


def q1h_dims(rng):
    print("\n### Q1h head dims / head counts")
    for Hq, Hkv, D in ((9, 3, 64), (4, 1, 256)):
        cos, sin = rope_cache(16, D)
        m = gqa_model(BASE | ROT, num_heads=Hq, kv_num_heads=Hkv, do_rotary=1)
        st = Step(rng, 2, Hq, Hkv, D, 10, past=[0, 0], S=5, n=[5, 3])
        st.run(m, 5, cos_cache=cos, sin_cache=sin)
        pos = np.tile(np.arange(5), (2, 1))
        e1 = maxerr(st.out, st.ref(q=rope_hf(heads(st.q_in, Hq), pos, cos, sin),
                                   k_new=rope_hf(heads(st.k_in, Hkv), pos, cos, sin)), st.n)
        st2 = Step(rng, 2, Hq, Hkv, D, 10, past=[5, 3], S=1)
        st2.run(m, 6, cos_cache=cos, sin_cache=sin)
        pos = st2.qpos()
        e2 = maxerr(st2.out, st2.ref(q=rope_hf(heads(st2.q_in, Hq), pos, cos, sin),
                                     k_new=rope_hf(heads(st2.k_in, Hkv), pos, cos, sin)), st2.n)
        check(f"Hq={Hq} Hkv={Hkv} D={D} with rotary: prompt and decode exact", e1 < 5 * TOL and e2 < 5 * TOL,
              f"errs {e1:.1e}, {e2:.1e}")
    res = {}
    for rot in (False, True):
        for D in (4, 8, 12, 24, 32, 40):
            m = gqa_model(BASE | (ROT if rot else set()), num_heads=2, kv_num_heads=1)
            st = Step(rng, 1, 2, 1, D, 6, past=[0], S=3)
            extra = dict(zip(("cos_cache", "sin_cache"), rope_cache(8, D))) if rot else {}
            try:
                st.run(m, 3, **extra)
                res[(rot, D)] = "ok"
            except Exception as e:  # noqa: BLE001
                res[(rot, D)] = "16" if "multiple of 16" in err_text(e) else "8" if "multiple of 8" in err_text(e) \
                    else err_text(e)[:40]
    check("head_size must be a multiple of 8; a multiple of 16 when cos/sin_cache are inputs (even do_rotary=0)",
          res == {(False, 4): "8", (False, 8): "ok", (False, 12): "8", (False, 24): "ok", (False, 32): "ok",
                  (False, 40): "ok", (True, 4): "8", (True, 8): "16", (True, 12): "8", (True, 24): "16",
                  (True, 32): "ok", (True, 40): "16"}, str({f"{'rot' if r else 'norot'}{d}": v for (r, d), v in res.items()}))
    m = gqa_model(BASE, num_heads=6, kv_num_heads=4)
    ok, t = expect_error(lambda: Step(rng, 1, 6, 4, 16, 6, past=[0], S=2).run(m, 2), "num_heads must be a multiple of kv_num_heads")
    check("num_heads % kv_num_heads != 0 refused", ok, t)


def q1i_row_view(rng):
    print("\n### Q1i past bound to one row of a bigger buffer")
    Hq, Hkv, D, SM, BM, r, past = 4, 2, 16, 10, 3, 1, 4
    m = gqa_model(BASE, num_heads=Hq, kv_num_heads=Hkv)
    K = rng.standard_normal((BM, Hkv, SM, D)).astype(np.float32)
    V = rng.standard_normal((BM, Hkv, SM, D)).astype(np.float32)
    K0 = K.copy()
    q = rng.standard_normal((1, 1, Hq * D)).astype(np.float32)
    k = rng.standard_normal((1, 1, Hkv * D)).astype(np.float32)
    out, _ = run_shared(m, dict(query=q, key=k, value=k, seqlens_k=np.array([past], np.int32),
                                total_sequence_length=np.array(past + 1, np.int32)), K[r:r + 1], V[r:r + 1])
    E = K0.copy()
    E[r, :, past] = heads(k, Hkv)[0, :, 0]
    e = np.abs(out - ref_attn(heads(q, Hq), K[r:r + 1], V[r:r + 1], np.array([[past]]), np.array([past + 1]))).max()
    check("view K[r:r+1] of a [3,Hkv,S_max,D] array: only row r slot past written, output exact",
          np.array_equal(K, E) and e < TOL, f"err {e:.1e}")


def q2_norms(rng):
    print("\n### Q2 SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization")
    H, eps = 48, 1e-5
    vif = lambda n, t=F: oh.make_tensor_value_info(n, t, None)
    x = (rng.standard_normal((2, 3, H)) * 4).astype(np.float32)
    g = rng.standard_normal(H).astype(np.float32)
    m = model_of([oh.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y", "isv"], axis=-1, epsilon=eps)],
                 [vif("x"), vif("g")], [vif("y"), vif("isv")], ms=False)
    y, isv = session(m).run(None, dict(x=x, g=g))
    xr = x.astype(np.float64)
    e = np.abs(y - rms_ref(x, g, eps)).max()
    check("SLN (default domain, opset-21 graph) fp32: y = x/sqrt(mean(x^2)+eps)*gamma; inv_std_var [B,S,1] fp32",
          e < TOL and isv.shape == (2, 3, 1) and isv.dtype == np.float32
          and np.abs(isv - 1 / np.sqrt((xr * xr).mean(-1, keepdims=True) + eps)).max() < 1e-6, f"err {e:.1e}")
    m = model_of([oh.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"])], [vif("x"), vif("g")], [vif("y")],
                 ms=False)
    xs = (rng.standard_normal((1, 1, H)) * 1e-3).astype(np.float32)
    y, = session(m).run(None, dict(x=xs, g=g))
    check("SLN default epsilon = 1e-5, default axis = -1",
          np.abs(y - rms_ref(xs, g, 1e-5)).max() / np.abs(y).max() < 1e-5
          and np.abs(y - rms_ref(xs, g, 1e-6)).max() / np.abs(y).max() > 1e-2)
    xb = (rng.standard_normal((1, 1, H)) * 300).astype(np.float16)
    m = model_of([oh.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=eps)],
                 [vif("x", TP.FLOAT16), vif("g", TP.FLOAT16)], [vif("y", TP.FLOAT16)], ms=False)
    y, = session(m).run(None, dict(x=xb, g=np.ones(H, np.float16)))
    r16 = rms_ref(xb, 1.0, eps).astype(np.float16)
    ulps = np.abs(y.view(np.int16).astype(int) - r16.view(np.int16).astype(int)).max()
    check("SLN fp16: accumulates in fp32 (|x|~300, sum x^2 overflows fp16; result finite, <= 1 fp16 ulp)",
          np.isfinite(y).all() and ulps <= 1, f"max ulp diff {ulps}")
    for with_bias in (False, True):
        ins = ["x", "s", "g"] + (["b"] if with_bias else [])
        m = model_of([oh.make_node("SkipSimplifiedLayerNormalization", ins, ["y", "mean", "isv", "sum"],
                                   domain="com.microsoft", epsilon=eps)],
                     [vif(n) for n in ins], [vif(n) for n in ("y", "mean", "isv", "sum")])
        s_ = rng.standard_normal(x.shape).astype(np.float32)
        b_ = rng.standard_normal(H).astype(np.float32)
        feeds = dict(x=x, s=s_, g=g, **({"b": b_} if with_bias else {}))
        y, mean, isv, sm = session(m).run(None, feeds)
        tot = x.astype(np.float64) + s_ + (b_ if with_bias else 0)
        check(f"SkipSLN{' + bias' if with_bias else ''}: out0 = RMSNorm(x+skip{'+bias' if with_bias else ''})*gamma, "
              f"out3 = x+skip{'+bias' if with_bias else ''} (pre-norm sum), out1 'mean' = zeros [B,S,1], "
              f"out2 = inv_std [B,S,1]",
              np.abs(y - rms_ref(tot, g, eps)).max() < 5 * TOL and np.abs(sm - tot).max() < TOL
              and mean.shape == (2, 3, 1) and not mean.any()
              and np.abs(isv - 1 / np.sqrt((tot * tot).mean(-1, keepdims=True) + eps)).max() < 1e-6)
    m = model_of([oh.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y", "", "", "sum"],
                               domain="com.microsoft", epsilon=eps)],
                 [vif(n, TP.FLOAT16) for n in ("x", "s", "g")], [vif(n, TP.FLOAT16) for n in ("y", "sum")])
    y, sm = session(m).run(None, dict(x=xb, s=xb, g=np.ones(H, np.float16)))
    check("SkipSLN fp16 large values: finite output, sum output = fp16(x+skip)",
          np.isfinite(y).all() and np.array_equal(sm, xb + xb))
    m = model_of([oh.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y"], domain="com.microsoft",
                               epsilon=eps)], [vif(n) for n in ("x", "s", "g")], [vif("y")])
    yb, = session(m).run(None, dict(x=x, s=x[:1], g=g))
    check("SkipSLN skip [1,S,H] with B=2 is broadcast",
          np.abs(yb - rms_ref(x.astype(np.float64) + x[:1], g, eps)).max() < 5 * TOL)
    y, = session(m).run(None, dict(x=x.reshape(6, H), s=x.reshape(6, H), g=g))
    check("SkipSLN accepts 2D [tokens,H]", np.abs(y - rms_ref(2 * x.reshape(6, H).astype(np.float64), g, eps)).max()
          < 5 * TOL)


def q3_rotary(rng):
    print("\n### Q3 RotaryEmbedding")
    B, S, H, D = 2, 5, 3, 16
    cos, sin = rope_cache(32, D)
    pid = np.array([[0, 1, 2, 3, 4], [7, 3, 9, 1, 0]], np.int64)
    x = rng.standard_normal((B, S, H * D)).astype(np.float32)
    X4 = heads(x, H)
    ref4 = rope_hf(X4, pid, cos, sin)
    ref3 = ref4.transpose(0, 2, 1, 3).reshape(B, S, H * D)
    vif = lambda n, t=F: oh.make_tensor_value_info(n, t, None)

    def rot(attrs, xin, p, domain="com.microsoft", opset=21, c=cos, s=sin):
        ins = ["x", "p", "c", "s"] if domain else ["x", "c", "s", "p"]
        if p is None:
            ins = ins[:3]
        m = model_of([oh.make_node("RotaryEmbedding", ins, ["y"], domain=domain, **attrs)],
                     [vif(n, TP.INT64 if n == "p" else F) for n in ins], [vif("y")], opset=opset, ms=bool(domain))
        feeds = dict(x=xin, c=c, s=s, **({"p": p} if p is not None else {}))
        try:
            return session(m).run(None, feeds)[0]
        except Exception as e:  # noqa: BLE001
            return "ERR " + err_text(e)[:400]

    def ok(y, r):
        return not isinstance(y, str) and np.abs(y - r).max() < TOL

    check("MS RotaryEmbedding 3D [B,S,H*D] + num_heads, position_ids [B,S], cos/sin [max_pos,D/2], "
          "interleaved=0 == HF rotate_half", ok(rot(dict(num_heads=H), x, pid), ref3))
    check("MS 3D without num_heads: head_size taken from cos_cache (2*dim1)", ok(rot({}, x, pid), ref3))
    check("MS 4D input is [B,H,S,D]", ok(rot({}, X4, pid), ref4))
    y = rot({}, np.ascontiguousarray(X4.transpose(0, 2, 1, 3)), pid)
    check("MS 4D [B,S,H,D] is NOT accepted as such (dim 2 read as sequence)",
          isinstance(y, str) and "position_ids' dimension 1 should be of size sequence_length" in y, str(y)[:120])
    y = rot(dict(num_heads=H), x, np.array([2], np.int64))
    check("MS position_ids of shape [1] = start offset: positions offset+s for every row",
          ok(y, rope_hf(X4, np.tile(2 + np.arange(S), (B, 1)), cos, sin).transpose(0, 2, 1, 3).reshape(B, S, H * D)))
    y = rot(dict(num_heads=H), x, pid[:1])
    check("MS position_ids [1,S] with B=2 refused", isinstance(y, str) and "dimension 0 should be of size batch_size" in y,
          str(y)[:120])
    check("MS interleaved=1 is a different convention", not ok(rot(dict(num_heads=H, interleaved=1), x, pid), ref3))
    cp, sp = rope_cache(32, 8)
    partial = np.concatenate([rope_hf(X4[..., :8], pid, cp, sp), X4[..., 8:]], -1).transpose(0, 2, 1, 3).reshape(B, S, H * D)
    check("MS partial rotary: rotary_embedding_dim=8 + num_heads, cos/sin [max_pos, 4]",
          ok(rot(dict(num_heads=H, rotary_embedding_dim=8), x, pid, c=cp, s=sp), partial))
    for opset in (23, 24):
        check(f"ai.onnx RotaryEmbedding-23, model opset {opset}: 4D [B,H,S,D] exact",
              ok(rot({}, X4, pid, domain="", opset=opset), ref4))
    check("ai.onnx RotaryEmbedding-23, model opset 23: 3D + num_heads exact",
          ok(rot(dict(num_heads=H), x, pid, domain="", opset=23), ref3))
    check("ai.onnx RotaryEmbedding, no position_ids, cos/sin [B,S,D/2]",
          ok(rot({}, X4, None, domain="", opset=23, c=cos[pid], s=sin[pid]), ref4))
    y = rot({}, X4, pid, domain="", opset=21)
    check("ai.onnx RotaryEmbedding in an opset-21 model: refused (No Op registered)",
          isinstance(y, str) and "No Op registered for RotaryEmbedding" in y, str(y)[y.find("No Op"):][:90])
    g = rng.standard_normal(48).astype(np.float32)
    m = model_of([oh.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-6)],
                 [vif("x"), vif("g")], [vif("y")], opset=23, ms=False)
    xx = rng.standard_normal((2, 3, 48)).astype(np.float32)
    check("(aside) ai.onnx RMSNormalization-23 runs on CPU", np.abs(session(m).run(None, dict(x=xx, g=g))[0]
                                                                     - rms_ref(xx, g, 1e-6)).max() < TOL)
    m = model_of([oh.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"])],
                 [oh.make_tensor_value_info("x", F, [2, 48]), oh.make_tensor_value_info("g", F, [48])],
                 [oh.make_tensor_value_info("y", F, [2, 48])], ms=False)
    try:
        onnx.checker.check_model(m)
        t = "passes"
    except Exception as e:  # noqa: BLE001
        t = str(e).splitlines()[0]
    check("(aside) onnx.checker rejects SimplifiedLayerNormalization in the default domain", "No Op registered" in t, t[:100])


def q4_optimizer(rng):
    print("\n### Q4 ORT_ENABLE_ALL graph optimizer")
    Hq, Hkv, D, SM, E = 4, 2, 16, 10, 32
    cos, sin = rope_cache(SM, D)
    I = lambda n, a: nh.from_array(a, n)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    inits = [I("ln1", w(E)), I("ln2", w(E)), I("Wq", w(E, Hq * D)), I("Wk", w(E, Hkv * D)), I("Wv", w(E, Hkv * D)),
             I("Wo", w(Hq * D, E)), I("qn", w(D)), I("kn", w(D)), I("cos", cos), I("sin", sin),
             I("shq", np.array([0, 0, Hq, D], np.int64)), I("shk", np.array([0, 0, Hkv, D], np.int64)),
             I("sh3", np.array([0, 0, -1], np.int64)), I("two", np.array(2.0, np.float32)),
             I("axes", np.array([-1], np.int64)), I("eps", np.array(1e-6, np.float32)),
             I("pos", np.arange(2, dtype=np.int64).reshape(1, 2))]
    Nd = oh.make_node
    nodes = [
        Nd("SimplifiedLayerNormalization", ["x", "ln1"], ["h"], axis=-1, epsilon=1e-6),
        Nd("MatMul", ["h", "Wq"], ["q0"]), Nd("MatMul", ["h", "Wk"], ["k0"]), Nd("MatMul", ["h", "Wv"], ["v"]),
        # Qwen3-style per-head q/k RMSNorm: Reshape -> SLN -> Reshape
        Nd("Reshape", ["q0", "shq"], ["q1"]), Nd("SimplifiedLayerNormalization", ["q1", "qn"], ["q2"], axis=-1, epsilon=1e-6),
        Nd("Reshape", ["q2", "sh3"], ["q"]),
        Nd("Reshape", ["k0", "shk"], ["k1"]), Nd("SimplifiedLayerNormalization", ["k1", "kn"], ["k2"], axis=-1, epsilon=1e-6),
        Nd("Reshape", ["k2", "sh3"], ["k"]),
        Nd("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                                   "cos", "sin"], ["attn", "present_key", "present_value"], domain="com.microsoft",
           num_heads=Hq, kv_num_heads=Hkv, do_rotary=1),
        Nd("MatMul", ["attn", "Wo"], ["o"]),
        Nd("SkipSimplifiedLayerNormalization", ["o", "x", "ln2"], ["y", "", "", "resid"], domain="com.microsoft",
           epsilon=1e-6),
        Nd("Add", ["y", "resid"], ["a"]), Nd("SimplifiedLayerNormalization", ["a", "ln2"], ["z"], axis=-1, epsilon=1e-6),
        # decomposed RMSNorm
        Nd("Pow", ["z", "two"], ["z2"]), Nd("ReduceMean", ["z2", "axes"], ["ms"], keepdims=1),
        Nd("Add", ["ms", "eps"], ["mse"]), Nd("Sqrt", ["mse"], ["rt"]), Nd("Div", ["z", "rt"], ["zn"]),
        Nd("Mul", ["zn", "ln2"], ["out"]),
        Nd("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["qr"], domain="com.microsoft", num_heads=Hq),
    ]
    vin = lambda n, t, s: oh.make_tensor_value_info(n, t, s)
    g = oh.make_graph(nodes, "layer",
                      [vin("x", F, [1, 2, E]), vin("past_key", F, ["B", Hkv, "P", D]), vin("past_value", F, ["B", Hkv, "P", D]),
                       vin("seqlens_k", TP.INT32, ["B"]), vin("total_sequence_length", TP.INT32, [])],
                      [vin("out", F, [1, 2, E]), vin("present_key", F, ["B", Hkv, "T", D]),
                       vin("present_value", F, ["B", Hkv, "T", D]), vin("qr", F, [1, 2, Hq * D])], inits)
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, 2, E)).astype(np.float32)
    outs, types = {}, {}
    with tempfile.TemporaryDirectory() as td:
        for lvl in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            p = os.path.join(td, f"{lvl}.onnx")
            s = session(model, getattr(ort.GraphOptimizationLevel, lvl), p)
            om = onnx.load(p)
            types[lvl] = Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in om.graph.node)
            gq = [n for n in om.graph.node if n.op_type == "GroupQueryAttention"]
            types[lvl + "_gqa_inputs"] = list(gq[0].input)
            kb = np.zeros((1, Hkv, SM, D), np.float32)
            vb = kb.copy()
            io = s.io_binding()
            io.bind_cpu_input("x", x)
            io.bind_cpu_input("seqlens_k", np.array([1], np.int32))
            io.bind_cpu_input("total_sequence_length", np.array(2, np.int32))
            for n, b in (("past_key", kb), ("past_value", vb)):
                io.bind_input(n, "cpu", 0, np.float32, list(b.shape), b.ctypes.data)
            for n in [o.name for o in s.get_outputs()]:
                b = {"present_key": kb, "present_value": vb}.get(n)
                if b is None:
                    io.bind_output(n, "cpu")
                else:
                    io.bind_output(n, "cpu", 0, np.float32, list(b.shape), b.ctypes.data)
            s.run_with_iobinding(io)
            outs[lvl] = io.get_outputs()[0].numpy()
    t = types["ORT_ENABLE_ALL"]
    print("   ORT_ENABLE_ALL node types:", dict(t))
    check("ENABLE_ALL keeps GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding "
          "(com.microsoft) as is", t["com.microsoft:GroupQueryAttention"] == 1
          and t["com.microsoft:SkipSimplifiedLayerNormalization"] == 1 and t["com.microsoft:RotaryEmbedding"] == 1)
    check("ENABLE_ALL on CPU does NOT fold Reshape->SLN->Reshape into GQA q/k_norm_weight (GQA inputs unchanged)",
          types["ORT_ENABLE_ALL_gqa_inputs"] == types["ORT_DISABLE_ALL_gqa_inputs"] and t["ai.onnx:Reshape"] == 4)
    check("ENABLE_ALL fuses decomposed Pow/ReduceMean/Add/Sqrt/Div/Mul into SimplifiedLayerNormalization; "
          "does NOT fuse Add+SLN into SkipSLN",
          t["ai.onnx:SimplifiedLayerNormalization"] == 5 and t["ai.onnx:Pow"] == 0 and t["ai.onnx:Add"] == 1,
          f"SLN {t['ai.onnx:SimplifiedLayerNormalization']}, Add {t['ai.onnx:Add']}")
    d = np.abs(outs["ORT_ENABLE_ALL"] - outs["ORT_DISABLE_ALL"]).max()
    check("optimized model runs with the shared-buffer binding; same output", d < 1e-5, f"diff {d:.1e}")


def main():
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}")
    for f in (q1_schema, q1a_shared_buffer, q1b_seqlens, q1c_rotary, q1d_window, q1e_scale_softcap, q1f_qknorm,
              q1g_bias, q1h_dims, q1i_row_view, q2_norms, q3_rotary, q4_optimizer):
        if f is q1_schema:
            f()
        else:
            f(rng)
    print(f"\n{N_FAIL} FAIL")
    return 1 if N_FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
