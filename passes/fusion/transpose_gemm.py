"""A 2-D Transpose feeding Gemm or a rank-2 MatMul -> Gemm's transA / transB.

Math. Gemm computes ``alpha * A' B' + beta * C`` with ``A' = A^T`` when transA=1 (else
A), likewise B. For a matrix, ``Transpose(X, perm=[1, 0]) = X^T`` (a Transpose without
``perm`` reverses the axes, the same thing at rank 2), and ``(X^T)^T = X``, so

    Gemm(Transpose(A), B; transA=t)   ==  Gemm(A, B; transA=1-t)     (likewise for B)
    MatMul(Transpose(A), B)           ==  Gemm(A, B; transA=1)       (A, B of rank 2)
    MatMul(A, Transpose(B))           ==  Gemm(A, B; transB=1)

Exact: the same products and sums; only which operand layout the kernel reads changes.

Refused: a Transpose whose input is not known to be rank 2 (a batched MatMul stays a
MatMul: Gemm is 2-D only), a MatMul whose other operand is not known to be rank 2,
non-float tensors, and a Transpose whose output is also used elsewhere.
"""

from __future__ import annotations

__all__ = ["TRANSPOSE_GEMM"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion
_FLOATS = (np.float16, np.float32, np.float64)


def _rank(value) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


def _is_matrix_transpose(t_out, x) -> str:
    """Why Transpose(x) is not a plain 2-D transpose ("" when it is)."""
    if _rank(x) != 2:
        return "Transpose input is not known to be rank 2"
    perm = t_out.producer().attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return "Transpose is not perm=[1, 0]"
    if x.dtype is None or x.dtype.numpy().type not in _FLOATS:
        return "not a float tensor"
    return ""


class _TransposeIntoGemm(RunRule):
    """Gemm(Transpose(x), other) or Gemm(other, Transpose(x)) -> flip transA / transB."""

    def __init__(self, name: str, run: FusionRun, *, operand: int):
        super().__init__(name, run)
        self.operand = operand  # 0: A, 1: B

    def pattern(self, op, x, other):
        t = op.Transpose(x, _outputs=["t_out"])
        args = (t, other) if self.operand == 0 else (other, t)
        return op.Gemm(*args, _allow_other_inputs=True, _outputs=["g_out"])

    def check(self, context, x, t_out, **_):
        why = _is_matrix_transpose(t_out, x)
        return pattern.MatchResult().fail(why, t_out) if why else pattern.MatchResult()

    def rewrite(self, op, x, other, g_out, **_):
        gemm = g_out.producer()
        attrs = dict(gemm.attributes)
        name = "transA" if self.operand == 0 else "transB"
        flag = attrs.get(name)
        attrs[name] = ir.AttrInt64(name, 1 - (flag.as_int() if flag is not None else 0))
        args = [x, other] if self.operand == 0 else [other, x]
        return op.Gemm(*args, *list(gemm.inputs)[2:], **attrs)


class _TransposeMatMulToGemm(RunRule):
    """MatMul(Transpose(x), other) / MatMul(other, Transpose(x)), all rank 2 -> Gemm with a trans flag."""

    def __init__(self, name: str, run: FusionRun, *, operand: int):
        super().__init__(name, run)
        self.operand = operand

    def pattern(self, op, x, other):
        t = op.Transpose(x, _outputs=["t_out"])
        return op.MatMul(t, other) if self.operand == 0 else op.MatMul(other, t)

    def check(self, context, x, other, t_out, **_):
        result = pattern.MatchResult()
        why = _is_matrix_transpose(t_out, x)
        if why:
            return result.fail(why, t_out)
        if _rank(other) != 2:
            return result.fail("the other MatMul operand is not known to be rank 2 (Gemm is 2-D only)", other)
        if other.dtype != x.dtype:
            return result.fail("operand dtypes differ", other)
        return result

    def rewrite(self, op, x, other, **_):
        if self.operand == 0:
            return op.Gemm(x, other, transA=1)
        return op.Gemm(other, x, transB=1)


def _rules(run: FusionRun) -> list:
    return ([_TransposeIntoGemm.rule(f"transpose-gemm-{'ab'[i]}", run, operand=i) for i in (0, 1)]
            + [_TransposeMatMulToGemm.rule(f"transpose-matmul-gemm-{'ab'[i]}", run, operand=i) for i in (0, 1)])


TRANSPOSE_GEMM = fusion(
    "transpose-gemm", _rules, [("", "Gemm", 1)],
    "Transpose(perm=[1,0]) into Gemm's transA/transB; rank-2 MatMul with a transposed operand -> Gemm")
