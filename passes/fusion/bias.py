"""A constant bias Add after Conv / ConvTranspose / Gemm -> their bias input; MatMul + bias -> Gemm.

Math. With ``b`` constant per output channel (see _affine.py for what that means):

    Conv(x, W, B) + b            ==  Conv(x, W, B + b)        (b: [M], [M,1,1], [1,M,1,1], scalar, ...)
    Gemm(A, B, C; beta) + b      ==  Gemm(A, B, beta*C + b; beta=1)   (b: [N], [1,N], scalar)
    MatMul(A, B) + b             ==  Gemm(A, B, b)            (A and B of rank 2, b: [N], [1,N], scalar)

The first two are exact (the same additions, the bias constants summed once in float64
and rounded); the third is Gemm's definition with alpha = beta = 1. ``b + y`` is
matched as well as ``y + b``.

Refused: a ``b`` that broadcasts over the batch or spatial axes (``[1,1,H,W]``,
``[M,N]``: folding it would change the output), a rank above the output's (it would
grow it), an operand that is not a constant, a MatMul operand whose rank is not known
to be 2 (batched MatMul stays: ORT runs it as one batched GEMM), and any match whose
intermediate value is used elsewhere.
"""

from __future__ import annotations

__all__ = ["ORDER"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._affine import fold_rules
from gcomp.passes.fusion._engine import const_array, fusion

ORDER = 20


def _rank(value) -> int | None:
    return None if value.shape is None else value.shape.rank()


class _MatMulAddToGemm(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, bias_first: bool):
        super().__init__(name)
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
        bias = const_array(c)
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


fusion("bias", "portable", fold_rules("bias", ("add", "add-r")),
       [("", "Conv", 1), ("", "ConvTranspose", 1), ("", "Gemm", 1)],
       "Conv/ConvTranspose/Gemm + per-channel constant -> the bias input (beta respected)")
fusion("matmul-add-gemm", "portable",
       [_MatMulAddToGemm.rule(f"matmul-add-gemm-{int(f)}", bias_first=f) for f in (False, True)],
       [("", "Gemm", 1)],
       "MatMul(A, B) + per-column constant, A and B of rank 2 -> Gemm(A, B, C)")
