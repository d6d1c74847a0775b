"""Decomposed RMS normalisation -> ``RMSNormalization`` (opset 23).

Math, over the trailing axes A of x:

    y = x / sqrt(ReduceMean(x * x, A) + eps) * gamma

is exactly ``RMSNormalization(x, gamma, axis=min(A), epsilon=eps)`` (statistics in fp32:
stash_type=1). Variants: ``x^2`` as ``Pow(x, 2)`` or ``x * x``; ``Div(x, s)``,
``x * Reciprocal(s)`` or ``x * (1 / s)`` (TorchScript's ``rsqrt``); with or without gamma (a unit scale is made); operands of Mul/Add
in either order. Emitted only when the model's opset is >= 23 (``--target-opset 23``
upgrades) and the target accepts it. Refused: non-trailing axes, ``keepdims=0``, an
epsilon that is not a non-negative scalar constant or sits outside the square root, a
gamma that broadcasts over non-normalised axes, intermediates used elsewhere.
"""

from __future__ import annotations

__all__ = ["RMS_NORM", "RMS_NORM_NO_SCALE"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion
from gcomp.passes.fusion._norm import divided, epsilon, normalised_axes, variant_rules


class RmsNormFusion(RunRule):
    def __init__(self, name: str, run: FusionRun, *, square: str, divide: str, scaled: bool):
        super().__init__(name, run)
        self.square, self.divide, self.scaled = square, divide, scaled

    def pattern(self, op, x, eps, gamma):
        sq = op.Pow(x, 2.0) if self.square == "pow" else op.Mul(x, x)
        ms = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["ms"])
        rms = op.Sqrt(op.Add(ms, eps))
        n = divided(op, x, rms, self.divide)
        return op.Mul(n, gamma) if self.scaled else n

    def check(self, context, x, eps, ms, gamma=None, **_):
        result = pattern.MatchResult()
        axes, failure = normalised_axes(self.run, x, eps, ms)
        if failure:
            return result.fail(*failure)
        norm_shape = [x.shape[a] for a in axes]
        if gamma is None:
            if not all(isinstance(d, int) for d in norm_shape):
                return result.fail("normalised dims are symbolic: cannot build a unit scale", x)
            return result
        if gamma.dtype != x.dtype or gamma.shape is None:
            return result.fail("gamma dtype differs or its shape is unknown", gamma)
        dims = list(gamma.shape.dims)
        while len(dims) > len(axes) and dims[0] == 1:
            dims.pop(0)
        if dims != norm_shape:
            return result.fail("gamma is not shaped like the normalised axes", gamma)
        return result

    def rewrite(self, op, x, eps, ms, gamma=None, **_):
        axes, _ = normalised_axes(self.run, x, eps, ms)  # what check() accepted
        norm_shape = [x.shape[a] for a in axes]
        if gamma is None:
            gamma = self.run.fresh_initializer(op, np.ones(norm_shape, dtype=x.dtype.numpy()), "rms_scale")
        elif list(gamma.shape.dims) != norm_shape:
            array = self.run.const(gamma)
            if array is not None:
                gamma = self.run.fresh_initializer(op, array.reshape(norm_shape), gamma.name or "rms_scale")
            else:
                gamma = op.Reshape(gamma, op.Constant(value_ints=norm_shape))
        return self.emit(op, x, gamma, axis=axes[0], eps=epsilon(self.run, eps))

    def emit(self, op, x, gamma, *, axis: int, eps: float):
        """The fused node (a subclass emits another op of the same math and attributes)."""
        return op.RMSNormalization(x, gamma, axis=axis, epsilon=eps, stash_type=1)


def _rules(scaled: bool):
    return lambda run: variant_rules(RmsNormFusion, f"rms-norm-{int(scaled)}", run, scaled=scaled)


# The scaled form is the first fusion: the bare one would take x / rms and leave the Mul.
RMS_NORM = fusion("rms-norm", _rules(True), [("", "RMSNormalization", 23)],
                  "x / sqrt(mean(x^2) + eps) * gamma -> RMSNormalization (opset 23)", needs=("ReduceMean",))
RMS_NORM_NO_SCALE = fusion(
    "rms-norm-no-scale", _rules(False), [("", "RMSNormalization", 23)],
    "x / sqrt(mean(x^2) + eps) -> RMSNormalization with a unit scale (opset 23)", needs=("ReduceMean",))
