"""GELU written out with Erf or Tanh -> one ``Gelu`` op.

Math (the two forms exporters emit):

    exact:  gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))                        -> Gelu(x)
    tanh:   gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> Gelu(x, approximate="tanh")

Both are the definitions of ONNX ``Gelu`` (opset 20), so the rewrite is exact up to the
rounding of the constants (matched to a relative 1e-5). ``x / sqrt(2)`` may be written
``x * (1/sqrt(2))``, ``x^3`` as ``Pow(x, 3)`` or ``x * x * x``; the three multiplications
may come in any order and association.

These rules emit ``Gelu``-20 (only when the model's opset is >= 20: never newer than
the model). ort_gelu.py matches the same forms (:class:`DecomposedGelu`) for ONNX Runtime's
``com.microsoft`` ``Gelu`` / ``FastGelu``, which any opset may hold.
"""

from __future__ import annotations

__all__ = ["GELU_ERF", "GELU_TANH", "DecomposedGelu", "decomposed_rules"]

import math

from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion

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


class DecomposedGelu(RunRule):
    """GELU written out (``form``: ``erf`` or ``tanh``) -> ``Gelu``-20; subclasses emit another op.

    ``shape`` picks where 0.5 and x multiply: ((x*c)*0.5), (x*(c*0.5)), ((x*0.5)*c);
    ``swap`` the order of the two non-constant operands there.

    Constants are matched as the second operand of Add/Mul: the engine puts them there
    first (:func:`gcomp.passes.fusion._engine.canonical_operands`), which keeps the
    variants to enumerate few (36, where commuting every Add/Mul would make ~1,000).
    """

    def __init__(self, name: str, run: FusionRun, *, form: str, shape: int, swap: bool, cube: int = 0,
                 swap_inner: bool = False):
        super().__init__(name, run)
        self.form, self.shape, self.swap = form, shape, swap
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
        if self.form == "erf":
            return op.Gelu(x)
        return op.Gelu(x, approximate="tanh")


def decomposed_rules(cls: type[DecomposedGelu], run: FusionRun, form: str) -> list:
    """``cls``'s rules for every way exporters write the ``form`` (erf / tanh) of GELU."""
    rules = []
    inner = [(0, False)] if form == "erf" else [(c, si) for c in range(3) for si in (False, True)]
    for shape in range(3):
        for swap in (False, True):
            for cube, swap_inner in inner:
                rules.append(cls.rule(f"gelu-{form}-{shape}{int(swap)}{cube}{int(swap_inner)}", run, form=form,
                                      shape=shape, swap=swap, cube=cube, swap_inner=swap_inner))
    return rules


GELU_ERF = fusion("gelu-erf", lambda run: decomposed_rules(DecomposedGelu, run, "erf"), [("", "Gelu", 20)],
                  "0.5*x*(1+erf(x/sqrt2)) -> Gelu (opset 20)", needs=("Erf",))
GELU_TANH = fusion("gelu-tanh", lambda run: decomposed_rules(DecomposedGelu, run, "tanh"), [("", "Gelu", 20)],
                   "0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715x^3))) -> Gelu(approximate=tanh) (opset 20)",
                   needs=("Tanh",))
