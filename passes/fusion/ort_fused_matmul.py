"""MatMul with a transposed operand and/or a constant scale -> ONNX Runtime's ``com.microsoft`` FusedMatMul.

Math. ``FusedMatMul(A, B; transA, transB, alpha) = alpha * op(A) @ op(B)`` where ``op``
swaps the last two axes when its flag is set (ORT contrib op, version 1; batch axes
broadcast as in MatMul). ``Transpose(X, perm=[0, ..., r-1, r-2])`` is exactly that swap
(for r = 2 a Transpose without perm too), and a scalar factor commutes with the product:

    MatMul(Transpose(A), B)        ==  FusedMatMul(A, B; transA=1)
    MatMul(A, Transpose(B))        ==  FusedMatMul(A, B; transB=1)
    MatMul(A, B) * c,  c * (..)    ==  FusedMatMul(A, B; alpha=c)
    MatMul(A, B) / c               ==  FusedMatMul(A, B; alpha=1/c)    (c != 0)

and the same steps on a FusedMatMul flip its flags / multiply its alpha. Exact up to
rounding: ORT scales the product by alpha inside the GEMM (a 1-ulp difference from a
separate Mul; 1/c is rounded once).

A plain MatMul is never rewritten (FusedMatMul would gain nothing). Refused: operands
not known to be rank >= 2 (a 1-D operand's promotion is not worth the risk), a
Transpose that moves any batch axis, a scale that is not a float32 scalar constant (or
whose rank would grow the output), non-float32 products (ORT's CPU kernel is float
only), and the attention-score MatMul whose result reaches a Softmax: those are left to
the Attention fusions (ours or ORT's own, which a FusedMatMul would hide from).
"""

from __future__ import annotations

