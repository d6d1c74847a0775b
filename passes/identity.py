"""Identity elimination that keeps every graph's interface intact.

``y = Identity(x)`` is removed by pointing every use of ``y`` at ``x``. When ``y`` is
an output of its graph, the output must keep its name and must be produced by a node of
that graph, so the Identity is removed only when ``x`` is made by a node of the same
graph and is not itself an output or input: then ``x`` takes ``y``'s name and place.

Kept (the Identity is the only correct form): ``y`` is a graph output and ``x`` is a
graph input, an initializer, another output of the same graph, or a value from an outer
scope (a subgraph may not return an outer value directly; ORT rejects it).
Scopes: main graph, every If/Loop/Scan body, model functions.
Guarantees: outputs bit-identical; graph input and output names unchanged.
"""

from __future__ import annotations

__all__ = ["EliminateIdentity"]

import onnx_ir as ir

from gcomp.passes.rewire import bypass
from gcomp.passes.scopes import all_scopes
from gcomp.registry import register_pass


@register_pass("eliminate-identity")
class EliminateIdentity(ir.passes.InPlacePass):
    """Bypass Identity nodes, keeping every graph's input and output names intact."""

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in all_scopes(model):
            for node in list(graph):
                if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and _eliminate(graph, node):
                    modified = True
        return ir.passes.PassResult(model, modified=modified)


def _eliminate(graph: ir.Graph | ir.Function, node: ir.Node) -> bool:
    if len(node.inputs) != 1 or node.inputs[0] is None or len(node.outputs) != 1:
        return False
    if not bypass(graph, node.outputs[0], node.inputs[0]):
        return False
    graph.remove(node, safe=True)
    return True
