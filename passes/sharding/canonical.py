"""Exact rewrites that put the forms exporters write for one computation into one form,
so the attention plan and the layout rules see heads the same way whoever wrote the graph.

Applied to the (specialized) main graph that is planned, partitioned and run; each rewrite
keeps every output bit-identical (it only reorders how elements are indexed):

- **batched transpose through a merged batch**: ``Reshape(X[a0..ak-1, *t] -> [A, *t])``,
  ``Transpose(perm, perm[0] = 0)``, ``Reshape(-> [b0..bm-1, *u])`` with ``prod(a) = prod(b) =
  A`` is ``Reshape(X -> [b0..bm-1, *t])`` then ``Transpose`` of the tail axes alone. The
  torch.export exporter writes ``K^T`` of scaled-dot-product attention as a 3-D transpose of
  ``K`` reshaped to ``[batch * heads, seq, head_dim]``: merged with the batch, the head axis
  cannot be split; after the rewrite it is axis 1 of a 4-D transpose, as the TorchScript
  exporter writes it. (The leading Reshape is dropped when it would change nothing.)

Shapes must be static (the planner works on a model specialized to its input shapes);
anything else is left as it is. ONNX's shape inference does not know ``com.microsoft``'s
``MultiHeadAttention`` and ``Attention``: their output shape (Q's, with V's hidden size; the
input's, with the packed weight's third) is filled in where missing and inference re-run,
so the ops after them have shapes too.
"""

from __future__ import annotations

__all__ = ["canonicalize"]

import math

import numpy as np
import onnx_ir as ir
from gcomp.passes.scopes import FreshNames
from gcomp.passes.sharding.tensors import shape_of


def canonicalize(model: ir.Model) -> int:
    """Apply the rewrites to ``model``'s main graph in place; returns how many fired."""
    names = FreshNames(model)
    count = 0
    for node in list(model.graph):
        if node.graph is model.graph and _merged_transpose(model.graph, node, names):
            count += 1
    if _contrib_attention_shapes(model.graph):
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
    return count


def _contrib_attention_shapes(graph: ir.Graph) -> int:
    """Set the missing output shape of com.microsoft MultiHeadAttention / Attention nodes."""
    count = 0
    for node in graph:
        if node.domain != "com.microsoft" or node.op_type not in ("MultiHeadAttention", "Attention"):
            continue
        out, first = node.outputs[0], _static(node.inputs[0])
        if out.shape is not None or first is None or len(first) != 3 or len(node.inputs) < 3:
            continue
        if node.op_type == "Attention":
            w, sizes = _static(node.inputs[1]), node.attributes.get("qkv_hidden_sizes")
            hidden = sizes.value[2] if sizes is not None else (w[1] // 3 if w is not None and len(w) == 2 else None)
        else:
            v = _static(node.inputs[2])
            hidden = v[2] if v is not None and len(v) == 3 else None
        if hidden is not None:
            out.shape = ir.Shape([first[0], first[1], hidden])
            out.type = out.type or node.inputs[0].type
            count += 1
    return count


def _static(v: ir.Value | None) -> tuple[int, ...] | None:
    s = shape_of(v)
    return tuple(s) if s is not None and all(isinstance(d, int) for d in s) else None


def _only_user(v: ir.Value, op: str) -> ir.Node | None:
    users = v.uses()
    if len(users) != 1 or v.is_graph_output():
        return None
    node, idx = users[0]
    return node if node.op_type == op and node.domain in ("", "ai.onnx") and idx == 0 else None


def _merged_transpose(graph: ir.Graph, first: ir.Node, names: FreshNames) -> bool:
    """The batched-transpose rewrite at Reshape ``first`` (see the module docstring)."""
    if first.op_type != "Reshape" or first.domain not in ("", "ai.onnx"):
        return False
    transpose = _only_user(first.outputs[0], "Transpose")
    last = _only_user(transpose.outputs[0], "Reshape") if transpose is not None else None
    if last is None:
        return False
    sx, s1, st, s2 = (_static(v) for v in (first.inputs[0], first.outputs[0], transpose.outputs[0], last.outputs[0]))
    perm = transpose.attributes["perm"].value if "perm" in transpose.attributes else None
    if None in (sx, s1, st, s2) or perm is None or not s1 or perm[0] != 0:
        return False
    tail = len(s1) - 1
    k = len(sx) - tail  # leading axes of X merged into s1[0]
    m = len(s2) - tail  # leading axes of the result
    if k < 1 or m < 1 or sx[k:] != s1[1:] or s2[m:] != st[1:]:
        return False
    if math.prod(sx[:k]) != s1[0] or math.prod(s2[:m]) != s1[0]:
        return False
    lead = list(s2[:m])
    x = first.inputs[0]
    new_nodes = []
    if tuple(lead) + sx[k:] != sx:
        target = ir.Value(name=names(f"{first.name or 'reshape'}/canonical_shape"),
                          const_value=ir.Tensor(np.array(lead + list(sx[k:]), np.int64)))
        target.shape, target.type = ir.Shape([len(lead) + tail]), ir.TensorType(ir.DataType.INT64)
        graph.register_initializer(target)
        reshape = ir.Node("", "Reshape", [x, target], name=names(f"{first.name or 'reshape'}/canonical"))
        reshape.outputs[0].name = names(f"{x.name}/canonical")
        reshape.outputs[0].type, reshape.outputs[0].shape = x.type, ir.Shape(lead + list(sx[k:]))
        new_nodes.append(reshape)
        x = reshape.outputs[0]
    new_perm = list(range(m)) + [m - 1 + p for p in perm[1:]]
    swap = ir.Node("", "Transpose", [x], attributes=[ir.AttrInt64s("perm", new_perm)],
                   name=names(f"{transpose.name or 'transpose'}/canonical"))
    out = last.outputs[0]
    swap.outputs[0].name = names(f"{out.name}/canonical")
    swap.outputs[0].type, swap.outputs[0].shape = out.type, ir.Shape(list(s2))
    new_nodes.append(swap)
    graph.insert_before(first, new_nodes)
    ir.convenience.replace_all_uses_with(out, swap.outputs[0], replace_graph_outputs=True)
    graph.remove([last, transpose, first], safe=True)
    name, out.name = out.name, names(f"{out.name}/replaced")
    swap.outputs[0].name = name  # the graph keeps the value's name
    return True
