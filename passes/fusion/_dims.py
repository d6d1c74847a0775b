"""Proving that a runtime-computed size equals a tensor's dim (shared by fusion rules).

Exporters compute sizes from ``Shape``: the sequence length as ``Gather(Shape(x), 1)``,
``Shape(x, start=1, end=2)``, wrapped in ``Unsqueeze``/``Squeeze``/``Cast``; a rule that
replaces such a graph by an op that takes the size implicitly must prove the two equal.
The functions that read constants take the run's :class:`gcomp.passes.fusion._engine.FusionRun`.
"""

from __future__ import annotations

__all__ = ["float_attr", "holds_dim", "int_attr", "same_dim", "shape_range"]

import onnx_ir as ir

from gcomp.passes.fusion._engine import FusionRun


def same_dim(a, b) -> bool:
    """Two dims that are provably equal: equal ints, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def int_attr(node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def float_attr(node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def holds_dim(run: FusionRun, value, x, k: int) -> bool:
    """``value`` (a scalar or 1-element int tensor) provably equals ``x.shape[k]``: a constant
    equal to a static dim, or read (through Unsqueeze/Squeeze/Reshape/Cast/Identity, which keep
    a single element) from ``Shape(y)`` at a dim of y that is x's dim k."""
    c = run.const(value)
    if c is not None:
        return c.size == 1 and isinstance(x.shape[k], int) and int(c.reshape(())) == x.shape[k]
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Squeeze", "Unsqueeze", "Reshape", "Cast", "Identity"):
        if node.op_type == "Cast" and int_attr(node, "to", 0) not in (ir.DataType.INT64, ir.DataType.INT32):
            return False
        return holds_dim(run, node.inputs[0], x, k)
    if node.op_type == "Shape":
        return _shape_element_is(run, node, 0, x, k)
    if node.op_type == "Gather" and int_attr(node, "axis", 0) == 0:
        shape_node = node.inputs[0].producer()
        index = run.const(node.inputs[1])
        if shape_node is None or shape_node.op_type != "Shape" or index is None or index.size != 1:
            return False
        return _shape_element_is(run, shape_node, int(index.reshape(())), x, k)
    return False


def shape_range(shape_node, rank: int) -> tuple[int, int]:
    """The dims ``[start, end)`` that ``Shape(y, start, end)`` returns for a y of ``rank``
    (negative bounds count from the end, both clamped to ``[0, rank]`` as ONNX says)."""
    start = int_attr(shape_node, "start", 0)
    start = max(0, start + rank if start < 0 else start)
    end = int_attr(shape_node, "end", rank)
    end = min(rank, end + rank if end < 0 else end)
    return start, end


def _shape_element_is(run: FusionRun, shape_node, index: int, x, k: int) -> bool:
    """Element ``index`` of ``Shape(y, start, end)`` exists and is y's dim that equals x's dim k."""
    y = shape_node.inputs[0]
    rank = _rank(run, y)
    if rank is None:
        return False
    start, end = shape_range(shape_node, rank)
    dim = start + (index if index >= 0 else end - start + index)
    if not start <= dim < end:
        return False
    return _dim_is(run, y, dim, x, k)


def _rank(run: FusionRun, y) -> int | None:
    if y.shape is not None and y.shape.rank() is not None:
        return y.shape.rank()
    target = _zero_copy_target(run, y)
    return None if target is None else target.size


def _zero_copy_target(run: FusionRun, y):
    """The constant shape of ``y = Reshape(z, shape)`` with allowzero=0, else None."""
    node = y.producer()
    if node is None or node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or int_attr(node, "allowzero", 0):
        return None
    target = run.const(node.inputs[1])
    return None if target is None else target.reshape(-1)


def _dim_is(run: FusionRun, y, dim: int, x, k: int, depth: int = 0) -> bool:
    """y's dim ``dim`` (non-negative) is x's dim k: y is x, the inferred dims are the same
    symbol or number, or y is ``Reshape(z, s)`` (allowzero=0) with ``s[dim] == 0``, which
    copies z's dim ``dim`` (followed through a chain of such Reshapes)."""
    if y is x:
        return x.shape is not None and x.shape.rank() is not None and dim == k % x.shape.rank()
    if (x.shape is not None and y.shape is not None and y.shape.rank() is not None
            and dim < y.shape.rank() and same_dim(y.shape[dim], x.shape[k])):
        return True
    target = _zero_copy_target(run, y)
    if target is None or depth > 8 or dim >= target.size or int(target[dim]) != 0:
        return False
    return _dim_is(run, y.producer().inputs[0], dim, x, k, depth + 1)
