"""Weight-only block quantization (round to nearest, symmetric or with zero points) for the ONNX Runtime graphs.

One grid, used twice:

- fake_quantize(modules) puts every text-side nn.Linear weight (the decoder layers, the output matrix and
  with it a tied embedding, fitted KV heads) on the quantization grid in place, before tracing.  The
  PyTorch reference that verification runs is then the model with exactly the dequantized weights,
  so a graph bug cannot hide behind quantization noise; the quantization error itself is what
  pop-eval measures against the fp32 model.
- rewrite(model) turns each MatMul against such a weight into ONNX Runtime's com.microsoft
  MatMulNBits, and a Gather from a tied table into GatherBlockQuantized over the same bytes, so the
  output matrix and the embedding are stored once.  A weight is rewritten only when fake_quantize put
  its rows on the grid: it returns each row's scales and zero points, by the row's bytes (the graphs
  pack some weights side by side, Q/K/V and gate/up, which keeps rows whole), and the rewrite takes them
  from there rather than deriving them again (a grid is not always what requantizing its own values
  gives: with zero points, a block whose ends fall on half steps shrinks by one code).

Layout (ONNX Runtime's contrib operators, uint8 form): a [K, N] weight is stored as its transpose,
N rows of K values cut into blocks of `block` along K; 4-bit values are packed two to a byte, the
first in the low nibble; each block has one float scale.  Symmetric (the default): no zero-point input,
the zero point is 2^(bits-1), so a value q stored as u reads (u - 2^(bits-1)) * scale.  Asymmetric: each
block also has its own zero point z (packed like the values, one row's blocks together), u reads
(u - z) * scale, and the block's range [min, max] (stretched to hold 0) spans all 2^bits codes, so a block
of skewed values loses less to rounding.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pop.runtime.errors import PopError

WEIGHTS = ("fp32", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
# The grid when --weights-block and --weights-asymmetric are not given.  4 bits: blocks of 64 with a zero
# point each.  On both real models this decodes in 0.92 of the time of blocks of 32 without (the decode
# graph reads about 4.6 bits a weight instead of 5, and MLAS applies half the scales), 0.85-0.87 of
# onnxruntime-genai int4's, and rounds closer by KL and perplexity (the zero points win back more than the
# longer blocks lose; gemma3-270m's first-token top-1 agreement is a little lower); benchmarks/int4-blocks.
# 8 bits: blocks of 32, symmetric, whose error pop-eval barely tells from fp32's.
DEFAULT_BLOCK = {"int8": 32, "int4": 64}
DEFAULT_ASYMMETRIC = {"int8": False, "int4": True}
MS = "com.microsoft"


# --weights-compute: the graphs whose MatMulNBits take int8 activations (accuracy_level 4, int32 sums)
# instead of computing in fp32 (level 1).  int8-decode keeps fp32 products in POP's prefill graph.
COMPUTE = {"fp32": (), "int8": ("prefill", "decode"), "int8-decode": ("decode",), "int8-gemm": ("decode",)}
INT8_LEVEL = 4
# ... and the graphs whose products become integer GEMMs instead (integer_products): int8-gemm's prefill graph,
# and "prompt", a copy of the decode graph that runs full mode's prompt (calls of more than one token)
INTEGER = {"int8-gemm": ("prefill", "prompt")}


def default_compute(weights: str, dtype: str = "float32") -> str:
    """--weights-compute when none is given: the faster choice measured on this project's CPU
    (benchmarks/quantized).  8-bit weights with fp32 products have no fast kernel in ONNX Runtime 1.32's MLAS
    (decode 15-43x slower than with int8 activations).  4-bit weights decode 1.3-1.5x faster with int8
    activations; in a prompt's products they are faster from Llama-3.2-1B's sizes up (0.77-0.81 of fp32
    products' time at Llama-3.2-1B and Llama-3-8B shapes, benchmarks/quantized/levels) and about even on the
    two small real models (gemma3-270m's POP prompt 5% faster, smollm2-135m's 0-4% slower; first-token
    KL within 4% of fp32 products').  So both take int8 activations in both graphs, as onnxruntime-genai's
    CPU int4 does.  4-bit weights go further: POP's prefill graph and full mode's prompt run integer GEMMs
    (int8-gemm: 0.26-0.39 of fp32 products' time at prompt shapes; POP's prompt in 0.55-0.81 of int8's time on
    both real models) for POP's first-token KL 1-4% above int8's on gemma3-270m and within noise on
    smollm2-135m, and more resident memory (benchmarks/int8-gemm).  8-bit weights, chosen for fidelity, keep
    int8.  float16 graphs (for the GPU)
    compute in float16."""
    if dtype != "float32":
        return "fp32"
    return {"int8": "int8", "int4": "int8-gemm"}.get(weights, "fp32")  # scheme_for judges unknown weights


@dataclass(frozen=True)
class Scheme:
    bits: int
    block: int = 32
    int8_graphs: tuple = ()  # graphs switched to int8 activations after they verified with fp32 products
    symmetric: bool = True  # False: a zero point per block (MatMulNBits' and GatherBlockQuantized's zero_points)
    keep_embedding: bool = False  # the output matrix (and a tied embedding) stays in the export's dtype
    dtype: str = "float32"  # the graphs' float type, and so the scales': "float32" or "float16"
    integer_graphs: tuple = ()  # graphs whose products become integer GEMMs after they verified (int8-gemm)

    @property
    def qmax(self):
        return 2 ** (self.bits - 1) - 1

    @property
    def zero(self):
        return 2 ** (self.bits - 1)

    @property
    def levels(self):
        return 2 ** self.bits - 1


def scheme_for(weights: str, block: int = 32, compute: str = "fp32", symmetric: bool = True,
               keep_embedding: bool = False, dtype: str = "float32"):
    if weights not in WEIGHTS:
        raise PopError(f"unknown --weights {weights!r}; use one of {', '.join(WEIGHTS)}")
    if block not in (16, 32, 64, 128, 256):
        raise PopError(f"--weights-block must be 16, 32, 64, 128 or 256, got {block}")
    if compute not in COMPUTE:
        raise PopError(f"--weights-compute takes {' or '.join(COMPUTE)}, got {compute!r}")
    return None if weights == "fp32" else Scheme(BITS[weights], block, COMPUTE[compute], symmetric, keep_embedding,
                                                 dtype, INTEGER.get(compute, ()))


def set_accuracy_level(path, level):
    """Sets every MatMulNBits of the graph file at `path` to `level`; its weights (external) are untouched."""
    import onnx

    from pop.runtime.backends.ort import set_accuracy_level as patch
    onnx.save(patch(onnx.load(str(path), load_external_data=False), level), str(path))


# --- the grid, in numpy (what the graphs store) --------------------------------------------------

def quantize(rows: np.ndarray, s: Scheme):
    """rows [N, K] float32 -> (codes [N, nb, block] uint8, scales [N, nb] float32, zero points [N, nb] uint8);
    K padded with zeros.  Symmetric: every zero point is 2^(bits-1)."""
    n, k = rows.shape
    nb = -(-k // s.block)
    padded = np.zeros((n, nb * s.block), np.float32)
    padded[:, :k] = rows
    blocks = padded.reshape(n, nb, s.block)
    if s.symmetric:
        scales = _representable(np.abs(blocks).max(-1) / np.float32(s.qmax), s)
        zeros = np.full(scales.shape, s.zero, np.float32)
        low, high = -s.qmax - 1 + s.zero, s.qmax + s.zero
    else:
        # the range holds 0 so that a zero weight (and the padding) stays exactly 0
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scales = _representable((hi - lo) / np.float32(s.levels), s)
        zeros = np.clip(np.rint(-lo / np.where(scales > 0, scales, np.float32(1))), 0, s.levels)
        low, high = 0, s.levels
    safe = np.where(scales > 0, scales, np.float32(1))
    codes = np.clip(np.rint(blocks / safe[..., None]) + zeros[..., None], low, high)
    return codes.astype(np.uint8), scales, zeros.astype(np.uint8)


def _representable(scales, s: Scheme):
    """Scales as the graphs store them (float16 graphs take float16 scales), back in float32."""
    return scales.astype(s.dtype).astype(np.float32)


def dequantize(codes, scales, zeros, k):
    rows = (codes.astype(np.float32) - zeros[..., None].astype(np.float32)) * scales[..., None]
    return rows.reshape(rows.shape[0], -1)[:, :k]


def pack(codes: np.ndarray, s: Scheme):
    """[N, nb, block] codes -> [N, nb, block * bits / 8] bytes (4 bits: two per byte, low nibble first)."""
    if s.bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def pack_zeros(zeros: np.ndarray, s: Scheme):
    """[N, nb] zero points -> [N, ceil(nb * bits / 8)] bytes: 4 bits two per byte, low nibble first, each
    row padded to whole bytes (the layout of MatMulNBits' and GatherBlockQuantized's zero_points)."""
    if s.bits == 8:
        return zeros
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.zeros((zeros.shape[0], 1), np.uint8)], axis=1)
    return (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)


def digests(rows: np.ndarray):
    """The key of each row's grid: its K values as float32 (a float16 weight upcast)."""
    rows = np.ascontiguousarray(rows, np.float32)
    return [hashlib.sha1(r.tobytes()).digest() for r in rows]


def known_grid(rows, grids):
    """(scales, zeros, the rows' digests) of rows [N, K] whose every row fake_quantize made, else None."""
    keys = digests(rows)
    found = [grids.get(key) for key in keys]
    if any(f is None for f in found):
        return None
    return np.stack([f[0] for f in found]), np.stack([f[1] for f in found]), keys


def codes_on(rows, scales, zeros, s: Scheme):
    """The codes of `rows` [N, K] on a known grid (scales and zero points [N, nb]); None when a value is off it
    by more than float16 rounding, which a weight that fake_quantize made never is."""
    n, k = rows.shape
    nb = scales.shape[1]
    padded = np.zeros((n, nb * s.block), np.float32)
    padded[:, :k] = rows
    steps = padded.reshape(n, nb, s.block) / np.where(scales > 0, scales, np.float32(1))[..., None]
    codes = np.rint(steps) + zeros[..., None]
    if np.abs(steps - np.rint(steps)).max() > 0.05 or codes.min() < 0 or codes.max() > s.levels:
        return None
    return codes.astype(np.uint8)


# --- the model ---------------------------------------------------------------------------------

def fake_quantize(modules, s: Scheme):
    """Puts the weight of every nn.Linear in `modules` on the grid, in place (a tied embedding follows
    its output matrix, being the same tensor), through the same quantize() the graphs' bytes come from.
    Returns how many weights and values were quantized, and the grids: {digest of the weight as the
    model now holds it, row by row: (scales, zero points) of the row}, for rewrite()."""
    import torch
    seen, count, values, grids = set(), 0, 0, {}
    with torch.no_grad():
        for m in modules:
            for linear in (x for x in m.modules() if isinstance(x, torch.nn.Linear)):
                w = linear.weight
                if id(w) in seen:
                    continue
                seen.add(id(w))
                codes, scales, zeros = quantize(w.detach().float().numpy(), s)
                w.copy_(torch.from_numpy(dequantize(codes, scales, zeros, w.shape[1])).to(w.dtype))
                grids.update(zip(digests(w.detach().float().numpy()), zip(scales, zeros)))
                count, values = count + 1, values + w.numel()
    return count, values, grids


def text_modules(adapter, heads=None, keep_embedding=False):
    """The modules whose Linear weights are quantized: the decoder layers, the output matrix (unless kept in
    float32, and with it a tied embedding), fitted heads.  Vision towers keep their precision."""
    out = [adapter.layers] + ([] if keep_embedding else [adapter.hf.lm_head])
    return out + ([heads] if heads is not None else [])


# --- the graphs ---------------------------------------------------------------------------------

def rewrite(model, s: Scheme, grids: dict):
    """MatMul against a weight fake_quantize put on the grid (`grids`, its return) -> MatMulNBits; Gather from
    such a table -> GatherBlockQuantized.  Returns {"matmuls": n, "gathers": n, "weights": {digests used}}."""
    import onnx_ir as ir
    graph = model.graph
    made = {"matmuls": 0, "gathers": 0, "weights": set()}
    cache = {}  # (initializer name, transposed) -> (packed, scales, packed zero points) or None

    def grid(value, transposed):
        """(packed, scales, zeros) of an initializer's rows ([N, K]: its transpose when `transposed`), or None."""
        key = (value.name, transposed)
        if key not in cache:
            array = value.const_value.numpy() if value.const_value is not None else None
            cache[key] = None
            # rows of at least one block (N may be smaller: a small model's K/V heads at blocks of 64)
            if array is not None and array.dtype == s.dtype and array.ndim == 2 \
                    and array.shape[0 if transposed else 1] >= s.block:
                rows = np.ascontiguousarray(array.T if transposed else array, np.float32)
                known = known_grid(rows, grids)
                codes = None if known is None else codes_on(rows, known[0], known[1], s)
                if codes is not None:
                    made["weights"].update(known[2])
                    cache[key] = (pack(codes, s), known[0].astype(s.dtype), pack_zeros(known[1], s))
        return cache[key]

    def product(a, weight, transposed):
        """MatMulNBits for a @ W, W the initializer (transposed: stored [K, N]; else [N, K]), or None."""
        q = grid(weight, transposed)
        if q is None:
            return None
        packed, scales, zeros = q
        n, k = packed.shape[0], weight.const_value.shape[0 if transposed else 1]
        name = f"{weight.name}{'.T' if transposed else ''}"  # one weight read both ways packs two ways
        b = initializer(f"{name}.q{s.bits}", packed)
        sc = initializer(f"{name}.scales", scales.reshape(-1))
        zp = [] if s.symmetric else [initializer(f"{name}.zeros", zeros.reshape(-1))]
        return ir.node("MatMulNBits", [a, b, sc, *zp], domain=MS, version=1,
                       attributes={"K": k, "N": n, "bits": s.bits, "block_size": s.block,
                                   "accuracy_level": 1})  # the verified form; export.py may change it after

    def initializer(name, array):
        if name in graph.initializers:  # a weight that two products read
            return graph.initializers[name]
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(v)
        return v

    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].is_initializer():
            new = product(node.inputs[0], node.inputs[1], transposed=True)
            if new is None:
                continue
            made["matmuls"] += 1
        elif node.op_type == "Gemm" and len(node.inputs) == 2 and node.inputs[1].is_initializer() \
                and node.attributes.get_float("alpha", 1.0) == 1.0 and not node.attributes.get_int("transA", 0):
            # the output matrix of a single-position step: A @ table^T, the table tied to the embedding
            new = product(node.inputs[0], node.inputs[1], transposed=not node.attributes.get_int("transB", 0))
            if new is None:
                continue
            made["matmuls"] += 1
        elif node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].is_initializer():
            table = node.inputs[0]
            axis = node.attributes.get_int("axis", 0)
            if axis != 0 or table.const_value.shape[1] % s.block:
                continue
            q = grid(table, transposed=False)
            if q is None:
                continue
            packed, scales, zeros = q
            v, d = table.const_value.shape
            # the same bytes as the output product's weight, scales and zero points, in the shapes a gather
            # takes: weights.bin stores them once (formats/onnx.py shares tensors by content)
            data = initializer(f"{table.name}.q{s.bits}.rows", packed.reshape(v, d * s.bits // 8))
            sc = initializer(f"{table.name}.scales.rows", scales)
            zp = [] if s.symmetric else [initializer(f"{table.name}.zeros.rows", zeros)]
            new = ir.node("GatherBlockQuantized", [data, node.inputs[1], sc, *zp], domain=MS, version=1,
                          attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": s.block,
                                      "bits": s.bits})
            made["gathers"] += 1
        else:
            continue
        new.outputs[0].name, old_name = None, node.outputs[0].name
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        new.outputs[0].name = old_name
    _drop_unused_initializers(graph)
    if made["matmuls"] or made["gathers"]:
        model.opset_imports.setdefault(MS, 1)
    return made


def _drop_unused_initializers(graph):
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


# --- integer products (--weights-compute int8-gemm) ------------------------------------------------

INTEGER_CONSTANTS = {  # the initializers integer_product's nodes read, once per graph
    "int8gemm.axes": np.array([-1], np.int64),
    "int8gemm.inv127": np.float32(1 / 127),
    "int8gemm.tiny": np.float32(1e-30),  # an all-zero token: scale tiny, codes 0, product 0
    "int8gemm.128": np.float32(128),
    "int8gemm.zero": np.uint8(128),
}


def integer_product(a, weight, scale, out, bias=None):
    """The nodes of out = a @ (weight [K, N] int8 * scale [N]) (+ bias) with a quantized per token: per row of a,
    s = max |a| / 127 and codes round(a / s) + 128 as uint8 (zero point 128), then MatMulInteger, whose int32
    sums are scaled back by s x scale.  uint8 activations because MLAS has its fast (VNNI) kernels for
    uint8 x int8; int8 x int8 ran 4x slower than fp32 here."""
    from onnx import TensorProto, helper
    p = f"{out}.int8gemm"
    y = out if bias is None else p + ".y"
    return [
        helper.make_node("ReduceMax", [a, "int8gemm.axes"], [p + ".max"], keepdims=1),
        helper.make_node("ReduceMin", [a, "int8gemm.axes"], [p + ".min"], keepdims=1),
        helper.make_node("Neg", [p + ".min"], [p + ".negmin"]),
        helper.make_node("Max", [p + ".max", p + ".negmin", "int8gemm.tiny"], [p + ".amax"]),
        helper.make_node("Mul", [p + ".amax", "int8gemm.inv127"], [p + ".scale"]),
        helper.make_node("Div", [a, p + ".scale"], [p + ".steps"]),
        helper.make_node("Round", [p + ".steps"], [p + ".rounded"]),  # half to even, as QuantizeLinear
        helper.make_node("Add", [p + ".rounded", "int8gemm.128"], [p + ".shifted"]),
        helper.make_node("Cast", [p + ".shifted"], [p + ".a8"], to=TensorProto.UINT8),
        helper.make_node("MatMulInteger", [p + ".a8", weight, "int8gemm.zero"], [p + ".i32"]),
        helper.make_node("Cast", [p + ".i32"], [p + ".f32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [p + ".f32", scale], [p + ".cols"]),
        helper.make_node("Mul", [p + ".cols", p + ".scale"], [y]),
    ] + ([helper.make_node("Add", [y, bias], [out])] if bias is not None else [])


def integer_products(path, s: Scheme, weights_file: str, graph_name: str, skip_n=None):
    """Every MatMulNBits of the graph file at `path` (the manifest's graph `graph_name`), but those with skip_n outputs,
    -> an integer GEMM, in place.  Returns (the manifest's DerivedTensor entries, how many products became integer
    GEMMs, how many stayed MatMulNBits).

    On this project's CPU, MatMulNBits with int8 activations runs a prompt's products no faster than fp32
    MatMul, while MLAS's integer GEMM (MatMulInteger) runs them in 0.26-0.39 of fp32's time
    (benchmarks/int8-gemm).  Each product becomes integer_product's nodes: int8 activations per token, not
    per tensor, so that one token's large activations (an attention sink's) cost the others no precision.
    W8 and its scales are initializers at the external data location "derived": the runtime computes them
    at load from the same MatMulNBits weight the decode graph reads (runtime/backends/derived.py), so the
    folder stores each weight once."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pop.runtime.backends.derived import DERIVED, int8_per_channel
    from pop.runtime.manifest import DerivedTensor
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if graph.node and any(o.domain in ("", "ai.onnx") and o.version < 13 for o in model.opset_import):
        raise ValueError("integer_products needs opset 13 or later (ReduceMax with axes as an input)")
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in INTEGER_CONSTANTS.items())

    def derived(name, dtype, dims):
        t = TensorProto(name=name, data_type=dtype, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", DERIVED), ("offset", "0"), ("length", "0")):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    stored = {t.name: t for t in graph.initializer}

    def offset(name):
        """Where an initializer lies in the weights file, or None where the graph holds it (a small one)."""
        info = {e.key: e.value for e in stored[name].external_data}
        if stored[name].data_location != TensorProto.EXTERNAL:
            return None
        if info.get("location") != weights_file:
            raise ValueError(f"{name} is in {info.get('location')}, not {weights_file}")
        return int(info.get("offset", 0))

    def array(name):
        where = offset(name)
        if where is None:
            return numpy_helper.to_array(stored[name]).reshape(-1).view(np.uint8)
        length = int({e.key: e.value for e in stored[name].external_data}["length"])
        return np.fromfile(Path(path).parent / weights_file, np.uint8, length, offset=where)

    made, at_load, nodes = {}, [], []  # codes name -> (int8 weight, scale) names; what the runtime derives
    integer = kept = 0  # products rewritten, and left to MatMulNBits
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != MS:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        a, codes, scales = node.input[:3]
        zeros = node.input[3] if len(node.input) > 3 and node.input[3] else None
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        if len(node.input) > 4 and node.input[4]:
            raise ValueError(f"{node.name}: MatMulNBits with g_idx has no integer form here")
        k, n = attrs["K"], attrs["N"]
        if n == skip_n:
            nodes.append(node)
            kept += 1
            continue
        if codes not in made:
            sources = [codes, scales] + ([zeros] if zeros else [])
            made[codes] = names = (f"{codes}.int8", f"{codes}.int8_scale")
            where = [offset(x) for x in sources]
            if None in where:
                # a weight small enough for the graph to hold it: its int8 form is held there too, made now
                weight, scale = int8_per_channel(array(codes), array(scales).view(np.float32),
                                                 None if zeros is None else array(zeros), k, n, s.bits, s.block)
                graph.initializer.extend([numpy_helper.from_array(weight, names[0]),
                                          numpy_helper.from_array(scale, names[1])])
            else:
                at_load.append(DerivedTensor(*names, k, n, where[0], where[1], where[2] if zeros else None,
                                             graph_name))
                graph.initializer.extend([derived(names[0], TensorProto.INT8, [k, n]),
                                          derived(names[1], TensorProto.FLOAT, [n])])
        weight_name, scale_name = made[codes]
        nodes += integer_product(a, weight_name, scale_name, node.output[0], bias)
        integer += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for nd in graph.node for i in nd.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save(model, str(path))
    return at_load, integer, kept

