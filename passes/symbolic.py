"""gcomp's own symbolic shape propagation, where ONNX's inference loses dim identity.

ONNX shape inference names unknown dims ``unk__N`` afresh at many ops (a ``Gather`` of
an embedding table, a ``Reshape`` whose target is computed), so two dims that are the
same at run time (the batch of the input and the batch of a layer's hidden state) end
up with different names. Here each dim is an int or a *token*; equal tokens are equal
sizes at run time. Tokens start at graph inputs (their ``dim_param`` names, or one token
per unnamed dim) and flow through the ops exporters emit around shapes: elementwise
ops with broadcasting, ``MatMul``/``Gemm``, ``Transpose``, ``Reshape`` (targets known from
shape values, ``0`` copying the input's dim), ``Gather``, ``Unsqueeze``/``Squeeze``,
``Concat``, reductions, normalizations, ``Softmax``, ``Cast`` and friends.

Only equality is derived, never a size: a token stays symbolic. When two different
tokens meet in a broadcast, the result is a fresh token (either could be 1).
"""

from __future__ import annotations

__all__ = ["SymbolicShapes"]

import itertools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

Dim = int | tuple
_fresh = itertools.count()

_ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Equal", "Greater", "Less", "GreaterOrEqual",
     "LessOrEqual", "And", "Or", "Xor", "Where", "PRelu", "BitShift", "Sum", "Mean"}
)
_SAME_SHAPE = frozenset(
    {"Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Cast", "CastLike",
     "Identity", "Softmax", "LogSoftmax", "Dropout", "LayerNormalization", "RMSNormalization", "BatchNormalization",
     "InstanceNormalization", "Not", "Sign", "Floor", "Ceil", "Round", "Clip", "LeakyRelu", "Elu", "Selu",
     "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "IsNaN", "IsInf", "Sin", "Cos", "CumSum",
     "Celu", "ThresholdedRelu", "Hardmax", "LpNormalization", "MeanVarianceNormalization"}
)
_REDUCE = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
     "ReduceLogSumExp", "ReduceSumSquare"}
)


def _new(tag: str) -> tuple:
    return ("fresh", tag, next(_fresh))


