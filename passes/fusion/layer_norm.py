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

__all__ = ["ORDER", "epsilon", "normalised_axes", "reduce_axes", "variant_rules"]

import numpy as np
from gcomp.passes.fusion._engine import const_array, fresh_initializer, fusion
from onnxscript.rewriter import pattern

ORDER = 30


def reduce_axes(node) -> list[int] | None:
    """A ReduceMean's axes (attribute before opset 18, input from 18), None if not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _keepdims(node) -> int:
    attr = node.attributes.get("keepdims")
    return 1 if attr is None else attr.as_int()


def normalised_axes(x, eps, *means):
    """What the statistics of a decomposed norm have to satisfy, shared by LayerNorm and RMS
    norm: a float input of known rank, ReduceMeans with the same constant trailing axes and
    keepdims, an epsilon that is a non-negative scalar constant.

    Returns ``(axes, None)`` (sorted, non-negative) or ``(None, (reason, culprit))``.
    """
    if x.dtype is None or not x.dtype.is_floating_point():
        return None, ("input is not a float tensor", x)
    rank = x.shape.rank() if x.shape is not None else None
    if rank is None:
        return None, ("input rank unknown (run shape inference)", x)
    found = [reduce_axes(m.producer()) for m in means]
    if any(a is None for a in found):
        return None, ("ReduceMean axes are not constant", means[0])
    axes = sorted(a % rank for a in found[0])
    if any(sorted(a % rank for a in other) != axes for other in found[1:]):
        return None, ("the two ReduceMeans reduce different axes", means[-1])
    if not axes or axes != list(range(rank - len(axes), rank)):
        return None, ("reduced axes are not the trailing axes", means[0])
    if any(_keepdims(m.producer()) != 1 for m in means):
        return None, ("ReduceMean without keepdims", means[0])
    if epsilon(eps) is None:
        return None, ("epsilon is not a non-negative scalar constant", eps)
    return axes, None


def epsilon(eps) -> float | None:
    """The value of a non-negative finite scalar constant, else None."""
    e = const_array(eps)
    if e is None or e.size != 1 or not np.isfinite(e).all() or float(e.reshape(())) < 0:
        return None
    return float(e.reshape(()))


def variant_rules(cls, prefix: str, **kwargs) -> list:
    """``cls``'s rules for every way exporters write the square (Pow / Mul) and the division
    (Div / Reciprocal), with their Add/Mul operand orders commuted."""
    return [
        rule
        for square in ("pow", "mul")
        for divide in ("div", "reciprocal")
        for rule in cls.rule(f"{prefix}-{square}-{divide}", square=square, divide=divide, **kwargs).commute()
    ]


class LayerNormFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, square: str, divide: str, affine: str):
        super().__init__(name)
        self.square, self.divide, self.affine = square, divide, affine

    def pattern(self, op, x, eps, gamma, beta):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        sq = op.Pow(d, 2.0) if self.square == "pow" else op.Mul(d, d)
        var = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        n = op.Div(d, std) if self.divide == "div" else op.Mul(d, op.Reciprocal(std))
        if self.affine == "none":
            return n
        scaled = op.Mul(n, gamma)
        if self.affine == "scale":
            return scaled
        return op.Add(scaled, beta)

    def check(self, context, x, eps, mean, var, gamma=None, beta=None, **_):
        result = pattern.MatchResult()
        norm, failure = normalised_axes(x, eps, mean, var)
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
                if const_array(v) is None or not all(isinstance(n, int) for n in norm_shape):
                    return result.fail(f"{name} must be broadcast to the normalised shape but is not constant", v)
        if gamma is None and not all(isinstance(n, int) for n in norm_shape):
            return result.fail("normalised dims are symbolic: cannot build a unit gamma", x)
        return result

    def rewrite(self, op, x, eps, mean, gamma=None, beta=None, **_):
        axes, _ = normalised_axes(x, eps, mean)  # what check() accepted
        norm_shape = [x.shape[a] for a in axes]
        dtype = x.dtype.numpy()
        gamma = _as_norm_shaped(op, gamma, norm_shape, dtype, fill=1.0, base="ln_scale")
        inputs = [x, gamma]
        if beta is not None:
            inputs.append(_as_norm_shaped(op, beta, norm_shape, dtype, fill=0.0, base="ln_bias"))
        return op.LayerNormalization(*inputs, axis=axes[0], epsilon=epsilon(eps), stash_type=1)


def _as_norm_shaped(op, value, norm_shape, dtype, *, fill: float, base: str):
    """``value`` itself when it already has the normalised shape, else a broadcast constant."""
    if value is None:
        return fresh_initializer(op, np.full(norm_shape, fill, dtype=dtype), base)
    if value.shape is not None and list(value.shape.dims) == list(norm_shape):
        return value
    array = const_array(value)
    if array.ndim > len(norm_shape):  # leading 1s only (checked)
        array = array.reshape(array.shape[array.ndim - len(norm_shape):])
    return fresh_initializer(op, np.broadcast_to(array, norm_shape).astype(dtype), value.name or base)


class LayerNormScaleShiftFusion(LayerNormFusion):
    """The form tf2onnx emits for Keras LayerNormalization (batch-norm style algebra):

        s = gamma / sqrt(var + eps);   y = x * s + (beta - mean * s)

    which is (x - mean) * s + beta: the same LayerNormalization.
    """

    def pattern(self, op, x, eps, gamma, beta):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        sq = op.Pow(d, 2.0) if self.square == "pow" else op.Mul(d, d)
        var = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        rstd = op.Reciprocal(std) if self.divide == "reciprocal" else op.Div(1.0, std)
        s = op.Mul(rstd, gamma)
        return op.Add(op.Mul(x, s), op.Sub(beta, op.Mul(mean, s)))


def _rules(affine: str) -> list:
    return variant_rules(LayerNormFusion, f"layer-norm-{affine}", affine=affine)


# Widest form first over the whole graph: the bare form would otherwise match the Div
# (visited before the Mul/Add that hold gamma and beta) and leave them unfused.
fusion("layer-norm", "portable", _rules("full"), [("", "LayerNormalization", 17)],
       "ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add -> LayerNormalization (opset 17)", needs=("ReduceMean",))
fusion("layer-norm-scale-shift", "portable",
       variant_rules(LayerNormScaleShiftFusion, "layer-norm-ss", affine="full"),
       [("", "LayerNormalization", 17)],
       "x*s + (beta - mean*s), s = gamma/sqrt(var+eps) (tf2onnx's Keras form) -> LayerNormalization (opset 17)",
       needs=("ReduceMean",))
fusion("layer-norm-no-bias", "portable", _rules("scale"), [("", "LayerNormalization", 17)],
       "the same without beta -> LayerNormalization (opset 17)", needs=("ReduceMean",))
fusion("layer-norm-no-affine", "portable", _rules("none"), [("", "LayerNormalization", 17)],
       "the same without gamma and beta -> LayerNormalization with a unit scale (opset 17)", needs=("ReduceMean",))
