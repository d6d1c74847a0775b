"""A zero Pad on the spatial axes before Conv -> the Conv's own ``pads``.

Math. ``Conv(x, W; pads=p)`` convolves ``x`` padded with zeros by ``p`` on each spatial
side. ``Pad(x, q, mode="constant", value=0)`` with ``q`` zero on the batch and channel
axes pads the same axes with the same zeros, so

    Conv(Pad(x, q), W; pads=p)  ==  Conv(x, W; pads=p + q)     (q, p split per side)

Exact: the same products of the same (zero-extended) input. Exporters emit this pair
for TensorFlow-style "same" padding (e.g. transformers' MobileNetV2); ONNX Runtime's
own PadFusion does the same at session start but only for a plain Conv: a Pad left
before a com.microsoft FusedConv stays, and splits ORT's NCHWc layout into reorders
(transformers' MobileNetV2 at O3 without this rule: 18 Pads, 35 reorders). So the
rule serves twice: here for Conv (portable) and in ort_pad_fused_conv.py for FusedConv
(same ``pads``).

Refused: a mode other than constant, a non-zero or non-constant pad value, pads that are
not constant, negative pads (cropping), pads on the batch or channel axes, a Pad with
``axes`` that do not cover the spatial axes alone, a Conv with ``auto_pad`` other than
NOTSET, and a padded value used elsewhere.
"""

from __future__ import annotations

__all__ = ["PAD_CONV", "PadIntoConv"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion


def _rank(value) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


def _pad_amounts(run: FusionRun, pad: ir.Node, rank: int) -> tuple[np.ndarray | None, str]:
    """The Pad's per-axis amounts as a [2, rank] array (begins, ends), or why not usable."""
    mode = pad.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return None, f"Pad mode is {mode.as_string()}, not constant"
    inputs = list(pad.inputs)
    if "pads" in pad.attributes:  # Pad-1/-2: attributes
        amounts = np.asarray(pad.attributes["pads"].as_ints(), np.int64)
        value = pad.attributes["value"].as_float() if "value" in pad.attributes else 0.0
        axes = None
    else:
        amounts = run.const(inputs[1]) if len(inputs) > 1 else None
        if amounts is None:
            return None, "Pad amounts are not a constant"
        value = 0.0
        if len(inputs) > 2 and inputs[2] is not None:
            v = run.const(inputs[2])
            if v is None or v.size != 1:
                return None, "Pad value is not a constant scalar"
            value = float(v.reshape(()))
        axes = None
        if len(inputs) > 3 and inputs[3] is not None:
            axes = run.const(inputs[3])
            if axes is None:
                return None, "Pad axes are not a constant"
    if value != 0.0:
        return None, "Pad value is not zero"
    amounts = np.asarray(amounts, np.int64).reshape(-1)
    if axes is None:
        if amounts.size != 2 * rank:
            return None, "Pad amounts do not match the input rank"
        return amounts.reshape(2, rank), ""
    axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    if len(set(axes)) != len(axes) or amounts.size != 2 * len(axes):
        return None, "Pad axes are malformed"
    full = np.zeros((2, rank), np.int64)
    for i, a in enumerate(axes):
        full[0, a], full[1, a] = amounts[i], amounts[len(axes) + i]
    return full, ""


class PadIntoConv(RunRule):
    """``Conv(Pad(x, q), W; pads=p)`` -> ``Conv(x, W; pads=p + q)`` (``op_type`` in ``domain``:
    Conv, or a Conv with the same ``pads`` attribute such as com.microsoft FusedConv)."""

    def __init__(self, name: str, run: FusionRun, *, domain: str = "", op_type: str = "Conv"):
        super().__init__(name, run)
        self.domain, self.op_type = domain, op_type

    def pattern(self, op, x):
        padded = op.Pad(x, _allow_other_inputs=True, _outputs=["pad_out"])
        return getattr(op, self.op_type)(padded, _domain=self.domain, _allow_other_inputs=True,
                                         _outputs=["conv_out"])

    def _plan(self, x, pad_out, conv_out):
        conv = conv_out.producer()
        rank = _rank(x)
        if rank is None or rank < 3:
            return None, "input rank unknown"
        auto_pad = conv.attributes.get("auto_pad")
        if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
            return None, "Conv uses auto_pad"
        amounts, why = _pad_amounts(self.run, pad_out.producer(), rank)
        if amounts is None:
            return None, why
        if np.any(amounts < 0):
            return None, "negative pads (cropping)"
        if np.any(amounts[:, :2] != 0):
            return None, "Pad pads the batch or channel axis"
        spatial = rank - 2
        old = conv.attributes.get("pads")
        old = np.asarray(old.as_ints(), np.int64) if old is not None else np.zeros(2 * spatial, np.int64)
        if old.size != 2 * spatial:
            return None, "Conv pads do not match the input rank"
        new = old + np.concatenate([amounts[0, 2:], amounts[1, 2:]])
        return [int(v) for v in new], ""

    def check(self, context, x, pad_out, conv_out, **_):
        new, why = self._plan(x, pad_out, conv_out)
        return pattern.MatchResult() if new is not None else pattern.MatchResult().fail(why, pad_out)

    def rewrite(self, op, x, pad_out, conv_out, **_):
        conv = conv_out.producer()
        new, _ = self._plan(x, pad_out, conv_out)
        attrs = dict(conv.attributes)
        attrs["pads"] = ir.AttrInt64s("pads", new)
        attrs.pop("auto_pad", None)
        return getattr(op, self.op_type)(x, *list(conv.inputs)[1:], _domain=self.domain, **attrs)


PAD_CONV = fusion("pad-conv", lambda run: [PadIntoConv.rule("pad-conv", run)], [("", "Conv", 1)],
                  "Pad(constant 0, spatial axes) -> Conv's pads")
