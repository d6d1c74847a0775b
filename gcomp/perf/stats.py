"""Counting what a model holds: nodes by op type (all scopes), parameters, bytes."""

from __future__ import annotations

__all__ = ["ModelStats", "model_stats"]

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir


@dataclass
class ModelStats:
    nodes: int
    op_types: dict[str, int] = field(default_factory=dict)
    initializers: int = 0
    parameters: int = 0
    initializer_bytes: int = 0
    functions: int = 0
    opsets: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "op_types": dict(sorted(self.op_types.items(), key=lambda kv: (-kv[1], kv[0]))),
            "initializers": self.initializers,
            "parameters": self.parameters,
            "initializer_bytes": self.initializer_bytes,
            "functions": self.functions,
            "opsets": self.opsets,
        }


def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def model_stats(model: ir.Model) -> ModelStats:
    """Counts over the main graph, every subgraph and every function. Reads no weights."""
    ops: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[_op_key(node)] += 1
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            ops[_op_key(node)] += 1
    count = params = nbytes = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            count += 1
            tensor = value.const_value
            if tensor is not None:
                params += tensor.size
                nbytes += tensor.nbytes
    return ModelStats(
        nodes=sum(ops.values()),
        op_types=dict(ops),
        initializers=count,
        parameters=params,
        initializer_bytes=nbytes,
        functions=len(model.functions),
        opsets=dict(model.opset_imports),
    )
