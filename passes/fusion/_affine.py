"""Folding a per-output-channel affine map ``y * s + t`` into the linear op that made ``y``.

Math (shared by conv_bn.py, bias.py and scale.py). The linear ops are affine in their
weights, per output channel ``m``:

    Conv:           y[n, m, ...] = sum_{c,k} W[m, c, k] x[n, c, ...] + B[m]
    ConvTranspose:  y[n, m, ...] = sum_{c,k} W[c, m', k] x[n, c, ...] + B[m]
                    (W is [C, M/group, k...], m = g * M/group + m')
    Gemm:           y[i, m]      = alpha * sum_k A'[i, k] B'[k, m] + beta * C[i, m]

so for ``s`` and ``t`` constant per output channel (or scalars):

    y * s + t  ==  the same op with  W'[m] = W[m] * s[m]  and  B'[m] = B[m] * s[m] + t[m]

(Gemm: the columns of B' scale, ``C' = beta * C * s + t`` with ``beta = 1``; a scalar
``s`` goes into ``alpha`` instead, leaving the weights untouched). The only change is
rounding: the folded constants are computed in float64 and rounded once to the
weights' dtype.

A constant is "per output channel" when, aligned right against the output rank, every
axis except the channel axis (1 for Conv/ConvTranspose, the last for Gemm) has size 1
and its rank is not above the output's: anything else broadcasts over batch or spatial
axes (or grows the output) and is refused.

New weights are always fresh initializers: an initializer shared with nodes outside
the match keeps its value. Nothing here modifies a tensor in place.
"""

from __future__ import annotations

__all__ = ["KINDS", "LINEAR_OPS", "FoldIntoLinear", "Linear", "affine_of", "check_fold", "fold", "fold_rules",
           "linear_of", "per_channel"]

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._dims import float_attr, int_attr
from gcomp.passes.fusion._engine import FusionRun, RunRule

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm")
_FLOATS = (np.float16, np.float32, np.float64)


@dataclass
class Linear:
    """What folding needs to know about a Conv/ConvTranspose/Gemm node."""

    node: ir.Node
    channels: int | None  # number of output channels, when known
    rank: int  # rank of the output
    axis: int  # the output's channel axis
    weight: np.ndarray | None  # W / B constant, when it is one
    bias: np.ndarray | None  # Conv B / Gemm C constant (None when absent)
    has_bias: bool
    dtype: np.dtype


def linear_of(run: FusionRun, node: ir.Node) -> tuple[Linear | None, str]:
    """Describe ``node`` (a Conv/ConvTranspose/Gemm), or say why it cannot be folded into."""
    if node.domain != "" or node.op_type not in LINEAR_OPS:
        return None, f"{node.op_type} is not a Conv/ConvTranspose/Gemm"
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return None, "missing input or weight"
    w_val = inputs[1]
    has_bias = len(inputs) > 2 and inputs[2] is not None
    bias = run.const(inputs[2]) if has_bias else None
    if has_bias and bias is None:
        return None, "the existing bias is not a constant"
    weight = run.const(w_val)
    dtype = w_val.dtype.numpy() if w_val.dtype is not None else (weight.dtype if weight is not None else None)
    if dtype is None or dtype.type not in _FLOATS:
        return None, "weights are not a float tensor"
    out = node.outputs[0]
    w_shape = weight.shape if weight is not None else (
        tuple(w_val.shape) if w_val.shape is not None else None)
    if node.op_type == "Gemm":
        rank, axis = 2, 1
        trans_b = int_attr(node, "transB", 0)
        dim = None if w_shape is None or len(w_shape) != 2 else w_shape[0 if trans_b else 1]
    else:
        if w_shape is not None:
            rank = len(w_shape)
        elif out.shape is not None:
            rank = out.shape.rank()
        else:
            return None, "rank of the convolution unknown"
        axis = 1
        if w_shape is None:
            dim = None
        elif node.op_type == "Conv":
            dim = w_shape[0]
        else:
            g = int_attr(node, "group", 1)
            dim = w_shape[1] * g if isinstance(w_shape[1], int) else None
    channels = dim if isinstance(dim, int) else None
    return Linear(node, channels, rank, axis, weight, bias, has_bias, np.dtype(dtype)), ""


def per_channel(c: np.ndarray, lin: Linear) -> tuple[np.ndarray | None, str]:
    """``c`` as a float64 vector over the output channels (length 1 for a scalar), or why not."""
    if c.dtype != lin.dtype:
        return None, f"constant dtype {c.dtype} differs from the weights' {lin.dtype}"
    if c.ndim > lin.rank:
        return None, "constant has a higher rank than the output (it would broadcast it)"
    shape = (1,) * (lin.rank - c.ndim) + c.shape
    axis = lin.axis
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None, "constant broadcasts over the batch or spatial axes, not per output channel"
    vec = c.reshape(-1).astype(np.float64)
    if vec.size != 1:
        if lin.channels is None:
            return None, "number of output channels unknown"
        if vec.size != lin.channels:
            return None, f"constant has {vec.size} channels, the output {lin.channels}"
    return vec, ""


def check_fold(lin: Linear, scale: np.ndarray | None, shift: np.ndarray | None) -> str:
    """Why ``lin(x) * scale + shift`` cannot be folded into ``lin`` ("" when it can)."""
    for v in (scale, shift):
        if v is not None and not np.all(np.isfinite(v)):
            return "constant is not finite"
    if lin.node.op_type != "Gemm" and lin.channels is None:
        return "number of output channels unknown"
    if scale is None or np.all(scale == 1.0):
        return ""
    if lin.node.op_type == "Gemm" and scale.size == 1:
        return ""  # goes into alpha
    if lin.weight is None:
        return "the weights are not a constant"
    if lin.node.op_type == "ConvTranspose":
        g = int_attr(lin.node, "group", 1)
        if g < 1 or lin.weight.shape[0] % g:
            return "input channels not divisible by group"
    return ""


