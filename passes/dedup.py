"""Initializer deduplication that reads only the weights that could be duplicates.

Initializers are grouped by (dtype, shape) first, which costs no I/O. Within a group of
two or more, a fingerprint of each tensor's first and last 64 KiB splits the group, and
only tensors whose fingerprints collide are hashed whole (SHA-256); equal digests merge.
External data is read with plain file reads in 1 MiB chunks, never memory-mapped, so
the pass's resident memory stays small however large the model: a model whose weights
all differ is read 128 KiB per weight at most.

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
            by_sample: dict[str, list[ir.Value]] = defaultdict(list)
            for value in values:
                by_sample[_digest(value.const_value, sample=True)].append(value)
            for candidates in by_sample.values():
                if len(candidates) < 2:
                    continue
                kept: dict[str, ir.Value] = {}
                for value in candidates:
                    digest = _digest(value.const_value, sample=False)
                    twin = kept.setdefault(digest, value)
                    if twin is value:
                        continue
                    ir.convenience.replace_all_uses_with(value, twin)
                    graph.initializers.pop(value.name)
                    modified = True
        return modified


_SAMPLE = 64 * 1024
_CHUNK = 1 << 20


def _digest(tensor: ir.TensorProtocol, *, sample: bool) -> str:
    """SHA-256 of the tensor's bytes, or of its first and last 64 KiB when ``sample``.

    Remembered on the tensor (tensors are immutable), so later rounds of a pipeline
    don't read the weights again."""
    key = "gcomp.sha256.sample" if sample else "gcomp.sha256"
    cached = tensor.meta.get(key) if hasattr(tensor, "meta") else None
    if cached is None:
        cached = _compute_digest(tensor, sample=sample)
        if hasattr(tensor, "meta"):
            tensor.meta[key] = cached
    return cached


def _compute_digest(tensor: ir.TensorProtocol, *, sample: bool) -> str:
    h = hashlib.sha256()
    if tensor.dtype == ir.DataType.STRING:
        strings = tensor.string_data()
        h.update(f"{len(strings)}|".encode())
        for s in strings:
            h.update(f"{len(s)}:".encode() + s)
        return h.hexdigest()
    if isinstance(tensor, ir.ExternalTensor):
        length = tensor.length if tensor.length is not None else tensor.nbytes
        with open(tensor.path, "rb") as f:
            base = tensor.offset or 0
            if sample and length > 2 * _SAMPLE:
                f.seek(base)
                h.update(f.read(_SAMPLE))
                f.seek(base + length - _SAMPLE)
                h.update(f.read(_SAMPLE))
            else:
                f.seek(base)
                left = length
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break
                    h.update(chunk)
                    left -= len(chunk)
        return h.hexdigest()
    data = tensor.tobytes()
    if sample and len(data) > 2 * _SAMPLE:
        data = data[:_SAMPLE] + data[-_SAMPLE:]
    h.update(data)
    return h.hexdigest()
