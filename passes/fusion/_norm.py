"""What the statistics of a decomposed normalisation must satisfy (shared by layer_norm.py
and rms_norm.py), and the variants exporters write them in.

A decomposed norm reduces with ``ReduceMean`` over trailing axes A of x (rank r), with
``keepdims=1``, and adds a non-negative scalar epsilon inside the square root; the fused
op (LayerNormalization, RMSNormalization) takes ``axis = min(A)`` and ``epsilon``.
"""

from __future__ import annotations

__all__ = ["DIVISIONS", "divided", "epsilon", "normalised_axes", "reduce_axes", "variant_rules"]

import numpy as np

from gcomp.passes.fusion._engine import FusionRun


def reduce_axes(run: FusionRun, node) -> list[int] | None:
    """A ReduceMean's axes (attribute before opset 18, input from 18), None if not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = run.const(node.inputs[1])
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _keepdims(node) -> int:
    attr = node.attributes.get("keepdims")
    return 1 if attr is None else attr.as_int()


def normalised_axes(run: FusionRun, x, eps, *means):
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
    found = [reduce_axes(run, m.producer()) for m in means]
    if any(a is None for a in found):
        return None, ("ReduceMean axes are not constant", means[0])
    axes = sorted(a % rank for a in found[0])
    if any(sorted(a % rank for a in other) != axes for other in found[1:]):
        return None, ("the two ReduceMeans reduce different axes", means[-1])
    if not axes or axes != list(range(rank - len(axes), rank)):
        return None, ("reduced axes are not the trailing axes", means[0])
    if any(_keepdims(m.producer()) != 1 for m in means):
        return None, ("ReduceMean without keepdims", means[0])
    if epsilon(run, eps) is None:
        return None, ("epsilon is not a non-negative scalar constant", eps)
    return axes, None


def epsilon(run: FusionRun, eps) -> float | None:
    """The value of a non-negative finite scalar constant, else None."""
    e = run.const(eps)
    if e is None or e.size != 1 or not np.isfinite(e).all() or float(e.reshape(())) < 0:
        return None
    return float(e.reshape(()))


DIVISIONS = ("div", "reciprocal", "one-over")


def divided(op, x, s, divide: str):
    """``x / s`` as exporters write it: ``Div(x, s)``, ``x * Reciprocal(s)``, or ``x * (1 / s)``
    (the TorchScript exporter's ``torch.rsqrt``, as in transformers' Llama RMSNorm)."""
    if divide == "div":
        return op.Div(x, s)
    return op.Mul(x, op.Reciprocal(s) if divide == "reciprocal" else op.Div(1.0, s))


def variant_rules(cls, prefix: str, run: FusionRun, **kwargs) -> list:
    """``cls``'s rules for every way exporters write the square (Pow / Mul) and the division
    (:func:`divided`), with their Add/Mul operand orders commuted."""
    return [
        rule
        for square in ("pow", "mul")
        for divide in DIVISIONS
        for rule in cls.rule(f"{prefix}-{square}-{divide}", run, square=square, divide=divide, **kwargs).commute()
    ]
