"""A zero Pad on the spatial axes before ONNX Runtime's ``com.microsoft`` FusedConv -> its ``pads``.

Math: FusedConv is ``f(Conv(x, W, B))`` with Conv's attributes, ``pads`` among them, so
``FusedConv(Pad(x, q); pads=p) == FusedConv(x; pads=p + q)`` exactly as for Conv (see
pad_conv.py, whose rule this is, with the same refusals).

Why: ORT's own PadFusion folds a Pad into a plain Conv only; a Pad left before a FusedConv
splits ORT's NCHWc layout into reorders (transformers' MobileNetV2 at O3 without this rule:
18 Pads, 35 reorders). At O3 the target's fusions run before the portable ones, so a Conv
may already be a FusedConv when its Pad is looked at.
"""

from __future__ import annotations

__all__ = ["ORT_PAD_FUSED_CONV"]

from gcomp.passes.fusion._engine import fusion
from gcomp.passes.fusion.pad_conv import PadIntoConv

ORT_PAD_FUSED_CONV = fusion(
    "ort-pad-fused-conv",
    lambda run: [PadIntoConv.rule("ort-pad-fused-conv", run, domain="com.microsoft", op_type="FusedConv")],
    [("com.microsoft", "FusedConv", 1)], "Pad(constant 0, spatial axes) -> com.microsoft FusedConv's pads")
