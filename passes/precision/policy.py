"""Which ops may compute in fp16/bf16, which keep fp32, and which of their tensors follow.

Three kinds of op, by what reduced precision does to them:

- **sensitive** (:data:`SENSITIVE`): their result depends on sums over many elements
  or on an exponential's range — reductions and norm statistics, Softmax/LogSoftmax,
  Exp/Log/Pow, cumulative ops, Range (Resize converts its data; its scales, sizes and
  roi stay fp32 by the slot rule below). They keep fp32
  (in ``auto`` mode they are candidates the search may convert when the tolerance
  allows). Fused norms and attention (LayerNormalization, RMSNormalization,
  SkipLayerNormalization, Attention, ...) are *not* sensitive: ONNX and ORT define their
  statistics in fp32 (``stash_type=1``) whatever the input type, so they convert as a
  whole and keep the statistics fp32 inside — which is why gcomp converts after fusion.
- **compute** (:data:`COMPUTE`): MatMul, Gemm, Conv and fused matmuls: the reason to use
  fp16. Forced to the low precision (unless blocked) so their weights halve.
- everything else is **free**: elementwise and data-movement ops go wherever they need
  the fewest Casts (the min cut decides; see :mod:`.assign`).

Which inputs/outputs of a node change type follows the op's ONNX schema: the type
parameters of the node that allow the target type convert together; fixed
``tensor(float)`` slots (Resize scales) and the statistics parameters listed in
:data:`KEEP_FP32_PARAMS` stay fp32. An op without a schema in a domain gcomp does not
know keeps fp32.
"""

from __future__ import annotations

__all__ = [
    "COMPUTE",
    "CONTRIB_SLOTS",
    "DATA_MOVEMENT",
    "KEEP_FP32_PARAMS",
    "SENSITIVE",
    "Slots",
    "node_slots",
    "same_type_inputs",
]

from dataclasses import dataclass
from functools import lru_cache

import onnx_ir as ir

SENSITIVE = frozenset({
    # reductions and statistics
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "GlobalAveragePool", "GlobalLpPool", "LpNormalization",
    "MeanVarianceNormalization",
    # exponentials and their range
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Softplus",
    # cumulative and index-producing arithmetic (Resize/Upsample are not here: their data
    # converts, and their scales/sizes/roi slots stay fp32 by the schema rule below)
    "CumSum", "CumProd", "Range",
    # norms that are not fused into a stash_type=1 op
    "InstanceNormalization", "GroupNormalization",
})

COMPUTE = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention",
    "FusedMatMul", "FusedConv", "GroupQueryAttention", "Einsum",
})

DATA_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Slice", "Gather", "GatherElements", "GatherND", "Concat",
    "Split", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Identity", "Tile", "Pad",
    "SpaceToDepth", "DepthToSpace",
})

# (op_type, type parameter) pairs that stay fp32 although the schema would allow fp16:
# norm statistics outputs and coordinates.
KEEP_FP32_PARAMS = frozenset({
    ("LayerNormalization", "U"),
    ("RMSNormalization", "V"),
    ("Resize", "T2"),
    ("Pow", "T1"),
    ("Dropout", "T1"),
    ("SkipLayerNormalization", "U"),
    ("SkipSimplifiedLayerNormalization", "U"),
    ("SimplifiedLayerNormalization", "U"),
})

# com.microsoft ops (no schema in onnx.defs): input/output positions that follow the
# node's precision. Statistics outputs (mean, inv_std) are left out on purpose.
CONTRIB_SLOTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "SkipLayerNormalization": ((0, 1, 2, 3, 4), (0, 3)),
    "SkipSimplifiedLayerNormalization": ((0, 1, 2, 3), (0, 3)),
    "SimplifiedLayerNormalization": ((0, 1), (0,)),
    "FusedMatMul": ((0, 1), (0,)),
    "BiasGelu": ((0, 1), (0,)),
    "FastGelu": ((0, 1), (0,)),
    "Gelu": ((0,), (0,)),
    "QuickGelu": ((0,), (0,)),
    "BiasAdd": ((0, 1, 2), (0,)),
    "Attention": ((0, 1, 2, 5, 7), (0, 1)),
    "MultiHeadAttention": ((0, 1, 2, 3, 6, 7), (0, 1, 2)),
    "RotaryEmbedding": ((0, 2, 3), (0,)),
}
ORT_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Slots:
    """Positions of a node's inputs and outputs that change type with its precision."""

    inputs: frozenset[int]
    outputs: frozenset[int]
    known: bool  # False: an op gcomp knows nothing about (all its float slots stay fp32)


_TYPE_NAMES = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}


def type_name(target: ir.DataType) -> str:
    return {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}.get(target, str(target))


def first_opset_allowing(node: ir.Node, opset: int, target: ir.DataType) -> int | None:
    """The first default-domain opset above ``opset`` whose schema of ``node``'s op takes
    ``target`` (e.g. bfloat16 Conv: 22), or None."""
    import onnx

    if (node.domain or "") not in ("", "ai.onnx"):
        return None
    for version in range(opset + 1, onnx.defs.onnx_opset_version() + 1):
        found = _schema_slots(node.op_type, version, target, len(node.inputs), len(node.outputs))
        if found and (found[0] or found[1]):
            return version
    return None


def node_slots(node: ir.Node, opset: int, target: ir.DataType) -> Slots:
    """Which inputs/outputs of ``node`` may take ``target`` (by the op's schema)."""
    domain = node.domain or ""
    if domain == ORT_DOMAIN and node.op_type in CONTRIB_SLOTS:
        ins, outs = CONTRIB_SLOTS[node.op_type]
        return Slots(frozenset(ins), frozenset(outs), True)
    if domain not in ("", "ai.onnx"):
        return Slots(frozenset(), frozenset(), False)
    found = _schema_slots(node.op_type, opset, target, len(node.inputs), len(node.outputs))
    if found is None:
        return Slots(frozenset(), frozenset(), False)
    return Slots(frozenset(found[0]), frozenset(found[1]), True)


def same_type_inputs(node: ir.Node, opset: int, output: int) -> tuple[int, ...]:
    """Inputs of ``node`` whose type parameter is that of output ``output`` (by schema)."""
    if node.domain not in ("", "ai.onnx"):
        return ()
    return _same_type_inputs(node.op_type, opset, len(node.inputs), output)


@lru_cache(maxsize=4096)
def _same_type_inputs(op_type: str, opset: int, n_in: int, output: int) -> tuple[int, ...]:
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return ()
    if not schema.outputs:
        return ()
    param = schema.outputs[min(output, len(schema.outputs) - 1)].type_str
    formals = schema.inputs
    return tuple(
        i for i in range(n_in)
        if formals and formals[min(i, len(formals) - 1)].type_str == param
    )


@lru_cache(maxsize=4096)
def _schema_slots(op_type: str, opset: int, target: ir.DataType, n_in: int, n_out: int):
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:  # no such op at this opset
        return None
    want = _TYPE_NAMES[target]
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    ok = {
        p for p, types in allowed.items()
        if want in types and (op_type, p) not in KEEP_FP32_PARAMS
    }

    def positions(formals, count):
        out = []
        for i in range(count):
            if not formals:
                break
            formal = formals[min(i, len(formals) - 1)]
            if i >= len(formals) and formal.option != formal.option.Variadic:
                break
            if formal.type_str in ok:
                out.append(i)
        return out

    return positions(schema.inputs, n_in), positions(schema.outputs, n_out)
