"""Conv (+ bias) followed by an activation -> ONNX Runtime's ``com.microsoft`` FusedConv.

Math. ``FusedConv(x, W, B; activation=f, activation_params=p)`` is ``f_p(Conv(x, W, B))``
with the Conv attributes unchanged (ORT contrib op, domain com.microsoft, version 1; CPU
kernel: MLAS convolution with the activation applied in its output loop). The
activations and their parameters, as ORT's CPU kernel reads them:

    Relu                  max(y, 0)
    Sigmoid               1 / (1 + exp(-y))
    Tanh                  tanh(y)
    LeakyRelu [alpha]     y if y >= 0 else alpha * y            (alpha default 0.01)
    Clip [min, max]       min(max(y, min), max)                (absent bound: float lowest/max)
    HardSigmoid [a, b]    max(0, min(1, a * y + b))             (defaults 0.2, 0.5)

So the rewrite is the same arithmetic in one kernel. Sigmoid/Tanh go through MLAS's own
approximations of exp/tanh: equal to ORT's standalone Sigmoid/Tanh kernels to about
1e-6 relative, not bit for bit.

Only float32 (the one type ORT's FusedConv kernels are registered for). For
``ort-cuda`` only Relu fuses: ORT's CUDA FusedConv accepts no other activation. A Clip
whose bounds are not constants, and a Conv output used elsewhere, are refused.
"""

from __future__ import annotations

__all__ = ["ACTIVATIONS", "ORT_FUSED_CONV"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion

_DEFAULTS = {"LeakyRelu": (("alpha", 0.01),), "HardSigmoid": (("alpha", 0.2), ("beta", 0.5))}
ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid")


def _clip_bounds(run: FusionRun, node: ir.Node) -> tuple[list[float] | None, str]:
    lo, hi = float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)
    if "min" in node.attributes or "max" in node.attributes:  # Clip-1/-6: bounds are attributes
        lo = node.attributes["min"].as_float() if "min" in node.attributes else lo
        hi = node.attributes["max"].as_float() if "max" in node.attributes else hi
        return [lo, hi], ""
    bounds = [lo, hi]
    for i, v in enumerate(list(node.inputs)[1:3]):
        if v is None:
            continue
        array = run.const(v)
        if array is None or array.size != 1:
            return None, "Clip bound is not a constant scalar"
        bounds[i] = float(array.reshape(()))
    return bounds, ""


def _params(run: FusionRun, act: ir.Node) -> tuple[list[float] | None, str]:
    if act.op_type == "Clip":
        return _clip_bounds(run, act)
    return [act.attributes[k].as_float() if k in act.attributes else d
            for k, d in _DEFAULTS.get(act.op_type, ())], ""


class _ConvActivation(RunRule):
    def __init__(self, name: str, run: FusionRun, *, activation: str):
        super().__init__(name, run)
        self.activation = activation

    def pattern(self, op, x):
        conv = op.Conv(x, _allow_other_inputs=True, _outputs=["conv_out"])
        if self.activation == "Clip":
            return op.Clip(conv, _allow_other_inputs=True, _outputs=["act_out"])
        return getattr(op, self.activation)(conv, _outputs=["act_out"])

    def check(self, context, x, conv_out, act_out, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("FusedConv runs float32 only", x)
        if self.run.target.name == "ort-cuda" and self.activation != "Relu":
            return result.fail(f"ORT's CUDA FusedConv runs Relu only, not {self.activation}", act_out)
        _, why = _params(self.run, act_out.producer())
        return result.fail(why, act_out) if why else result

    def rewrite(self, op, x, conv_out, act_out, **_):
        conv = conv_out.producer()
        params, _ = _params(self.run, act_out.producer())
        attrs = dict(conv.attributes)
        attrs["activation"] = ir.AttrString("activation", self.activation)
        if params:
            attrs["activation_params"] = ir.AttrFloat32s("activation_params", params)
        return op.FusedConv(*conv.inputs, _domain="com.microsoft", **attrs)


ORT_FUSED_CONV = fusion(
    "ort-fused-conv",
    lambda run: [_ConvActivation.rule(f"ort-fused-conv-{a.lower()}", run, activation=a) for a in ACTIVATIONS],
    [("com.microsoft", "FusedConv", 1)],
    "Conv(+bias) + Relu/Sigmoid/Tanh/LeakyRelu/Clip/HardSigmoid -> com.microsoft FusedConv")
