"""Decomposed layer normalisation -> ``LayerNormalization`` (opset 17).

Math, over the trailing axes A = {r-k, ..., r-1} of x (rank r):

    mean = ReduceMean(x, A)            d   = x - mean
    var  = ReduceMean(d * d, A)        y   = d / sqrt(var + eps) * gamma + beta

is exactly ``LayerNormalization(x, gamma, beta, axis=r-k, epsilon=eps)`` (statistics in
fp32: stash_type=1). Variants matched: ``d^2`` as ``Pow(d, 2)`` or ``d * d``; the
division as ``Div(d, s)`` or ``d * Reciprocal(s)``; with or without gamma and beta; the
operands of Add/Mul in either order. Refused (``check``): axes that are not the trailing
ones or differ between the two means, ``keepdims=0``, an epsilon that is not a
non-negative scalar constant, an epsilon added outside the square root (``d / (sqrt(var)
+ eps)`` is a different function), gamma/beta that broadcast over non-normalised axes,
and any intermediate value used outside the pattern (the matcher's rule).
"""

from __future__ import annotations

__all__ = ["LAYER_NORM", "LAYER_NORM_NO_AFFINE", "LAYER_NORM_NO_BIAS", "LAYER_NORM_SCALE_SHIFT"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion
from gcomp.passes.fusion._norm import divided, epsilon, normalised_axes, variant_rules


class LayerNormFusion(RunRule):
    def __init__(self, name: str, run: FusionRun, *, square: str, divide: str, affine: str):
        super().__init__(name, run)
        self.square, self.divide, self.affine = square, divide, affine

    def _statistics(self, op, x, eps):
        """mean, d = x - mean and sqrt(var + eps), with the square written as ``self.square``."""
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        sq = op.Pow(d, 2.0) if self.square == "pow" else op.Mul(d, d)
        var = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"])
        return mean, d, op.Sqrt(op.Add(var, eps))

    def pattern(self, op, x, eps, gamma, beta):
        _mean, d, std = self._statistics(op, x, eps)
        n = divided(op, d, std, self.divide)
        if self.affine == "none":
            return n
        scaled = op.Mul(n, gamma)
        if self.affine == "scale":
            return scaled
        return op.Add(scaled, beta)

    def check(self, context, x, eps, mean, var, gamma=None, beta=None, **_):
        result = pattern.MatchResult()
        norm, failure = normalised_axes(self.run, x, eps, mean, var)
        if failure:
            return result.fail(*failure)
        norm_shape = [x.shape[a] for a in norm]
        for name, v in (("gamma", gamma), ("beta", beta)):
            if v is None:
                continue
            if v.dtype != x.dtype:
                return result.fail(f"{name} dtype differs from the input's", v)
            if v.shape is None or v.shape.rank() is None:
                return result.fail(f"{name} shape unknown", v)
            dims = list(v.shape.dims)
            while dims and dims[0] == 1 and len(dims) > len(norm):
                dims.pop(0)
            if len(dims) > len(norm) or any(
                not isinstance(d, int) or (d != 1 and d != n) for d, n in zip(reversed(dims), reversed(norm_shape))
            ):
                return result.fail(f"{name} broadcasts over non-normalised axes", v)
            if any(d == 1 and n != 1 for d, n in zip(reversed(dims), reversed(norm_shape))) or len(dims) < len(norm):
                if self.run.const(v) is None or not all(isinstance(n, int) for n in norm_shape):
                    return result.fail(f"{name} must be broadcast to the normalised shape but is not constant", v)
        if gamma is None and not all(isinstance(n, int) for n in norm_shape):
            return result.fail("normalised dims are symbolic: cannot build a unit gamma", x)
        return result

    def rewrite(self, op, x, eps, mean, gamma=None, beta=None, **_):
        axes, _ = normalised_axes(self.run, x, eps, mean)  # what check() accepted
        norm_shape = [x.shape[a] for a in axes]
        dtype = x.dtype.numpy()
        gamma = _as_norm_shaped(op, self.run, gamma, norm_shape, dtype, fill=1.0, base="ln_scale")
        inputs = [x, gamma]
        if beta is not None:
            inputs.append(_as_norm_shaped(op, self.run, beta, norm_shape, dtype, fill=0.0, base="ln_bias"))
        return op.LayerNormalization(*inputs, axis=axes[0], epsilon=epsilon(self.run, eps), stash_type=1)


def _as_norm_shaped(op, run: FusionRun, value, norm_shape, dtype, *, fill: float, base: str):
    """``value`` itself when it already has the normalised shape, else a broadcast constant."""
    if value is None:
        return run.fresh_initializer(op, np.full(norm_shape, fill, dtype=dtype), base)
    if value.shape is not None and list(value.shape.dims) == list(norm_shape):
        return value
    array = run.const(value)
    if array.ndim > len(norm_shape):  # leading 1s only (checked)
        array = array.reshape(array.shape[array.ndim - len(norm_shape):])
    return run.fresh_initializer(op, np.broadcast_to(array, norm_shape).astype(dtype), value.name or base)


class LayerNormScaleShiftFusion(LayerNormFusion):
    """The form tf2onnx emits for Keras LayerNormalization (batch-norm style algebra):

        s = gamma / sqrt(var + eps);   y = x * s + (beta - mean * s)

    which is (x - mean) * s + beta: the same LayerNormalization.
    """

    def pattern(self, op, x, eps, gamma, beta):
        mean, _d, std = self._statistics(op, x, eps)
        rstd = op.Reciprocal(std) if self.divide == "reciprocal" else op.Div(1.0, std)
        s = op.Mul(rstd, gamma)
        return op.Add(op.Mul(x, s), op.Sub(beta, op.Mul(mean, s)))


def _rules(affine: str):
    return lambda run: variant_rules(LayerNormFusion, f"layer-norm-{affine}", run, affine=affine)


_EMITS = [("", "LayerNormalization", 17)]
# The widest form (gamma and beta) is the first fusion: the bare form would otherwise match
# the Div (visited before the Mul/Add that hold gamma and beta) and leave them unfused.
LAYER_NORM = fusion(
    "layer-norm", _rules("full"), _EMITS,
    "ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add -> LayerNormalization (opset 17)", needs=("ReduceMean",))
LAYER_NORM_SCALE_SHIFT = fusion(
    "layer-norm-scale-shift", lambda run: variant_rules(LayerNormScaleShiftFusion, "layer-norm-ss", run, affine="full"),
    _EMITS, "x*s + (beta - mean*s), s = gamma/sqrt(var+eps) (tf2onnx's Keras form) -> LayerNormalization (opset 17)",
    needs=("ReduceMean",))
LAYER_NORM_NO_BIAS = fusion("layer-norm-no-bias", _rules("scale"), _EMITS,
                            "the same without beta -> LayerNormalization (opset 17)", needs=("ReduceMean",))
LAYER_NORM_NO_AFFINE = fusion(
    "layer-norm-no-affine", _rules("none"), _EMITS,
    "the same without gamma and beta -> LayerNormalization with a unit scale (opset 17)", needs=("ReduceMean",))
