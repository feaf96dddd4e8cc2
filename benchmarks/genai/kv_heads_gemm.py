"""Would one matrix product for all pruned layers' KV heads make POP's prefill shorter?  The shapes of
smollm2-135m's POP prefill graph: 10 pruned layers, each an RMS norm with its own weight and K and V products of
576 x 192 (as exported), against one RMS norm and one product of 576 x 3840 whose columns fold each layer's norm
weight into its matrices (norm_l(h) W = (h / rms(h)) diag(g_l) W).  Random weights, ONNX Runtime's CPU
provider, 2 threads, alternated, medians of 12 after 3.

    .venv/bin/python benchmarks/genai/kv_heads_gemm.py 1024
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

T, D, N, L = int(sys.argv[1]) if len(sys.argv) > 1 else 1024, 576, 192, 10
rng = np.random.default_rng(0)
W = [rng.standard_normal((D, N), np.float32) * 0.05 for _ in range(2 * L)]
G = [rng.standard_normal(D).astype(np.float32) for _ in range(L)]
X = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, T, D])



def model(nodes, inits, outs):
    g = helper.make_graph(nodes, "g", [X], outs, inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets).SerializeToString()


nodes, inits, outs = [], [], []
for l in range(L):
    inits.append(numpy_helper.from_array(G[l], f"g{l}"))
    nodes.append(helper.make_node("SimplifiedLayerNormalization", ["h", f"g{l}"], [f"n{l}"], epsilon=1e-5, axis=-1))
    for kv in range(2):
        inits.append(numpy_helper.from_array(W[2 * l + kv], f"w{l}{kv}"))
        nodes.append(helper.make_node("MatMul", [f"n{l}", f"w{l}{kv}"], [f"o{l}{kv}"]))
        outs.append(helper.make_tensor_value_info(f"o{l}{kv}", TensorProto.FLOAT, [1, T, N]))
separate = model(nodes, inits, outs)

folded = np.concatenate([G[l][:, None] * W[2 * l + kv] for l in range(L) for kv in range(2)], axis=1)
nodes = [helper.make_node("SimplifiedLayerNormalization", ["h", "one"], ["n"], epsilon=1e-5, axis=-1),
         helper.make_node("MatMul", ["n", "w"], ["all"]),
         helper.make_node("Split", ["all"], [f"o{i}" for i in range(2 * L)], axis=-1, num_outputs=2 * L)]
inits = [numpy_helper.from_array(np.ones(D, np.float32), "one"), numpy_helper.from_array(folded, "w")]
outs = [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, [1, T, N]) for i in range(2 * L)]
fused = model(nodes, inits, outs)



def session(m):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m, o, providers=["CPUExecutionProvider"])


s1, s2 = session(separate), session(fused)
h = rng.standard_normal((1, T, D)).astype(np.float32)
a, b = s1.run(None, {"h": h}), s2.run(None, {"h": h})
print("max diff", max(float(np.abs(x - y).max()) for x, y in zip(a, b)))
times = {"separate": [], "folded": []}
for r in range(15):
    for name, s in (("separate", s1), ("folded", s2)) if r % 2 else (("folded", s2), ("separate", s1)):
        t = time.perf_counter(); s.run(None, {"h": h}); times[name].append((time.perf_counter() - t) * 1e3)
for k, v in times.items():
    print(k, "median ms", round(float(np.median(v[3:])), 2), "min", round(min(v), 2))
print("GFLOP", 2 * T * D * N * 2 * L / 1e9)
