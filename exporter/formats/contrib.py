"""The fused form's primitives (exporter/ops.py, torch.ops.pop.*) as ONNX Runtime's contrib operators.

torch.onnx builds a node only for operators whose schema onnx knows, and onnx does not
know ONNX Runtime's own.  `register()` copies the schemas of the few operators we emit
from the installed onnxruntime into onnx's registry, once per process, so the exporter
and onnx's shape inference see them as ONNX Runtime defines them; `TRANSLATIONS` maps
each custom op to the operator.  What each operator does, measured against numpy:
docs/research/ort_contrib_ops.md.
"""
import functools

import torch
from onnxscript.values import Op, Opset

MS = Opset("com.microsoft", 1)
DEFAULT = Opset("", 1)
# (domain, operator): how many of its outputs we use.  The exporter gives a node every output its schema
# lists, so the schema is registered with these only: GroupQueryAttention refuses its optional fourth
# output (output_qk) unless asked for it.  ONNX Runtime registers SimplifiedLayerNormalization in the
# default domain.
OPERATORS = {("com.microsoft", "GroupQueryAttention"): 3, ("com.microsoft", "SkipSimplifiedLayerNormalization"): 4,
             ("com.microsoft", "RotaryEmbedding"): 1, ("com.microsoft", "MultiHeadAttention"): 1,
             ("", "SimplifiedLayerNormalization"): 1}


@functools.cache
def register():
    """Copies the operators' schemas from the installed onnxruntime into onnx.defs (idempotent)."""
    import onnx.defs as defs
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_schemas
    option = {"FormalParameterOption.Single": defs.OpSchema.FormalParameterOption.Single,
              "FormalParameterOption.Optional": defs.OpSchema.FormalParameterOption.Optional,
              "FormalParameterOption.Variadic": defs.OpSchema.FormalParameterOption.Variadic}

    def param(p):
        return defs.OpSchema.FormalParameter(p.name, p.typeStr, p.description, param_option=option[str(p.option)])
    wanted, done = OPERATORS, set()
    for s in ort_schemas.get_all_operator_schema():
        key = (s.domain, s.name)
        if key not in wanted or key in done:
            continue
        try:
            defs.get_schema(s.name, s.since_version, s.domain)
            done.add(key)  # already known (a previous registration)
            continue
        except defs.SchemaError:
            pass
        attributes = [defs.OpSchema.Attribute(name, getattr(defs.OpSchema.AttrType, str(a.type).split(".")[-1]),
                                              a.description, required=a.required)
                      for name, a in s.attributes.items()]
        defs.register_schema(defs.OpSchema(
            s.name, s.domain, s.since_version, s.doc or "", inputs=[param(i) for i in s.inputs],
            outputs=[param(o) for o in s.outputs[:wanted[key]]], attributes=attributes,
            type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description)
                              for c in s.type_constraints]))
        done.add(key)
    missing = set(wanted) - done
    if missing:
        raise RuntimeError(f"this onnxruntime does not define {sorted(missing)}")


def _gqa(q, k, v, past_k, past_v, seqlens, total, cos, sin, bias, positions, num_heads: int, kv_heads: int,
         scale: float, softcap: float, window: int):
    out, present_k, present_v = Op(MS, "GroupQueryAttention")(
        q, k, v, past_k, past_v, seqlens, total, cos, sin, positions, bias,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, softcap=softcap, local_window_size=window,
        do_rotary=0 if cos is None else 1, rotary_interleaved=0, causal=1 if bias is None else 0)
    return out, present_k, present_v


def _mha(q, k, v, bias, num_heads: int, scale: float):
    # inputs 3 and 4 (packed QKV bias, key padding mask) unused; 5 is the additive attention bias
    return Op(MS, "MultiHeadAttention")(q, k, v, None, None, bias, num_heads=num_heads, scale=scale)


def _skip_rms_norm(x, skip, gamma, eps: float):
    out, _, _, h = Op(MS, "SkipSimplifiedLayerNormalization")(x, skip, gamma, epsilon=eps, _num_outputs=4)
    return out, h


def _rms_norm(x, gamma, eps: float):
    return Op(DEFAULT, "SimplifiedLayerNormalization")(x, gamma, axis=-1, epsilon=eps, stash_type=1)


def _rotary(x, positions, cos, sin, num_heads: int):
    return Op(MS, "RotaryEmbedding")(x, positions, cos, sin, num_heads=num_heads, interleaved=0)


def translations():
    register()
    from pop.exporter import ops  # noqa: F401  (defines torch.ops.pop.*)
    return {torch.ops.pop.gqa.default: _gqa, torch.ops.pop.skip_rms_norm.default: _skip_rms_norm,
            torch.ops.pop.rms_norm.default: _rms_norm, torch.ops.pop.rotary.default: _rotary,
            torch.ops.pop.mha.default: _mha}
