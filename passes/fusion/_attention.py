"""Scaled dot-product attention as exporters write it: the math and the checks shared by the
attention fusions (attention.py, ort_mha.py, ort_packed_attention.py, ort_split_attention.py).

Math, per batch b and head h (Q, K, V: [B, S, H*D] projections split into H heads of D):

    scores = (Q_h @ K_h^T) * c   (c: the graph's scale; also written  / (1/c))
    P      = softmax(scores + M, axis=-1)        (M: an additive mask, optional)
    O_h    = P @ V_h ;   out = concat_h(O_h)  -> [B, S, H*D]

Exporters write the split as ``Transpose(Reshape(Q, [B, S, H, D]), [0, 2, 1, 3])``, K^T as
``Transpose(Reshape(K, ...), [0, 2, 3, 1])`` and the merge as
``Reshape(Transpose(O, [0, 2, 1, 3]), [B, S, H*D])``. :func:`core` is the part from the two
MatMuls to the softmax; :func:`check_core` refuses a softmax over another axis, a scale that
is not a positive scalar constant and a mask that is not a float tensor of rank <= 4.
"""

from __future__ import annotations

__all__ = ["check_core", "core", "full_query_axis", "heads", "int64s", "scale_of", "variant_rules",
           "with_query_axis"]

import numpy as np
import onnx_ir as ir

from gcomp.passes.fusion._dims import same_dim
from gcomp.passes.fusion._engine import FusionRun


def heads(run: FusionRun, reshape_out, hidden) -> tuple[int, int] | None:
    """(H, D) of a [B, S, H, D] head split, from the Reshape's output shape or its target."""
    shape = reshape_out.shape
    if shape is not None and shape.rank() == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
        return shape[2], shape[3]
    source = reshape_out.producer().inputs[0]
    if (shape is not None and shape.rank() == 4 and isinstance(shape[3], int) and isinstance(hidden, int)
            and source.shape is not None and source.shape.rank() == 3
            and same_dim(shape[0], source.shape[0]) and same_dim(shape[1], source.shape[1])
            and shape[3] > 0 and hidden % shape[3] == 0):
        return hidden // shape[3], shape[3]  # [B, S, ?, D] from [B, S, hidden]: ? = hidden / D
    node = reshape_out.producer()
    target = run.const(node.inputs[1])
    allowzero = node.attributes.get("allowzero")
    if target is None or target.shape != (4,) or not isinstance(hidden, int):
        return None
    if allowzero is not None and allowzero.as_int() == 1:
        return None
    if source.shape is None or source.shape.rank() != 3:
        return None
    for i in (0, 1):  # batch and sequence copied (0) or the source's own static dims
        if not (target[i] == 0 or (isinstance(source.shape[i], int) and target[i] == source.shape[i])):
            return None
    h, d = int(target[2]), int(target[3])
    if h == -1 and d > 0 and hidden % d == 0:
        h = hidden // d
    if d == -1 and h > 0 and hidden % h == 0:
        d = hidden // h
    return (h, d) if h > 0 and d > 0 else None


def scale_of(run: FusionRun, scale_value, divide: bool) -> float | None:
    """The factor c of ``scores * c`` (``divide``: written ``scores / c'``, c = 1/c'), or None
    when it is not a positive finite scalar constant."""
    c = run.const(scale_value)
    if c is None or c.size != 1:
        return None
    c = float(np.asarray(c, dtype=np.float64).reshape(()))
    if not np.isfinite(c) or c <= 0:
        return None
    return 1.0 / c if divide else c


def core(op, q4, kt, v4, c, mask, *, divide: bool, masked: bool):
    """The pattern from the scores MatMul to ``P @ V`` (its softmax output is named ``probs``)."""
    scores = op.MatMul(q4, kt)
    scaled = op.Div(scores, c) if divide else op.Mul(scores, c)
    if masked:
        scaled = op.Add(scaled, mask)
    probs = op.Softmax(scaled, _outputs=["probs"])
    return op.MatMul(probs, v4)


def check_core(run: FusionRun, result, probs, c, divide: bool, mask):
    """``result`` failed with the reason :func:`core`'s match cannot be fused, else None."""
    axis = probs.producer().attributes.get("axis")
    axis = -1 if axis is None else axis.as_int()
    if axis not in (-1, 3):
        return result.fail("softmax is not over the last axis", probs)
    if scale_of(run, c, divide) is None:
        return result.fail("scale is not a positive scalar constant", c)
    if mask is not None:
        if mask.dtype is None or not mask.dtype.is_floating_point():
            return result.fail("mask is not a float (additive) tensor", mask)
        if mask.shape is None or mask.shape.rank() is None or mask.shape.rank() > 4:
            return result.fail("mask rank unknown or above 4", mask)
    return None


def full_query_axis(mask, seq) -> bool:
    return mask.shape is not None and mask.shape.rank() == 4 and same_dim(mask.shape[2], seq)


def with_query_axis(op, mask, q, axis: int):
    """The mask broadcast to [B|1, H|1, S, T]: ORT's attention kernels broadcast over batch
    and heads only. The mask broadcast against [B, H, S, T] in the original Add, so each of
    its dims is 1 or full, and broadcasting with [1, 1, S, 1] only fills the query axis."""
    seq = op.Slice(op.Shape(q), int64s(op, [axis]), int64s(op, [axis + 1]))
    return op.Expand(mask, op.Concat(int64s(op, [1, 1]), seq, int64s(op, [1]), axis=0))


def int64s(op, values):
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))


def variant_rules(cls, prefix: str, run: FusionRun, **kwargs) -> list:
    """``cls``'s rules with and without a mask, scaled by Mul or Div, operands commuted."""
    rules = []
    for masked in (True, False):
        for divide in (False, True):
            rules.extend(cls.rule(f"{prefix}-{'div' if divide else 'mul'}{'-mask' if masked else ''}", run,
                                  divide=divide, masked=masked, **kwargs).commute())
    return rules
