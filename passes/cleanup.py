"""Housekeeping passes, thin named wrappers of onnx-ir's common passes.

(Identity elimination is ours, in ``identity.py``: onnx-ir 1.1's version renames graph
outputs and returns outer-scope values from subgraphs, which ORT rejects.)

Each keeps onnx-ir's behaviour and honest ``modified`` flag; the wrapper only gives
it a registry name, keyword-only options and a statement of scope.
"""

from __future__ import annotations

__all__ = [
    "RemoveUnusedNodes",
    "RemoveUnusedFunctions",
    "RemoveUnusedOpsets",
    "DeduplicateInitializers",
    "TopologicalSort",
    "FixNames",
]

from typing import Annotated

from onnx_ir.passes import common

from gcomp.registry import register_pass


@register_pass("remove-unused-nodes")
class RemoveUnusedNodes(common.RemoveUnusedNodesPass):
    """Remove nodes whose outputs nothing uses, and unused initializers.

    Scopes: main graph, If/Loop/Scan bodies, model functions. Keeps nodes with no
    outputs used only when they are graph outputs; never removes graph inputs.
    """

    def __init__(self) -> None:
        super().__init__()


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


@register_pass("dedup-initializers")
class DeduplicateInitializers(common.DeduplicateHashedInitializersPass):
    """Merge initializers with equal dtype, shape and bytes (compared by hash, then bytes).

    Scopes: each graph separately (main graph and subgraphs). Never merges an
    initializer that is also a graph input (a caller may override it) or output.
    """

    def __init__(
        self, *, dedup_size_limit: Annotated[int, "skip initializers with more elements"] = 1 << 30
    ) -> None:
        super().__init__(size_limit=dedup_size_limit)


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