__all__ = ["ORT_FUSED_MATMUL"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion
_MS = "com.microsoft"


def _rank(value) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


def _swap_last_two(t_out) -> str:
    """Why this Transpose is not a swap of the last two axes ("" when it is)."""
    node = t_out.producer()
    perm = node.attributes.get("perm")
    rank = len(perm.as_ints()) if perm is not None else _rank(node.inputs[0])
    if rank is None or rank < 2:
        return "Transpose rank unknown or below 2"
    if perm is None:
        return "" if rank == 2 else "Transpose without perm reverses more than the last two axes"
    want = [*range(rank - 2), rank - 1, rank - 2]
    return "" if list(perm.as_ints()) == want else "Transpose moves a batch axis"


def _feeds_softmax(value: ir.Value, depth: int = 3) -> bool:
    """Whether ``value`` reaches a Softmax through at most ``depth`` elementwise mask/scale ops."""
    for user, _ in value.uses():
        if user.op_type == "Softmax":
            return True
        if (depth and user.op_type in ("Add", "Mul", "Div", "Where", "Sub", "Cast") and user.outputs
                and _feeds_softmax(user.outputs[0], depth - 1)):
            return True
    return False


def _operands_ok(a, b, out) -> str:
    if _rank(a) is None or _rank(b) is None or _rank(a) < 2 or _rank(b) < 2:
        return "operands not known to be rank >= 2"
    if a.dtype != ir.DataType.FLOAT or b.dtype != ir.DataType.FLOAT:
        return "FusedMatMul runs float32 only"
    if _feeds_softmax(out):
        return "attention scores (the result reaches a Softmax): left to the Attention fusions"
    return ""


def _attrs(node: ir.Node | None) -> dict:
    if node is None or node.op_type == "MatMul":
        return {}
    return {k: v for k, v in node.attributes.items()}


def _get(attrs: dict, name: str, default):
    a = attrs.get(name)
    if a is None:
        return default
    return a.as_float() if a.type == ir.AttributeType.FLOAT else a.as_int()


def _emit(op, a, b, attrs: dict, **changes):
    out = {}
    for name in ("alpha", "transA", "transB", "transBatchA", "transBatchB"):
        value = changes.get(name, _get(attrs, name, None))
        if value is None:
            continue
        out[name] = ir.AttrFloat32(name, float(value)) if name == "alpha" else ir.AttrInt64(name, int(value))
    return op.FusedMatMul(a, b, _domain=_MS, **out)


class _TransposeInto(RunRule):
    """MatMul / FusedMatMul with a Transpose (last two axes) on operand A or B -> flip that flag."""

    def __init__(self, name: str, run: FusionRun, *, fused: bool, operand: int):
        super().__init__(name, run)
        self.fused, self.operand = fused, operand

    def pattern(self, op, x, other):
        t = op.Transpose(x, _outputs=["t_out"])
        args = (t, other) if self.operand == 0 else (other, t)
        if self.fused:
            return op.FusedMatMul(*args, _domain=_MS, _outputs=["mm_out"])
        return op.MatMul(*args, _outputs=["mm_out"])

    def check(self, context, x, other, t_out, mm_out, **_):
        result = pattern.MatchResult()
        why = _swap_last_two(t_out)
        if why:
            return result.fail(why, t_out)
        a, b = (x, other) if self.operand == 0 else (other, x)
        why = _operands_ok(a, b, mm_out)
        if why:
            return result.fail(why, mm_out)
        attrs = _attrs(mm_out.producer())
        if _get(attrs, "transBatchA" if self.operand == 0 else "transBatchB", 0):
            return result.fail("FusedMatMul already transposes that operand's batch axes", mm_out)
        return result

    def rewrite(self, op, x, other, mm_out, **_):
        attrs = _attrs(mm_out.producer())
        flag = "transA" if self.operand == 0 else "transB"
        a, b = (x, other) if self.operand == 0 else (other, x)
        return _emit(op, a, b, attrs, **{flag: 1 - _get(attrs, flag, 0)})


class _ScaleInto(RunRule):
    """MatMul / FusedMatMul times (or divided by) a scalar constant -> alpha."""

    def __init__(self, name: str, run: FusionRun, *, fused: bool, kind: str):
        super().__init__(name, run)
        self.fused, self.kind = fused, kind

    def pattern(self, op, a, b, c):
        if self.fused:
            mm = op.FusedMatMul(a, b, _domain=_MS, _outputs=["mm_out"])
        else:
            mm = op.MatMul(a, b, _outputs=["mm_out"])
        if self.kind == "div":
            return op.Div(mm, c, _outputs=["y"])
        return op.Mul(c, mm, _outputs=["y"]) if self.kind == "mul-r" else op.Mul(mm, c, _outputs=["y"])

    def _factor(self, c, mm_out) -> tuple[float | None, str]:
        array = self.run.const(c)
        if array is None or array.size != 1 or array.dtype != np.float32:
            return None, "the factor is not a float32 scalar constant"
        if array.ndim > (_rank(mm_out) or 0):
            return None, "the factor's rank would grow the output"
        value = float(array.reshape(()))
        if self.kind == "div":
            if value == 0:
                return None, "division by zero"
            value = 1.0 / value
        if not np.isfinite(value):
            return None, "the factor is not finite"
        return value, ""

    def check(self, context, a, b, c, mm_out, y, **_):
        result = pattern.MatchResult()
        _, why = self._factor(c, mm_out)
        if why:
            return result.fail(why, c)
        why = _operands_ok(a, b, y)
        return result.fail(why, y) if why else result

    def rewrite(self, op, a, b, c, mm_out, **_):
        attrs = _attrs(mm_out.producer())
        factor, _ = self._factor(c, mm_out)
        return _emit(op, a, b, attrs, alpha=_get(attrs, "alpha", 1.0) * factor)


def _rules(run: FusionRun) -> list:
    return ([_TransposeInto.rule(f"ort-fused-matmul-t{'ab'[i]}{'-f' if f else ''}", run, fused=f, operand=i)
             for f in (False, True) for i in (0, 1)]
            + [_ScaleInto.rule(f"ort-fused-matmul-{k}{'-f' if f else ''}", run, fused=f, kind=k)
               for f in (False, True) for k in ("mul", "mul-r", "div")])


ORT_FUSED_MATMUL = fusion(
    "ort-fused-matmul", _rules, [(_MS, "FusedMatMul", 1)],
    "MatMul with last-two-axes Transpose operands and/or a scalar Mul/Div -> com.microsoft FusedMatMul")
