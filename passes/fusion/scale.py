"""Mul / Div / Sub by a constant after Conv / ConvTranspose / Gemm -> folded into weights and bias.

Math. With ``c`` constant per output channel or scalar (see _affine.py), the linear op
is ``y = W x + B`` per output channel, so

    y * c  ==  (W * c) x + B * c             (Gemm, scalar c: alpha * c instead)
    y / c  ==  (W / c) x + B / c             (only when c has no zeros)
    y - c  ==  W x + (B - c)
    c - y  ==  (-W) x + (c - B)

Exact up to rounding: ``y / c`` becomes a multiplication by ``1/c`` (computed in
float64, rounded once into the weights), a difference of about one unit in the last
place. ``c * y`` is matched as well as ``y * c``. Adding a constant is bias.py's rule.

Refused: a ``c`` that broadcasts over batch or spatial axes, division by a constant
with a zero, non-finite constants, non-constant weights when they would have to
change, and any match whose intermediate value is used elsewhere.
"""

from __future__ import annotations

__all__ = ["SCALE"]

from gcomp.passes.fusion._affine import fold_rules
from gcomp.passes.fusion._engine import fusion

SCALE = fusion(
    "scale", lambda run: fold_rules(run, "scale", ("mul", "mul-r", "div", "sub", "sub-r")),
    [("", "Conv", 1), ("", "ConvTranspose", 1), ("", "Gemm", 1)],
    "Conv/ConvTranspose/Gemm followed by Mul/Div/Sub by a per-channel constant -> folded weights and bias")
