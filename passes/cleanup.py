"""Housekeeping passes, thin named wrappers of onnx-ir's common passes.

(Identity elimination and initializer dedup are ours, in ``identity.py`` and
``dedup.py``: onnx-ir 1.1's Identity elimination renames graph outputs and returns
outer-scope values from subgraphs, which ORT rejects; its hashed dedup reads every
weight, even those no other tensor could equal.)

Each keeps onnx-ir's behaviour and honest ``modified`` flag; the wrapper only gives
it a registry name, keyword-only options and a statement of scope.
"""

from __future__ import annotations

__all__ = [
    "RemoveUnusedNodes",
    "RemoveUnusedFunctions",
    "RemoveUnusedOpsets",
    "TopologicalSort",
    "FixNames",
]

import onnx_ir as ir
from onnx_ir.passes import common

from gcomp.registry import register_pass


@register_pass("remove-unused-nodes")
class RemoveUnusedNodes(common.RemoveUnusedNodesPass):
    """Remove nodes whose outputs nothing uses, and unused initializers.

    Scopes: main graph, If/Loop/Scan bodies, model functions. Keeps nodes with no
    outputs used only when they are graph outputs; never removes graph inputs.
    (onnx-ir 1.1 removes unused initializers of the main graph only: a body's, left
    unread by a fold, stayed in the file; those are removed here.)
    """

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        modified = result.modified
        for body in model.graph.subgraphs():
            for value in list(body.initializers.values()):
                if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                    body.initializers.pop(value.name)
                    modified = True
        return ir.passes.PassResult(result.model, modified=modified)


@register_pass("remove-unused-functions")
class RemoveUnusedFunctions(common.RemoveUnusedFunctionsPass):
    """Remove model-local functions that no node (in any scope) calls."""

    def __init__(self) -> None:
        super().__init__()


@register_pass("remove-unused-opsets")
class RemoveUnusedOpsets(common.RemoveUnusedOpsetsPass):
    """Remove opset imports of domains no node uses (the default domain is kept).

    Scopes: main graph with its subgraphs, and each function's own imports.
    """

    def __init__(self) -> None:
        super().__init__(process_functions=True)


@register_pass("topological-sort")
class TopologicalSort(common.TopologicalSortPass):
    """Sort nodes of the main graph, subgraphs and functions in dependency order."""

    def __init__(self) -> None:
        super().__init__()


@register_pass("fix-names")
class FixNames(common.NameFixPass):
    """Give every node and value a unique, non-empty name (needed by some runtimes)."""

    def __init__(self) -> None:
        super().__init__()
