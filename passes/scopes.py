"""Every scope a pass may have to walk: main graph, subgraphs, functions and their subgraphs."""

from __future__ import annotations

__all__ = ["all_scopes"]

import onnx_ir as ir


def all_scopes(model: ir.Model) -> list[ir.Graph | ir.Function]:
    """The main graph and all its If/Loop/Scan bodies, then each model function and its bodies."""
    scopes: list[ir.Graph | ir.Function] = list(model.graphs())
    for function in model.functions.values():
        scopes.append(function)
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    scopes.append(attr.as_graph())
                elif attr.type == ir.AttributeType.GRAPHS:
                    scopes.extend(attr.as_graphs())
    return scopes
