"""MatMul of two matrices + a per-column constant -> ``Gemm``.

Math. Gemm computes ``alpha * A @ B + beta * C`` with C broadcast to [M, N], so with
alpha = beta = 1

    MatMul(A, B) + b  ==  Gemm(A, B, b)        (A and B of rank 2, b: [N], [1, N] or scalar)

by Gemm's definition. ``b + y`` is matched as well as ``y + b``.

Refused: a MatMul operand whose rank is not known to be 2 (a batched MatMul stays: ORT
runs it as one batched GEMM), operands that are not floats of one dtype, a ``b`` that is
not a constant of that dtype, one that broadcasts over the rows or grows the rank, or
whose length is not the column count, and a MatMul output used elsewhere.
"""

from __future__ import annotations

__all__ = ["MATMUL_ADD_GEMM"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion


def _rank(value) -> int | None:
    return None if value.shape is None else value.shape.rank()


class _MatMulAddToGemm(RunRule):
    def __init__(self, name: str, run: FusionRun, *, bias_first: bool):
        super().__init__(name, run)
        self.bias_first = bias_first

    def pattern(self, op, a, b, c):
        y = op.MatMul(a, b)
        return op.Add(c, y) if self.bias_first else op.Add(y, c)

    def check(self, context, a, b, c, **_):
        result = pattern.MatchResult()
        if _rank(a) != 2 or _rank(b) != 2:
            return result.fail("MatMul operands are not both known to be rank 2", a if _rank(a) != 2 else b)
        if a.dtype is None or b.dtype != a.dtype or a.dtype.numpy().type not in (np.float16, np.float32, np.float64):
            return result.fail("MatMul operands are not float tensors of one dtype", a)
        bias = self.run.const(c)
        if bias is None:
            return result.fail("the bias is not a constant", c)
        if bias.dtype != a.dtype.numpy():
            return result.fail("bias dtype differs from the MatMul's", c)
        n = b.shape[1]
        if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            return result.fail("bias broadcasts over the rows (or grows the rank): not a per-column bias", c)
        last = bias.shape[-1] if bias.ndim else 1
        if last != 1 and (not isinstance(n, int) or last != n):
            return result.fail("bias length differs from the MatMul's column count", c)
        return result

    def rewrite(self, op, a, b, c, **_):
        return op.Gemm(a, b, c)


MATMUL_ADD_GEMM = fusion(
    "matmul-add-gemm",
    lambda run: [_MatMulAddToGemm.rule(f"matmul-add-gemm-{int(f)}", run, bias_first=f) for f in (False, True)],
    [("", "Gemm", 1)], "MatMul(A, B) + per-column constant, A and B of rank 2 -> Gemm(A, B, C)")
