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

__all__ = ["ORT_SCORES_SCALE", "SCORES_SCALE", "check_core", "clamp_for_guard", "core", "full_query_axis", "heads", "int64s",
           "scale_of", "variant_rules", "with_query_axis"]

import numpy as np
import onnx_ir as ir

from onnxscript.rewriter import pattern

from gcomp.passes.fusion._dims import same_dim
from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion


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


def core(op, q4, kt, v4, c, mask, *, divide: bool, masked: bool, guarded: bool = False, nan_zero=None):
    """The pattern from the scores MatMul to ``P @ V`` (its softmax output is named ``probs``).

    ``guarded``: P read through ``Where(IsNaN(P), 0, P)``, the guard transformers' sdpa
    exports put after the softmax (a row whose every key is masked is NaN there; the guard
    makes it 0). The fused kernels have no such guard: the rules' rewrites give them the
    mask clamped to the lowest finite value (:func:`clamp_for_guard`), so no row is NaN and
    every row with a key to attend is unchanged; a row with none gets the mean of V where
    the export gives zeros (garbage in both: no key is attended)."""
    scores = op.MatMul(q4, kt)
    scaled = op.Div(scores, c) if divide else op.Mul(scores, c)
    if masked:
        scaled = op.Add(scaled, mask)
    probs = op.Softmax(scaled, _outputs=["probs"])
    if guarded:
        probs = op.Where(op.IsNaN(probs), nan_zero, probs)
    return op.MatMul(probs, v4)


def clamp_for_guard(op, mask, guarded: bool):
    """``Max(mask, lowest)`` for a guarded core (see :func:`core`), else ``mask``."""
    if not guarded or mask is None or mask.dtype is None:
        return mask
    dtype = mask.dtype.numpy()
    return op.Max(mask, op.Constant(value=ir.tensor(np.array(np.finfo(dtype).min, dtype=dtype))))


def check_core(run: FusionRun, result, probs, c, divide: bool, mask, nan_zero=None):
    """``result`` failed with the reason :func:`core`'s match cannot be fused, else None."""
    if nan_zero is not None:
        zero = run.const(nan_zero)
        if zero is None or zero.size != 1 or float(np.asarray(zero).reshape(())) != 0.0:
            return result.fail("the softmax's NaN guard does not write 0", nan_zero)
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


def variant_rules(cls, prefix: str, run: FusionRun, *, guards: bool = False, **kwargs) -> list:
    """``cls``'s rules with and without a mask, scaled by Mul or Div, operands commuted;
    ``guards``: also with the softmax's NaN guard (``cls`` takes ``guarded``)."""
    rules = []
    for guarded in (False, True) if guards else (False,):
        for masked in (True, False):
            for divide in (False, True):
                name = f"{prefix}-{'div' if divide else 'mul'}{'-mask' if masked else ''}{'-guarded' if guarded else ''}"
                options = dict(kwargs, guarded=guarded) if guards else kwargs
                rules.extend(cls.rule(name, run, divide=divide, masked=masked, **options).commute())
    return rules


class ScoresScale(RunRule):
    """``(Q * a) @ (K^T * b)`` -> ``(Q @ K^T) * (a * b)`` where the scores reach a softmax:
    scaled dot-product attention as transformers' sdpa writes it for the TorchScript exporter
    (sqrt of the scale on each side), put in the form the attention fusions read. a and b are
    positive scalar constants; the product rounds differently by about an ulp."""

    def pattern(self, op, q, kt, a, b):
        return op.MatMul(op.Mul(q, a), op.Mul(kt, b), _outputs=["scores"])

    def check(self, context, q, kt, a, b, scores, **_):
        result = pattern.MatchResult()
        if scale_of(self.run, a, False) is None or scale_of(self.run, b, False) is None:
            return result.fail("a scale is not a positive scalar constant", a)
        if q.shape is None or q.shape.rank() != 4 or q.dtype is None or not q.dtype.is_floating_point():
            return result.fail("Q is not float 4-D heads", q)
        reader = _only_reader(scores)
        if reader is not None and reader.op_type == "Add" and not scores.is_graph_output():
            reader = _only_reader(reader.outputs[0])
        if reader is None or reader.op_type != "Softmax" or reader.domain not in ("", "ai.onnx"):
            return result.fail("the scores do not reach a softmax", scores)
        return result

    def rewrite(self, op, q, kt, a, b, **_):
        dtype = q.dtype.numpy()
        c = np.array(scale_of(self.run, a, False) * scale_of(self.run, b, False), dtype=dtype)
        return op.Mul(op.MatMul(q, kt), op.Constant(value=ir.tensor(c)))


def _only_reader(value):
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _scores_scale(name: str):
    return fusion(
        name, lambda run: ScoresScale.rule(name, run).commute(), [("", "Mul", 1), ("", "MatMul", 1)],
        "(Q*a) @ (K^T*b) before a softmax (sdpa's split scale) -> (Q @ K^T) * ab, the form attention fusions read",
        needs=("Softmax",))


# One per family (a fusion belongs to one list): before attention / before the ORT attentions.
SCORES_SCALE = _scores_scale("attention-scores-scale")
ORT_SCORES_SCALE = _scores_scale("ort-attention-scores-scale")