class SymbolicShapes:
    """Dims of values, filled in as a pass visits nodes in order (``visit`` each node)."""

    def __init__(self, constant: Callable[[ir.Value], np.ndarray | None], shape_values) -> None:
        self._dims: dict[ir.Value, list[Dim]] = {}
        self._constant = constant
        self._shape_values = shape_values  # value -> (entries, is_scalar), kept by the caller

    def visit(self, node: ir.Node) -> None:
        try:
            self._visit(node)
        except (IndexError, ValueError, TypeError, KeyError, ZeroDivisionError):
            pass  # malformed or unusual node: its outputs stay as declared

    def dims(self, value: ir.Value | None) -> list[Dim] | None:
        if value is None:
            return None
        if value in self._dims:
            return self._dims[value]
        return self._declared(value)

    def token(self, value: ir.Value, axis: int) -> Dim | None:
        dims = self.dims(value)
        if dims is None or axis >= len(dims):
            return None
        return dims[axis]

    def _declared(self, value: ir.Value) -> list[Dim] | None:
        if value.shape is None:
            if value.const_value is not None:
                return [int(d) for d in value.const_value.shape.numpy()]
            return None
        dims: list[Dim] = []
        for i, d in enumerate(value.shape):
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, ir.SymbolicDim) and d.value and not d.value.startswith("unk__"):
                dims.append(("sym", d.value))
            else:
                dims.append(("dim", id(value), i))
        return dims

    def _set(self, value: ir.Value, dims: list[Dim] | None) -> None:
        if dims is None:
            return
        declared = value.shape
        if declared is not None and len(declared) == len(dims):
            # A static declared dim is a fact; keep it over a token.
            dims = [d if isinstance(d, int) or not isinstance(declared[i], int) else declared[i] for i, d in enumerate(dims)]
        self._dims[value] = dims

    def _ints(self, node: ir.Node, index: int, attr: str) -> list[int] | None:
        if attr in node.attributes:
            return list(node.attributes[attr].as_ints())
        if index < len(node.inputs) and node.inputs[index] is not None:
            c = self._constant(node.inputs[index])
            if c is not None:
                return [int(v) for v in np.asarray(c).reshape(-1)]
        return None

    def _visit(self, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return
        op = node.op_type
        ins = [self.dims(v) for v in node.inputs]
        out = node.outputs[0]
        if op in _SAME_SHAPE:
            if ins and ins[0] is not None:
                self._set(out, list(ins[0]))
        elif op in _ELEMENTWISE:
            if all(d is not None for d in ins):
                self._set(out, _broadcast([d for d in ins if d is not None], out))
        elif op == "MatMul" and len(ins) == 2 and ins[0] is not None and ins[1] is not None:
            a, b = ins
            if len(a) >= 2 and len(b) >= 2:
                batch = _broadcast([a[:-2], b[:-2]], out)
                self._set(out, batch + [a[-2], b[-1]])
            elif len(a) >= 2 and len(b) == 1:
                self._set(out, a[:-1])
        elif op == "Gemm" and ins[0] is not None and ins[1] is not None:
            m = ins[0][1] if node.attributes.get_int("transA", 0) else ins[0][0]
            n = ins[1][0] if node.attributes.get_int("transB", 0) else ins[1][1]
            self._set(out, [m, n])
        elif op == "Transpose" and ins[0] is not None:
            perm = node.attributes.get_ints("perm", None)
            perm = list(perm) if perm is not None else list(reversed(range(len(ins[0]))))
            self._set(out, [ins[0][p] for p in perm])
        elif op == "Reshape" and ins[0] is not None:
            self._set(out, self._reshape(node, ins[0], out))
        elif op == "Unsqueeze" and ins[0] is not None:
            axes = self._ints(node, 1, "axes")
            if axes is not None:
                rank = len(ins[0]) + len(axes)
                axes = sorted(a % rank for a in axes)
                dims = list(ins[0])
                for a in axes:
                    dims.insert(a, 1)
                self._set(out, dims)
        elif op == "Squeeze" and ins[0] is not None:
            axes = self._ints(node, 1, "axes")
            if axes is not None:
                drop = {a % len(ins[0]) for a in axes}
                self._set(out, [d for i, d in enumerate(ins[0]) if i not in drop])
        elif op == "Gather" and ins[0] is not None and len(ins) > 1 and ins[1] is not None:
            axis = node.attributes.get_int("axis", 0) % len(ins[0])
            self._set(out, ins[0][:axis] + ins[1] + ins[0][axis + 1:])
        elif op == "Concat" and all(d is not None for d in ins) and ins:
            axis = node.attributes.get_int("axis", 0) % len(ins[0])
            dims = list(ins[0])
            sizes = [d[axis] for d in ins]
            dims[axis] = sum(sizes) if all(isinstance(s, int) for s in sizes) else _new("concat")
            self._set(out, dims)
        elif op in _REDUCE and ins[0] is not None:
            axes = self._ints(node, 1, "axes")
            keep = node.attributes.get_int("keepdims", 1)
            if axes is None:
                return
            if not axes and node.attributes.get_int("noop_with_empty_axes", 0):
                self._set(out, list(ins[0]))
                return
            axes = {a % len(ins[0]) for a in axes} if axes else set(range(len(ins[0])))
            self._set(out, [1 if i in axes else d for i, d in enumerate(ins[0]) if keep or i not in axes])
        elif op == "Expand" and ins[0] is not None:
            target = self._entries(node, 1)
            if target is not None:
                self._set(out, _broadcast([ins[0], [d if d is not None else ("dim", id(out), i) for i, d in enumerate(target)]], out))
        elif op == "Slice" and ins[0] is not None:
            self._set(out, self._slice(node, ins[0]))
        elif op == "Flatten" and ins[0] is not None:
            axis = node.attributes.get_int("axis", 1) % (len(ins[0]) + 1)
            left, right = ins[0][:axis], ins[0][axis:]
            fold = lambda ds: int(np.prod(ds)) if all(isinstance(d, int) for d in ds) else (ds[0] if len(ds) == 1 else _new("flat"))  # noqa: E731
            self._set(out, [fold(left) if left else 1, fold(right) if right else 1])

    def _entries(self, node: ir.Node, index: int) -> list | None:
        """A 1-D int input as a list of ints/tokens (constant or shape value)."""
        if index >= len(node.inputs) or node.inputs[index] is None:
            return None
        c = self._constant(node.inputs[index])
        if c is not None:
            return [int(v) for v in np.asarray(c).reshape(-1)]
        known = self._shape_values.get(node.inputs[index])
        return list(known[0]) if known is not None and not known[1] else None

    def _slice(self, node: ir.Node, src: list[Dim]) -> list[Dim] | None:
        """Slice from 0 with step 1 to a symbolic end keeps that end as the dim: a valid run
        never slices past the input's end (a model slicing a position table to the
        sequence length needs the table to be long enough)."""
        starts, ends = self._entries(node, 1), self._entries(node, 2)
        if starts is None or ends is None:
            return None
        axes = self._entries(node, 3) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(starts)))
        steps = self._entries(node, 4) if len(node.inputs) > 4 and node.inputs[4] is not None else [1] * len(starts)
        if axes is None or steps is None:
            return None
        dims = list(src)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = axis % len(src)
            dim = src[axis]
            if start == 0 and step == 1 and not isinstance(end, int) and end is not None:
                dims[axis] = end
            elif isinstance(start, int) and isinstance(end, int) and isinstance(step, int) and isinstance(dim, int) and step:
                dims[axis] = len(range(*slice(start, end, step).indices(dim)))
            elif start == 0 and step == 1 and isinstance(end, int) and end >= 2**31 - 1:
                dims[axis] = dim
            else:
                dims[axis] = _new("slice")
        return dims

    def _reshape(self, node: ir.Node, src: list[Dim], out: ir.Value) -> list[Dim] | None:
        target = self._constant(node.inputs[1])
        if target is not None:
            entries: list = [int(v) for v in np.asarray(target).reshape(-1)]
        else:
            known = self._shape_values.get(node.inputs[1])
            if known is None or known[1]:
                return None
            entries = list(known[0])
        allowzero = node.attributes.get_int("allowzero", 0)
        dims: list[Dim] = []
        for i, e in enumerate(entries):
            if e == 0 and not allowzero:
                if i >= len(src):
                    return None
                dims.append(src[i])
            elif e is None:
                dims.append(_new("reshape"))
            elif e == -1:
                dims.append(None)
            else:
                dims.append(e)
        if None in dims:
            idx = dims.index(None)
            rest = [d for d in dims if d is not None]
            if all(isinstance(d, int) for d in src) and all(isinstance(d, int) for d in rest) and int(np.prod(rest)):
                dims[idx] = int(np.prod(src)) // int(np.prod(rest))
            else:
                dims[idx] = _infer_minus_one(src, rest) or _new("reshape")
        return dims


