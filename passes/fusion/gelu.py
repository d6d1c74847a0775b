"""GELU written out with Erf or Tanh -> one ``Gelu`` op.

Math (the two forms exporters emit):

    exact:  gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))                        -> Gelu(x)
    tanh:   gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> Gelu(x, approximate="tanh")

Both are the definitions of ONNX ``Gelu`` (opset 20), so the rewrite is exact up to the
rounding of the constants (matched to a relative 1e-5). ``x / sqrt(2)`` may be written
``x * (1/sqrt(2))``, ``x^3`` as ``Pow(x, 3)`` or ``x * x * x``; the three multiplications
may come in any order and association.

Portable rules emit ``Gelu``-20 (only when the model's opset is >= 20: never newer than
the model). The ORT rules emit ``com.microsoft`` ``Gelu`` / ``FastGelu`` (any opset), and
fold a preceding bias Add into ``BiasGelu`` / ``FastGelu``'s bias input.
"""

from __future__ import annotations

__all__ = ["ORDER"]

import math

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import const_array, fusion

ORDER = 40

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf_core(op, x):
    scaled = pattern.OrValue([op.Div(x, _SQRT2), op.Mul(x, _INV_SQRT2)])
    return op.Add(op.Erf(scaled), 1.0)


def _tanh_core(op, x, cube: int, swap_inner: bool):
    if cube == 0:
        x3 = op.Pow(x, 3.0)
    elif cube == 1:
        x3 = op.Mul(op.Mul(x, x), x)
    else:
        x3 = op.Mul(x, op.Mul(x, x))
    t = op.Mul(x3, 0.044715)
    inner = op.Add(t, x) if swap_inner else op.Add(x, t)
    return op.Add(op.Tanh(op.Mul(inner, _SQRT_2_OVER_PI)), 1.0)


def _mul(op, a, b, swap: bool):
    return op.Mul(b, a) if swap else op.Mul(a, b)


class _GeluBase(pattern.RewriteRuleClassBase):
    """``shape`` picks where 0.5 and x multiply: ((x*c)*0.5), (x*(c*0.5)), ((x*0.5)*c);
    ``swap`` the order of the two non-constant operands there.

    Constants are matched as the second operand of Add/Mul: the engine puts them there
    first (:func:`gcomp.passes.fusion._engine.canonical_operands`), which keeps the
    variants to enumerate few (36, where commuting every Add/Mul would make ~1,000).
    """

    def __init__(self, name: str, *, form: str, shape: int, swap: bool, emit: str, cube: int = 0,
                 swap_inner: bool = False):
        super().__init__(name)
        self.form, self.shape, self.swap, self.emit = form, shape, swap, emit
        self.cube, self.swap_inner = cube, swap_inner

    def pattern(self, op, x):
        core = _erf_core(op, x) if self.form == "erf" else _tanh_core(op, x, self.cube, self.swap_inner)
        if self.shape == 0:
            return op.Mul(_mul(op, x, core, self.swap), 0.5)
        if self.shape == 1:
            return _mul(op, x, op.Mul(core, 0.5), self.swap)
        return _mul(op, op.Mul(x, 0.5), core, self.swap)

    def check(self, context, x, **_):
        result = pattern.MatchResult()
        if x.dtype is not None and not x.dtype.is_floating_point():
            return result.fail("input is not a float tensor", x)
        return result

    def rewrite(self, op, x, **_):
        if self.emit == "onnx":
            if self.form == "erf":
                return op.Gelu(x)
            return op.Gelu(x, approximate="tanh")
        if self.form == "erf":
            return op.Gelu(x, _domain="com.microsoft")
        return op.FastGelu(x, _domain="com.microsoft")


def _rules(form: str, emit: str) -> list:
    rules = []
    inner = [(0, False)] if form == "erf" else [(c, si) for c in range(3) for si in (False, True)]
    for shape in range(3):
        for swap in (False, True):
            for cube, swap_inner in inner:
                rules.append(_GeluBase.rule(f"gelu-{form}-{shape}{int(swap)}{cube}{int(swap_inner)}", form=form,
                                            shape=shape, swap=swap, emit=emit, cube=cube, swap_inner=swap_inner))
    return rules


