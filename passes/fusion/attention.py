"""Scaled dot-product attention on 4-D heads -> ``Attention`` (opset 23).

Math (see _attention.py): per batch and head, ``O = softmax((Q @ K^T) * c + M) @ V``. The
core, from the two MatMuls to softmax on heads Q4 [B, H, S, D], K^T (``Transpose(K,
[0, 2, 3, 1])`` of K [B, T, H, D]) and V4 [B, H, T, Dv], is exactly

    Attention(Q4, K4, V4, M, scale=c)       with K4 = Transpose(K, [0, 2, 1, 3])

(ONNX Attention-23: the same product, scale, additive mask and softmax over the last axis).
The mask is broadcast to the query axis when it would broadcast there (Attention broadcasts
over batch and heads only).

Never emitted for a model below opset 23 (upgrade with ``--target-opset 23``), nor for
targets that cannot import it (TVM 0.27). Refused besides the core's cases (a softmax over
another axis, a scale that is not a positive scalar constant, a mask that is not a float
tensor of rank <= 4): Q, K, V not of rank 4 or not float, batch / heads / length that
cannot be proven to match (MatMul would broadcast them), an intermediate used elsewhere.
"""

from __future__ import annotations

__all__ = ["ATTENTION"]

from onnxscript.rewriter import pattern

from gcomp.passes.fusion._attention import (check_core, clamp_for_guard, core, full_query_axis, scale_of, variant_rules,
                                             with_query_axis)
from gcomp.passes.fusion._dims import same_dim
from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion


class Attention23(RunRule):
    """The core on 4-D heads -> Attention (opset 23)."""

    def __init__(self, name: str, run: FusionRun, *, divide: bool, masked: bool, guarded: bool = False):
        super().__init__(name, run)
        self.divide, self.masked, self.guarded = divide, masked, guarded

    def pattern(self, op, q4, kr, v4, c, mask, nan_zero):
        kt = op.Transpose(kr, perm=[0, 2, 3, 1], _outputs=["kt"])
        return core(op, q4, kt, v4, c, mask, divide=self.divide, masked=self.masked, guarded=self.guarded,
                    nan_zero=nan_zero)

    def check(self, context, q4, kr, v4, c, probs, mask=None, nan_zero=None, **_):
        result = pattern.MatchResult()
        failed = check_core(self.run, result, probs, c, self.divide, mask, nan_zero)
        if failed is not None:
            return failed
        for v in (q4, kr, v4):
            if v.shape is None or v.shape.rank() != 4:
                return result.fail("Q, K, V are not rank 4", v)
            if v.dtype is None or not v.dtype.is_floating_point():
                return result.fail("Q, K, V are not float tensors", v)
        # Attention takes K [B, H, T, D] and V [B, H, T, Dv] with Q's batch and heads: no
        # MatMul broadcasting over them (kr is [B, T, H, D], what the transpose reads).
        q, k, v = q4.shape, kr.shape, v4.shape
        if not (same_dim(k[0], q[0]) and same_dim(k[2], q[1]) and same_dim(v[0], q[0])
                and same_dim(v[1], q[1]) and same_dim(v[2], k[1])):
            return result.fail("Q, K, V batch/heads/length cannot be proven to match (broadcasting)", kr)
        return result

    def rewrite(self, op, q4, kr, v4, c, mask=None, **_):
        mask = clamp_for_guard(op, mask, self.guarded)
        k4 = op.Transpose(kr, perm=[0, 2, 1, 3])
        if mask is not None and not full_query_axis(mask, q4.shape[2]):
            mask = with_query_axis(op, mask, q4, 2)
        inputs = [q4, k4, v4] + ([mask] if mask is not None else [])
        return op.Attention(*inputs, scale=scale_of(self.run, c, self.divide))


ATTENTION = fusion("attention", lambda run: variant_rules(Attention23, "attention", run, guards=True), [("", "Attention", 23)],
                   "QK^T*scale (+mask) + softmax + PV on 4-D heads -> Attention (opset 23)", needs=("Softmax",))