def _infer_minus_one(src: list[Dim], rest: list[Dim]) -> Dim | None:
    """The dim a -1 stands for, when the other target dims account for the rest of the
    source: [a, b, 4, 64] -> [a, b, -1] is 256; [a, s, 256] -> [a, -1, 256] is s."""
    left = list(src)
    rest_ints = 1
    for d in rest:
        if isinstance(d, int):
            rest_ints *= d
        elif d in left:
            left.remove(d)
        else:
            return None
    tokens = [x for x in left if not isinstance(x, int)]
    left_ints = int(np.prod([x for x in left if isinstance(x, int)])) if left else 1
    if not tokens:
        return left_ints // rest_ints if rest_ints and left_ints % rest_ints == 0 else None
    if len(tokens) == 1 and left_ints == rest_ints:
        return tokens[0]
    return None


def _broadcast(shapes: list[list[Dim]], out: ir.Value) -> list[Dim]:
    rank = max(len(s) for s in shapes)
    padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
    dims: list[Dim] = []
    for i in range(rank):
        column = [s[i] for s in padded]
        not_one = [d for d in column if d != 1]
        if not not_one:
            dims.append(1)
        elif all(d == not_one[0] for d in not_one):
            dims.append(not_one[0])
        else:
            ints = [d for d in not_one if isinstance(d, int)]
            dims.append(ints[0] if ints else ("dim", id(out), i))
    return dims