fusion("gelu-erf", "portable", _rules("erf", "onnx"), [("", "Gelu", 20)],
       "0.5*x*(1+erf(x/sqrt2)) -> Gelu (opset 20)", needs=("Erf",))
fusion("gelu-tanh", "portable", _rules("tanh", "onnx"), [("", "Gelu", 20)],
       "0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715x^3))) -> Gelu(approximate=tanh) (opset 20)", needs=("Tanh",))


# ----------------------------------------------------------------------------- ORT
class _OnnxGeluToContrib(pattern.RewriteRuleClassBase):
    """Gelu-20 -> com.microsoft Gelu / FastGelu (ORT's fused kernels; BiasGelu builds on them)."""

    def pattern(self, op, x):
        return op.Gelu(x, _outputs=["y"])

    def check(self, context, x, y, **_):
        result = pattern.MatchResult()
        approx = y.producer().attributes.get("approximate")
        if approx is not None and approx.as_string() not in ("none", "tanh"):
            return result.fail("unknown approximate mode", y)
        return result

    def rewrite(self, op, x, y, **_):
        approx = y.producer().attributes.get("approximate")
        if approx is not None and approx.as_string() == "tanh":
            out = op.FastGelu(x, _domain="com.microsoft")
        else:
            out = op.Gelu(x, _domain="com.microsoft")
        return out


class _BiasGelu(pattern.RewriteRuleClassBase):
    """Gelu(x + b) with b a constant 1-D over the last axis -> BiasGelu(x, b) / FastGelu(x, b).

    Exact: both contrib ops compute gelu(x + b) with b broadcast over the last axis.
    """

    def __init__(self, name: str, *, fast: bool, bias_first: bool):
        super().__init__(name)
        self.fast, self.bias_first = fast, bias_first

    def pattern(self, op, x, b):
        s = op.Add(b, x) if self.bias_first else op.Add(x, b)
        if self.fast:
            return op.FastGelu(s, _domain="com.microsoft")
        return op.Gelu(s, _domain="com.microsoft")

    def check(self, context, x, b, **_):
        result = pattern.MatchResult()
        bias = const_array(b)
        if bias is None or bias.ndim != 1:
            return result.fail("bias is not a constant 1-D tensor", b)
        if x.shape is None or x.shape.rank() is None or x.shape.rank() < 1:
            return result.fail("input rank unknown", x)
        last = x.shape[-1]
        if not isinstance(last, int) or last != bias.shape[0]:
            return result.fail("bias length differs from the input's last dimension", b)
        if x.dtype is None or x.dtype.numpy() != bias.dtype or not np.issubdtype(bias.dtype, np.floating):
            return result.fail("bias dtype differs from the input's", b)
        return result

    def rewrite(self, op, x, b, **_):
        if self.fast:
            out = op.FastGelu(x, b, _domain="com.microsoft")
        else:
            out = op.BiasGelu(x, b, _domain="com.microsoft")
        return out


fusion("ort-gelu", "ort", [_OnnxGeluToContrib.rule("ort-gelu"), *_rules("erf", "ort"), *_rules("tanh", "ort")],
       [("com.microsoft", "Gelu", 1), ("com.microsoft", "FastGelu", 1)],
       "Gelu / decomposed GELU -> com.microsoft Gelu or FastGelu (any opset)", needs=("Gelu", "Erf", "Tanh"))
fusion("ort-bias-gelu", "ort",
       [_BiasGelu.rule(f"ort-bias-gelu-{int(f)}{int(bf)}", fast=f, bias_first=bf) for f in (False, True)
        for bf in (False, True)],
       [("com.microsoft", "BiasGelu", 1), ("com.microsoft", "FastGelu", 1)],
       "Gelu(x + b) -> com.microsoft BiasGelu(x, b); FastGelu(x + b) -> FastGelu(x, b)",
       needs=("Gelu", "FastGelu"))
