"""GELU -> ONNX Runtime's ``com.microsoft`` Gelu / FastGelu, and a bias Add into BiasGelu / FastGelu.

Math. ``com.microsoft.Gelu(x)`` is the exact GELU ``0.5 * x * (1 + erf(x / sqrt(2)))`` and
``FastGelu(x)`` the tanh form ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``:
the definitions of ONNX ``Gelu`` with ``approximate="none"`` / ``"tanh"``. So

    Gelu-20(x)                     ==  com.microsoft Gelu(x)
    Gelu-20(x, approximate=tanh)   ==  FastGelu(x)
    the written-out forms (gelu.py's variants)  ==  the same two ops (any opset)
    Gelu(x + b)                    ==  BiasGelu(x, b)        (b constant over the last axis)
    FastGelu(x + b)                ==  FastGelu(x, b)

exact up to the rounding of the constants (matched to a relative 1e-5) and the order the
kernels add the bias. Refused: an unknown ``approximate`` mode; a bias that is not a
constant 1-D tensor of the input's last dim and float dtype.
"""

from __future__ import annotations

__all__ = ["ORT_BIAS_GELU", "ORT_GELU"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion
from gcomp.passes.fusion.gelu import DecomposedGelu, decomposed_rules


class _DecomposedToContrib(DecomposedGelu):
    """The written-out forms -> com.microsoft Gelu (erf) / FastGelu (tanh)."""

    def rewrite(self, op, x, **_):
        if self.form == "erf":
            return op.Gelu(x, _domain="com.microsoft")
        return op.FastGelu(x, _domain="com.microsoft")


class _OnnxGeluToContrib(RunRule):
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


class _BiasGelu(RunRule):
    """Gelu(x + b) with b a constant 1-D over the last axis -> BiasGelu(x, b) / FastGelu(x, b).

    Exact: both contrib ops compute gelu(x + b) with b broadcast over the last axis.
    """

    def __init__(self, name: str, run: FusionRun, *, fast: bool, bias_first: bool):
        super().__init__(name, run)
        self.fast, self.bias_first = fast, bias_first

    def pattern(self, op, x, b):
        s = op.Add(b, x) if self.bias_first else op.Add(x, b)
        if self.fast:
            return op.FastGelu(s, _domain="com.microsoft")
        return op.Gelu(s, _domain="com.microsoft")

    def check(self, context, x, b, **_):
        result = pattern.MatchResult()
        bias = self.run.const(b)
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


def _gelu_rules(run: FusionRun) -> list:
    return [_OnnxGeluToContrib.rule("ort-gelu", run), *decomposed_rules(_DecomposedToContrib, run, "erf"),
            *decomposed_rules(_DecomposedToContrib, run, "tanh")]


def _bias_gelu_rules(run: FusionRun) -> list:
    return [_BiasGelu.rule(f"ort-bias-gelu-{int(f)}{int(bf)}", run, fast=f, bias_first=bf)
            for f in (False, True) for bf in (False, True)]


ORT_GELU = fusion("ort-gelu", _gelu_rules, [("com.microsoft", "Gelu", 1), ("com.microsoft", "FastGelu", 1)],
                  "Gelu / decomposed GELU -> com.microsoft Gelu or FastGelu (any opset)", needs=("Gelu", "Erf", "Tanh"))
ORT_BIAS_GELU = fusion("ort-bias-gelu", _bias_gelu_rules,
                       [("com.microsoft", "BiasGelu", 1), ("com.microsoft", "FastGelu", 1)],
                       "Gelu(x + b) -> com.microsoft BiasGelu(x, b); FastGelu(x + b) -> FastGelu(x, b)",
                       needs=("Gelu", "FastGelu"))
