"""Sibling MatMuls of one input with constant weights -> one MatMul on the concatenated
weights, then Slices (TVM targets; attention's Q, K and V projections).

Math. For weights ``W_i`` of shape ``[K, N_i]`` and ``W = [W_1 | W_2 | ... ]`` (concatenated
along the last axis, ``[K, sum N_i]``), column block ``i`` of ``x @ W`` is ``x @ W_i``:
every output element is the same dot product of a row of ``x`` with a column of ``W_i``.
So ``Slice(x @ W, [o_i], [o_i + N_i], axes=[-1])`` (``o_i = N_1 + ... + N_{i-1}``) returns each ``x @ W_i`` exactly (the same
products and sums per element; only the kernel's loop over columns is longer). When every
sibling's only use is ``Add`` of a constant bias of shape ``[N_i]`` (broadcast along the
last axis), ``(x @ W) + [b_1 | b_2 | ...]`` sliced the same way is each ``x @ W_i + b_i``.

Why for TVM: one GEMM of ``[M, K] x [K, 3N]`` instead of three ``[M, K] x [K, N]``: one
kernel call instead of three, and a shape MetaSchedule tunes to a better rate (more
columns per row of ``x`` loaded). Relax's own ``CombineParallelMatmul`` matches only
weights passed as parameters, and gcomp imports them as constants. Not for ORT: its
``Attention`` fusion (O3) packs Q, K and V itself.

Refused: weights that are not constant 2-D tensors of one dtype and one ``K``, a sibling
whose output (or its bias ``Add``'s) is a graph output, and model functions (no
initializers there). Biases are folded only when every sibling has one.
"""

from __future__ import annotations

__all__ = ["TVM_PARALLEL_MATMUL", "ParallelMatMul"]

import numpy as np
import onnx_ir as ir

from gcomp.passes.fusion._engine import FusionRun, GraphRule, fusion
from gcomp.passes.opsets import model_opset


def _is_std(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _bias(run: FusionRun, matmul: ir.Node, width: int) -> tuple[ir.Node, np.ndarray] | None:
    """The ``Add`` of a constant ``[width]`` bias that is the MatMul's only use."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if not _is_std(add, "Add") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = run.const(other)
    if bias is None or bias.shape != (width,) or add.outputs[0].is_graph_output():
        return None
    return add, bias


class ParallelMatMul(GraphRule):
    name = "tvm-parallel-matmul"

    def apply(self, model: ir.Model) -> int:
        fired = 0
        opset = model_opset(model)
        for graph in model.graphs():
            groups: dict[int, list[tuple[ir.Node, np.ndarray]]] = {}
            for node in graph:
                if not _is_std(node, "MatMul") or len(node.inputs) != 2 or node.inputs[0] is None:
                    continue
                weight = self.run.const(node.inputs[1])
                if weight is None or weight.ndim != 2 or node.outputs[0].is_graph_output():
                    continue
                groups.setdefault(id(node.inputs[0]), []).append((node, weight))
            for members in groups.values():
                members = _compatible(members)
                if len(members) >= 2:
                    _pack(self.run, graph, members, opset)
                    fired += 1
        return fired


def _compatible(members: list[tuple[ir.Node, np.ndarray]]) -> list[tuple[ir.Node, np.ndarray]]:
    """The siblings sharing the first one's K and dtype (the others stay as they are)."""
    if not members:
        return []
    k, dtype = members[0][1].shape[0], members[0][1].dtype
    return [(n, w) for n, w in members if w.shape[0] == k and w.dtype == dtype]


def _pack(run: FusionRun, graph: ir.Graph, members: list[tuple[ir.Node, np.ndarray]], opset: int) -> None:
    x = members[0][0].inputs[0]
    widths = [int(w.shape[1]) for _, w in members]
    biases = [_bias(run, n, width) for (n, _), width in zip(members, widths)]
    with_bias = all(b is not None for b in biases)
    first = min((n for n, _ in members), key=lambda n: _position(graph, n))

    def initializer(array: np.ndarray, base: str) -> ir.Value:
        name = run.fresh_name(base)
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(array.shape), const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        graph.register_initializer(value)
        return value

    base = members[0][0].name or "matmul"
    weight = initializer(np.concatenate([w for _, w in members], axis=1), f"{base}_packed_weight")
    nodes = [ir.node("MatMul", [x, weight], name=run.fresh_name(f"{base}_packed"))]
    y = nodes[-1].outputs[0]
    if with_bias:
        bias = initializer(np.concatenate([b[1] for b in biases]), f"{base}_packed_bias")
        nodes.append(ir.node("Add", [y, bias], name=run.fresh_name(f"{base}_packed_bias_add")))
        y = nodes[-1].outputs[0]
    # Slices, not one Split: Relax fuses each Slice into the reshape/transpose that reads
    # it, while Split's tuple is a kernel of its own.
    slices = []
    offsets = np.cumsum([0, *widths])
    for i in range(len(members)):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        if opset >= 10:
            inputs = [y, *(initializer(np.array([v], dtype=np.int64), f"{base}_packed_{what}")
                           for v, what in ((lo, "start"), (hi, "end"), (-1, "axis")))]
            slices.append(ir.node("Slice", inputs, name=run.fresh_name(f"{base}_packed_slice")))
        else:
            slices.append(ir.node("Slice", [y], attributes={"starts": [lo], "ends": [hi], "axes": [-1]},
                                  name=run.fresh_name(f"{base}_packed_slice")))
    nodes.extend(slices)
    outputs = [n.outputs[0] for n in slices]
    for node in nodes:
        node.outputs[0].name = run.fresh_name(f"{base}_packed_out")
    graph.insert_before(first, nodes)
    for i, (node, _) in enumerate(members):
        old_nodes = [node] if not with_bias else [biases[i][0], node]
        old = old_nodes[0].outputs[0]
        new = outputs[i]
        new.dtype, new.shape = old.dtype, old.shape
        ir.convenience.replace_all_uses_with(old, new)
        graph.remove(old_nodes, safe=True)


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    return 1 << 30


TVM_PARALLEL_MATMUL = fusion(
    "tvm-parallel-matmul", lambda run: [ParallelMatMul(run)], [("", "MatMul", 1), ("", "Slice", 1)],
    "sibling MatMuls of one input with constant weights (Q, K, V) -> one MatMul on the concatenated weights + Slices",
    needs=("MatMul",))
