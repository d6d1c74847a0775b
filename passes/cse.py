"""Common-subexpression elimination.

Two nodes are the same expression when they have the same operator (domain, type,
overload), the same input values (by identity, in order), the same attributes and the
same number of outputs; the later one is removed and its uses point at the earlier one.

Guarantees: outputs are bit-identical (the same deterministic computation is done once).
Refuses: non-deterministic ops (Random*, Multinomial, Bernoulli, Dropout that may
train), ops outside the standard domains (their determinism is unknown), nodes with
graph attributes (If/Loop/Scan), and nodes with tensor attributes over ``size_limit``
elements. When the duplicate produces a graph output, an Identity keeps that name.
Scopes: main graph, every If/Loop/Scan body (each on its own; nothing is hoisted across
scopes), and model functions.
"""

from __future__ import annotations

__all__ = ["CommonSubexpressionElimination"]

from typing import Annotated, Any

import onnx_ir as ir

from gcomp.passes.opsets import NON_DETERMINISTIC
from gcomp.passes.rewire import take_interface
from gcomp.passes.scopes import all_scopes
from gcomp.registry import register_pass

_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


@register_pass("cse")
class CommonSubexpressionElimination(ir.passes.InPlacePass):
    """Merge nodes that compute the same deterministic expression of the same inputs."""

    def __init__(
        self, *, cse_size_limit: Annotated[int, "largest tensor attribute compared, in elements"] = 1024
    ) -> None:
        super().__init__()
        self.size_limit = cse_size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for scope in all_scopes(model):
            modified |= self._run(scope)
        return ir.passes.PassResult(model, modified=modified)

    def _run(self, graph: ir.Graph | ir.Function) -> bool:
        seen: dict[tuple, ir.Node] = {}
        modified = False
        for node in list(graph):
            key = self._key(node)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            _replace(graph, node, first)
            modified = True
        return modified

    def _key(self, node: ir.Node) -> tuple | None:
        if node.domain not in _STANDARD_DOMAINS or node.op_type in NON_DETERMINISTIC:
            return None
        if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
            training = node.inputs[2].const_value
            if training is None or bool(training.numpy().any()):
                return None
        attrs: list[tuple[str, Any]] = []
        for name, attr in sorted(node.attributes.items()):
            value = _attr_key(attr, self.size_limit)
            if value is None:
                return None
            attrs.append((name, value))
        return (
            node.op_identifier(),
            len(node.outputs),
            tuple(id(v) if v is not None else None for v in node.inputs),
            tuple(attrs),
        )


def _attr_key(attr: ir.Attr, size_limit: int) -> Any:
    if attr.is_ref():
        return ("ref", attr.ref_attr_name)
    t = attr.type
    if t in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return None
    if t == ir.AttributeType.TENSOR:
        tensor = attr.as_tensor()
        if tensor.size > size_limit:
            return None
        if tensor.dtype == ir.DataType.STRING:
            data = tuple(tensor.string_data())
        else:
            data = tensor.tobytes()
        return ("tensor", tensor.dtype, tuple(tensor.shape.numpy()), data)
    if t in (ir.AttributeType.TENSORS, ir.AttributeType.SPARSE_TENSOR, ir.AttributeType.SPARSE_TENSORS):
        return None
    if t in (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS):
        return (t, repr(attr.value))
    value = attr.value
    if isinstance(value, list | tuple):
        value = tuple(value)
    if isinstance(value, float) and value != value:  # NaN attributes never compare equal
        return None
    return (t, value)


def _replace(graph: ir.Graph | ir.Function, dup: ir.Node, keep: ir.Node) -> None:
    outputs = list(graph.outputs)
    for old, new in zip(dup.outputs, keep.outputs):
        if old in outputs:
            idx = outputs.index(old)
            if new.is_graph_output() or new.is_graph_input() or new in outputs:
                # Keep both names: route the duplicate output through an Identity.
                ident = ir.node(
                    "Identity",
                    inputs=[new],
                    outputs=[ir.Value(name=old.name, type=old.type, shape=old.shape)],
                )
                graph.insert_before(dup, ident)
                graph.outputs[idx] = ident.outputs[0]
                outputs[idx] = ident.outputs[0]
            else:
                new.name = old.name if old.name else new.name
                graph.outputs[idx] = new
                outputs[idx] = new
                take_interface(old, new)
    ir.convenience.replace_all_uses_with(list(dup.outputs), list(keep.outputs))
    graph.remove(dup, safe=True)
