"""Counting what a model holds: nodes by op type (all scopes), parameters, bytes; and an
estimate of the memory running it needs (:func:`memory_estimate`)."""

from __future__ import annotations

__all__ = ["MEMORY_METHOD", "ModelStats", "memory_estimate", "model_stats"]

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


MEMORY_METHOD = (
    "estimate: weights (initializers and Constant tensors) + the most activation bytes alive at once "
    "when the nodes run in graph order, from the shapes at the profiled inputs; ONNX Runtime's own "
    "arena is not observable from Python"
)


def memory_estimate(model: ir.Model, tensors: dict[str, tuple[list, list]]) -> dict:
    """What running ``model`` needs, apart from the process around it.

    ``tensors`` is :func:`gcomp.perf.flops.graph_costs`' per-node (inputs, outputs)
    ``TensorInfo`` lists (keyed like its costs). An activation lives from the node that
    makes it (graph inputs: from the start) to its last reader in the main graph (a node
    whose subgraph reads it counts as the reader; graph outputs: to the end). Activations
    of unknown shape are counted in ``unsized_activations``, not in bytes, so the figure
    is then a lower bound."""
    nodes = list(model.graph)
    weights = sum(t.const_value.nbytes for t in model.graph.initializers.values() if t.const_value is not None)
    constants = {n.outputs[0].name for n in nodes if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
    weights += sum(_constant_bytes(n) for n in nodes if n.outputs and n.outputs[0].name in constants)
    skip = set(model.graph.initializers) | constants
    sizes: dict[str, int | None] = {}
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        ins, outs = tensors.get(node.name or f"{node.op_type}_{index}", ([], []))
        for value, info in zip(node.inputs, ins):
            if value is not None and value.name not in skip:
                sizes.setdefault(value.name, info.nbytes if info is not None else None)
        for value, info in zip(node.outputs, outs):
            if value.name not in skip:
                sizes[value.name] = info.nbytes if info is not None else None
        for name in _reads(node):
            last[name] = index
    for value in model.graph.outputs:
        last[value.name] = len(nodes)
    activations, unsized = _live_peak(model, nodes, sizes, last, skip)
    return {"weights_bytes": weights, "activations_peak_bytes": activations, "unsized_activations": unsized,
            "model_bytes_estimate": weights + activations, "model_bytes_method": MEMORY_METHOD}


def _reads(node: ir.Node) -> set[str]:
    """Names of the values ``node`` reads, its subgraphs' reads of outer values included."""
    names = {v.name for v in node.inputs if v is not None}
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for graph in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                names |= {v.name for v in inner.inputs if v is not None}
    return names


def _constant_bytes(node: ir.Node) -> int:
    attr = node.attributes.get("value")
    tensor = attr.value if attr is not None and attr.type == ir.AttributeType.TENSOR else None
    return tensor.nbytes if tensor is not None else 0


def _live_peak(model: ir.Model, nodes: list[ir.Node], sizes: dict[str, int | None], last: dict[str, int],
               skip: set[str]) -> tuple[int, int]:
    """(the most activation bytes alive at once walking the nodes in order, how many
    activations have no known size)."""
    live = sum(sizes.get(v.name) or 0 for v in model.graph.inputs if v.name not in skip)
    peak = live
    for index, node in enumerate(nodes):
        live += sum(sizes.get(v.name) or 0 for v in node.outputs if v.name not in skip)
        peak = max(peak, live)
        for name in {v.name for v in node.outputs} | _reads(node):
            if name in sizes and last.get(name, index) == index:
                live -= sizes[name] or 0
    return peak, sum(1 for size in sizes.values() if size is None)
