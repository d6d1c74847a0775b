"""Initializer deduplication that reads only the weights that could be duplicates.

Initializers are grouped by (dtype, shape) first, which costs no I/O. Within a group of
two or more, a fingerprint of 16 blocks of 4 KiB spread evenly over each tensor splits
the group; tensors whose fingerprints collide are compared 1 MiB at a time (by SHA-256
of each chunk), each dropping out at its first difference; what stays equal to the end
merges.
External data is read with plain file reads in 1 MiB chunks, never memory-mapped, so
the pass's resident memory stays small however large the model: a model whose weights
all differ is read 64 KiB per weight.

Across scopes: byte-equal initializers of different graphs (If branches and Loop
bodies each holding their own copy of ``[0]``, ``[1]``, ``INT64_MAX``, or the same
weight) become one initializer of the main graph, which every body may read. One already
in the main graph is kept; else one body's copy moves there under a name used nowhere
else in the model (a body value of the same name would otherwise shadow it). Not in an
IR-3 model, whose main-graph initializers must be graph inputs.

Refuses: initializers that are graph inputs (a caller may override them) or graph
outputs, and tensors over ``dedup_size_limit`` elements. An IR-3 model's main-graph
initializers are all listed as inputs, and are constants all the same (ONNX Runtime
refuses a feed for them; constant folding reads them so too): those merge, and the
merged one leaves the input list with its data (``gcomp.compat`` lists what is left).
Scopes: each graph on its own (main graph and every subgraph), then across them;
functions have no initializers.
Guarantees: outputs bit-identical (only byte-equal tensors are merged).
"""

from __future__ import annotations

__all__ = ["DeduplicateInitializers"]

import hashlib
from collections import Counter, defaultdict
from typing import Annotated

import onnx_ir as ir

from gcomp.passes.scopes import FreshNames, all_scopes, listed_are_constant
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
        graphs = list(model.graphs())
        self._listed_are_constant = listed_are_constant(model)
        for graph in graphs:
            for same in self._equal(graph.initializers.values()):
                _merge(same[0], same[1:])
                modified = True
        if len(graphs) > 1 and (model.ir_version is None or model.ir_version >= 4):
            modified |= self._hoist(model, graphs)
        return ir.passes.PassResult(model, modified=modified)

    def _hoist(self, model: ir.Model, graphs: list[ir.Graph]) -> bool:
        """Byte-equal initializers of different graphs become one of the main graph."""
        bodies = [v for g in graphs[1:] for v in g.initializers.values()]
        if not bodies:
            return False
        groups = self._equal([*model.graph.initializers.values(), *bodies])
        if not groups:
            return False
        names = FreshNames(model)
        counts = _name_counts(model)
        for same in groups:
            keep = next((v for v in same if v.graph is model.graph), same[0])
            rest = [v for v in same if v is not keep]
            if keep.graph is not model.graph or counts[keep.name] > 1:
                # Moved out of its body, or named like a value elsewhere that could shadow it
                # where the others are read: a name nothing else in the model has.
                keep.graph.initializers.pop(keep.name)
                keep.name = names(keep.name)
                model.graph.initializers.add(keep)
            _merge(keep, rest)
        return True

    def _equal(self, values) -> list[list[ir.Value]]:
        """Groups (two or more) of byte-equal candidates among ``values``."""
        groups: dict[tuple, list[ir.Value]] = defaultdict(list)
        # Graph inputs first: an IR-3 model keeps a listed initializer it merges into,
        # so the list of its inputs only shrinks.
        for value in sorted(values, key=lambda v: not v.is_graph_input()):
            tensor = value.const_value
            if tensor is None or value.is_graph_output() or tensor.size > self.size_limit:
                continue
            if value.is_graph_input() and not self._listed_are_constant:
                continue
            groups[(tensor.dtype, tuple(tensor.shape.numpy()))].append(value)
        found = []
        for same_type in groups.values():
            if len(same_type) < 2:
                continue
            by_sample: dict[str, list[ir.Value]] = defaultdict(list)
            for value in same_type:
                by_sample[_digest(value.const_value, sample=True)].append(value)
            for candidates in by_sample.values():
                if len(candidates) > 1:
                    found.extend(_identical_groups(candidates))
        return found


def _merge(keep: ir.Value, others: list[ir.Value]) -> None:
    for value in others:
        ir.convenience.replace_all_uses_with(value, keep)
        if value.is_graph_input():  # IR 3: listed, yet a constant (see the docstring)
            value.graph.inputs.remove(value)
        value.graph.initializers.pop(value.name)


def _name_counts(model: ir.Model) -> Counter:
    """How many values of the model carry each name (across every scope)."""
    counts: Counter = Counter()
    for scope in all_scopes(model):
        values = [*scope.inputs, *(scope.initializers.values() if isinstance(scope, ir.Graph) else ())]
        for node in scope:
            values.extend(node.outputs)
        counts.update(v.name for v in values if v is not None and v.name)
    return counts


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
