"""Initializer deduplication that reads only the weights that could be duplicates.

Initializers are grouped by (dtype, shape) first, which costs no I/O. Within a group of
two or more, a fingerprint of 16 blocks of 4 KiB spread evenly over each tensor splits
the group; tensors whose fingerprints collide are compared 1 MiB at a time (by SHA-256
of each chunk), each dropping out at its first difference; what stays equal to the end
merges.
External data is read with plain file reads in 1 MiB chunks, never memory-mapped, so
the pass's resident memory stays small however large the model: a model whose weights
all differ is read 64 KiB per weight.

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
                for same in _identical_groups(candidates):
                    keep = same[0]
                    for value in same[1:]:
                        ir.convenience.replace_all_uses_with(value, keep)
                        graph.initializers.pop(value.name)
                        modified = True
        return modified


_BLOCK = 4096
_BLOCKS = 16
_SAMPLE = _BLOCK * _BLOCKS  # 64 KiB read per tensor to tell most weights apart
_CHUNK = 1 << 20


def _digest(tensor: ir.TensorProtocol, *, sample: bool) -> str:
    """SHA-256 of the tensor's bytes, or of 16 spread 4 KiB blocks when ``sample``.

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
            if sample and length > _SAMPLE:
                for start in _sample_offsets(length):
                    f.seek(base + start)
                    h.update(f.read(_BLOCK))
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
    if sample and len(data) > _SAMPLE:
        for start in _sample_offsets(len(data)):
            h.update(data[start : start + _BLOCK])
    else:
        h.update(data)
    return h.hexdigest()


def _identical_groups(values: list[ir.Value]) -> list[list[ir.Value]]:
    """Split same-size tensors into groups of byte-identical ones, 1 MiB at a time: a
    tensor leaves as soon as no other matches it so far, so different weights are read
    only up to their first difference. Chunk digests are remembered on the tensors."""
    length = values[0].const_value.nbytes
    groups = [values]
    start = 0
    while groups and start < max(length, 1):
        refined: list[list[ir.Value]] = []
        for group in groups:
            by_chunk: dict[str, list[ir.Value]] = defaultdict(list)
            for value in group:
                by_chunk[_chunk_digest(value.const_value, start)].append(value)
            refined.extend(g for g in by_chunk.values() if len(g) > 1)
        groups = refined
        start += _CHUNK
    return groups


def _chunk_digest(tensor: ir.TensorProtocol, start: int) -> str:
    cache = tensor.meta.setdefault("gcomp.chunk_sha256", {}) if hasattr(tensor, "meta") else {}
    if start not in cache:
        cache[start] = hashlib.sha256(_read(tensor, start, _CHUNK)).hexdigest()
    return cache[start]


def _read(tensor: ir.TensorProtocol, start: int, size: int) -> bytes:
    if tensor.dtype == ir.DataType.STRING:
        return _digest(tensor, sample=False).encode() if start == 0 else b""
    if isinstance(tensor, ir.ExternalTensor):
        length = tensor.length if tensor.length is not None else tensor.nbytes
        with open(tensor.path, "rb") as f:
            f.seek((tensor.offset or 0) + start)
            return f.read(max(0, min(size, length - start)))
    return tensor.tobytes()[start : start + size]


def _sample_offsets(length: int) -> list[int]:
    """Start of 16 blocks of 4 KiB spread evenly from the first byte to the last block."""
    last = length - _BLOCK
    return [last * i // (_BLOCKS - 1) for i in range(_BLOCKS)]
