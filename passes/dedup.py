"""Initializer deduplication that reads only the weights that could be duplicates.

Initializers are grouped by (dtype, shape) first, which costs no I/O; only tensors in a
group of two or more are hashed (SHA-256 of their bytes), and equal hashes are confirmed
by comparing bytes before one value replaces the other. A model whose weights all have
distinct shapes is never read, so a 100 GB model with external data stays on disk.

Refuses: initializers that are graph inputs (a caller may override them) or graph
outputs, and tensors over ``dedup_size_limit`` elements.
Scopes: each graph on its own (main graph and every subgraph).
Guarantees: outputs bit-identical (only byte-equal tensors are merged).
"""

from __future__ import annotations

__all__ = ["DeduplicateInitializers"]

import hashlib
from collections import defaultdict
from typing import Annotated

import onnx_ir as ir

from gcomp.registry import register_pass


@register_pass("dedup-initializers")
class DeduplicateInitializers(ir.passes.InPlacePass):
    """Merge initializers with equal dtype, shape and bytes; reads only possible duplicates."""

    def __init__(
        self, *, dedup_size_limit: Annotated[int, "skip initializers with more elements"] = 1 << 30
    ) -> None:
        super().__init__()
        self.size_limit = dedup_size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            modified |= self._dedup(graph)
        return ir.passes.PassResult(model, modified=modified)

    def _dedup(self, graph: ir.Graph) -> bool:
        groups: dict[tuple, list[ir.Value]] = defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output() or tensor.size > self.size_limit:
                continue
            groups[(tensor.dtype, tuple(tensor.shape.numpy()))].append(value)
        modified = False
        for values in groups.values():
            if len(values) < 2:
                continue
            kept: dict[str, list[ir.Value]] = defaultdict(list)
            for value in values:
                data = _bytes(value.const_value)
                digest = hashlib.sha256(data).hexdigest()
                twin = next((k for k in kept[digest] if _bytes(k.const_value) == data), None)
                if twin is None:
                    kept[digest].append(value)
                    continue
                ir.convenience.replace_all_uses_with(value, twin)
                graph.initializers.pop(value.name)
                modified = True
        return modified


def _bytes(tensor: ir.TensorProtocol) -> bytes:
    if tensor.dtype == ir.DataType.STRING:
        return b"\0".join(tensor.string_data()) + f"|{len(tensor.string_data())}".encode()
    return tensor.tobytes()
