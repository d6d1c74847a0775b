"""What verification refuses to run: tensors too large to allocate, Loops that never end.

Lower bounds from the constant inputs of the ops that make big tensors from small ones
(a 16-byte shape can ask for terabytes): gcomp never asks ONNX Runtime to try. A Loop
with no trip count that stacks scan outputs is refused too: ONNX Runtime aborts the whole
process (not an exception) when its arena fails.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_TENSOR_BYTES", "MAX_LOOP_TRIPS", "huge_tensor"]

import numpy as np
import onnx_ir as ir

# Verification refuses to run a model that would allocate a tensor larger than this.
DEFAULT_MAX_TENSOR_BYTES = 4 << 30
# A Loop running more times than this is not run for verification (it would hang).
MAX_LOOP_TRIPS = 10_000_000


def huge_tensor(model: ir.Model, limit: int) -> str | None:
    """Why ``model`` must not run: a node whose output size follows from constants alone
    and exceeds ``limit``, or an unbounded Loop; None when nothing is known to be too big."""
    from gcomp.passes.fold import constant_lookup

    const = constant_lookup(model)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        op = node.op_type

        def value(i, node=node):
            v = node.inputs[i] if i < len(node.inputs) else None
            return None if v is None else const(v)

        if op == "Loop":
            reason = _unbounded_loop(node, value, const)
            if reason:
                return f"node '{node.name or op}' (Loop) {reason}"
            continue
        elements = _elements(op, value)
        if elements is not None and elements > limit:
            return (
                f"node '{node.name or op}' ({op}) would make a tensor of at least {elements:,} elements, "
                f"over the {limit:,} byte limit for verification (--max-tensor-bytes)"
            )
    return None


def _elements(op: str, value) -> int | None:
    """A lower bound on the elements ``op`` makes, from its constant inputs (``value(i)``)."""
    if op in ("ConstantOfShape", "Expand"):
        shape = value(0 if op == "ConstantOfShape" else 1)
        if shape is not None and shape.size and shape.dtype.kind in "iu":
            return int(np.prod(np.maximum(shape.astype(np.float64), 0)))
    elif op == "Tile":
        reps = value(1)
        if reps is not None and reps.dtype.kind in "iu":
            return int(np.prod(np.maximum(reps.astype(np.float64), 0)))
    elif op == "Range":
        start, limit, delta = value(0), value(1), value(2)
        if start is not None and limit is not None and delta is not None and float(delta) != 0:
            return max(0, int(np.ceil((float(limit) - float(start)) / float(delta))))
    return None


def _unbounded_loop(node: ir.Node, value, const) -> str | None:
    trips = value(0)
    if trips is not None and trips.size == 1 and int(trips.reshape(-1)[0]) > MAX_LOOP_TRIPS:
        return f"runs up to {int(trips.reshape(-1)[0]):,} times, more than verification runs ({MAX_LOOP_TRIPS:,})"
    if node.inputs[0] is not None:
        return None
    body = node.attributes.get("body")
    if body is None:
        return None
    graph = body.as_graph()
    carried = len(node.inputs) - 2
    if len(graph.outputs) > 1 + carried:
        # No trip count and stacked scan outputs: memory grows for as long as it runs, and
        # ONNX Runtime aborts the whole process (not an exception) when its arena fails.
        return "has no trip count and stacks scan outputs: its memory is unbounded"
    cond = value(1) if len(node.inputs) > 1 else None
    if cond is None or not bool(np.asarray(cond).all()):
        return None
    if len(graph.inputs) < 2 or not graph.outputs:
        return None
    cond_out = graph.outputs[0]
    producer = cond_out.producer()
    passes_through = cond_out is graph.inputs[1] or (
        producer is not None and producer.op_type == "Identity" and producer.inputs[0] is graph.inputs[1]
    )
    stays_true = const(cond_out)
    always = passes_through or (stays_true is not None and bool(np.asarray(stays_true).all()))
    return "has no trip count and a condition that stays true: it never ends" if always else None