def _scaled_weight(lin: Linear, scale: np.ndarray) -> np.ndarray:
    w = lin.weight.astype(np.float64)
    node = lin.node
    if node.op_type == "Conv":
        s = np.broadcast_to(scale, (w.shape[0],)).reshape((-1,) + (1,) * (w.ndim - 1))
        return w * s
    if node.op_type == "ConvTranspose":
        g = int_attr(node, "group", 1)
        c_in, m_g = w.shape[0], w.shape[1]
        s = np.broadcast_to(scale, (g * m_g,)).reshape((g, 1, m_g) + (1,) * (w.ndim - 2))
        return (w.reshape((g, c_in // g) + w.shape[1:]) * s).reshape(w.shape)
    # Gemm: scale the output columns of B'.
    if int_attr(node, "transB", 0):
        return w * np.broadcast_to(scale, (w.shape[0],))[:, None]
    return w * np.broadcast_to(scale, (w.shape[1],))[None, :]


def fold(op, run: FusionRun, lin: Linear, x: ir.Value, scale: np.ndarray | None,
         shift: np.ndarray | None) -> ir.Value:
    """Emit ``lin``'s op computing ``lin(x) * scale + shift`` (both per channel, float64; None = 1 / 0)."""
    node = lin.node
    attrs = dict(node.attributes)
    w_val = node.inputs[1]
    base = w_val.name or node.op_type
    scale = np.ones(1) if scale is None else scale
    shift = np.zeros(1) if shift is None else shift
    weight = w_val
    if node.op_type == "Gemm" and scale.size == 1:
        if scale[0] != 1.0:
            attrs["alpha"] = ir.AttrFloat32("alpha", float(float_attr(node, "alpha", 1.0) * scale[0]))
    elif not np.all(scale == 1.0):
        weight = run.fresh_initializer(op, _scaled_weight(lin, scale).astype(lin.dtype), base)
    if node.op_type == "Gemm":
        # C' = beta * C * s + t (C may be a scalar, [N], [1, N], [M, 1] or [M, N]: numpy's
        # broadcasting against the per-column s and t gives a C' Gemm still broadcasts).
        beta = float_attr(node, "beta", 1.0)
        attrs.pop("beta", None)
        old = lin.bias.astype(np.float64) * beta if lin.has_bias else np.zeros(1)
        bias = old * scale + shift
        if not lin.has_bias and not np.any(bias):
            bias = None
        elif bias.ndim == 1 and bias.size == 1 and lin.channels is not None:
            bias = np.broadcast_to(bias, (lin.channels,))
    else:
        old = lin.bias.astype(np.float64) if lin.has_bias else np.zeros(1)
        bias = np.broadcast_to(old * scale + shift, (lin.channels,))
    inputs = [x, weight]
    if bias is not None:
        bias_name = (node.inputs[2].name if lin.has_bias else "") or f"{base}_bias"
        inputs.append(run.fresh_initializer(op, np.asarray(bias).astype(lin.dtype), bias_name))
    return getattr(op, node.op_type)(*inputs, **attrs)


# --------------------------------------------------------------------------- the shared rule

# kind -> (ONNX op, constant first?): the post-op is  y op c  or  c op y.
KINDS = {
    "add": ("Add", False), "add-r": ("Add", True),
    "mul": ("Mul", False), "mul-r": ("Mul", True),
    "div": ("Div", False),
    "sub": ("Sub", False), "sub-r": ("Sub", True),
}


def affine_of(kind: str, v: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(scale, shift) with  y op c == y * scale + shift  for the per-channel vector ``v`` of ``c``."""
    base = kind.split("-")[0]
    if base == "add":
        return None, v, ""
    if base == "mul":
        return v, None, ""
    if base == "div":
        if np.any(v == 0):
            return None, None, "division by a constant that has zeros"
        return 1.0 / v, None, ""
    if kind == "sub":
        return None, -v, ""
    return -np.ones(1), v, ""  # c - y


class FoldIntoLinear(RunRule):
    """``Linear(x, W[, B]) op c`` with ``c`` a per-output-channel constant -> ``Linear(x, W', B')``."""

    def __init__(self, name: str, run: FusionRun, *, op_type: str, kind: str):
        super().__init__(name, run)
        self.op_type, self.kind = op_type, kind

    def pattern(self, op, x, c):
        y = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["lin_out"])
        onnx_op, const_first = KINDS[self.kind]
        return getattr(op, onnx_op)(c, y) if const_first else getattr(op, onnx_op)(y, c)

    def _plan(self, lin_out, c):
        lin, why = linear_of(self.run, lin_out.producer())
        if lin is None:
            return None, why
        array = self.run.const(c)
        if array is None:
            return None, "the other operand is not a constant"
        v, why = per_channel(array, lin)
        if v is None:
            return None, why
        scale, shift, why = affine_of(self.kind, v)
        if why:
            return None, why
        why = check_fold(lin, scale, shift)
        return ((lin, scale, shift) if not why else None), why

    def check(self, context, lin_out, c, **_):
        plan, why = self._plan(lin_out, c)
        return pattern.MatchResult() if plan else pattern.MatchResult().fail(why, c)

    def rewrite(self, op, x, lin_out, c, **_):
        lin, scale, shift = self._plan(lin_out, c)[0]
        return fold(op, self.run, lin, x, scale, shift)


def fold_rules(run: FusionRun, prefix: str, kinds) -> list:
    return [FoldIntoLinear.rule(f"{prefix}-{t.lower()}-{k}", run, op_type=t, kind=k)
            for t in LINEAR_OPS for k in kinds]
