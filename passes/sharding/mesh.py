"""Device meshes (``tp=4``, ``dp=2``, ``dp=2,tp=2``) and tensor layouts on them.

A mesh names its axes in order; rank ``r`` has one coordinate per axis, row-major
(``dp=2,tp=2``: rank = dp_index * 2 + tp_index). A :class:`Layout` says, per tensor
axis, which mesh axis splits it (if any), and which mesh axes hold a *partial sum*
still to be all-reduced. ``blocks`` > 1 means the axis is made of ``blocks`` equal
segments each split separately (a fused QKV weight: rank r holds q_r, k_r, v_r), which
is a ``ShardedDim`` with several ``SimpleShardedDim`` entries in ONNX's formalism.
``repeat`` > 1 means the axis is split into only ``size / repeat`` parts, each held by
``repeat`` consecutive ranks of the mesh axis (grouped-query attention with fewer KV heads
than tp: each KV head lives on the ranks of its query group); in ONNX's formalism, a
``SimpleShardedDim`` of ``size / repeat`` shards whose devices are groups of ranks.
"""

from __future__ import annotations

__all__ = ["MESH_AXES", "Layout", "Mesh", "Shard", "ShardingError", "parse_mesh"]

import dataclasses
import re

from gcomp.errors import GcompError, OptionError

MESH_AXES = ("dp", "tp")


class ShardingError(GcompError):
    """A sharding plan or annotation is inconsistent; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class Mesh:
    """Named mesh axes and their sizes, in rank order (last axis varies fastest)."""

    axes: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        n = 1
        for _, k in self.axes:
            n *= k
        return n

    def axis_size(self, name: str) -> int:
        return dict(self.axes).get(name, 1)

    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for name, k in reversed(self.axes):
            out[name] = rank % k
            rank //= k
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        r = 0
        for name, k in self.axes:
            r = r * k + coords.get(name, 0)
        return r

    def group(self, rank: int, axis: str) -> list[int]:
        """Ranks that differ from ``rank`` only along mesh ``axis``, in that axis's order."""
        c = self.coords(rank)
        return [self.rank_of({**c, axis: i}) for i in range(self.axis_size(axis))]

    def groups(self, axis: str) -> list[list[int]]:
        seen, out = set(), []
        for r in range(self.size):
            g = self.group(r, axis)
            if g[0] not in seen:
                seen.add(g[0])
                out.append(g)
        return out

    def __str__(self) -> str:
        return ",".join(f"{n}={k}" for n, k in self.axes)


def parse_mesh(text: str) -> Mesh:
    """Parse ``tp=N``, ``dp=N`` or ``dp=A,tp=B`` (sizes >= 1); raises OptionError."""
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    axes: list[tuple[str, int]] = []
    for item in items:
        m = re.fullmatch(r"(dp|tp)\s*=\s*(\d+)", item)
        if not m:
            raise OptionError(f"--shard '{text}': expected tp=N, dp=N or dp=A,tp=B")
        name, k = m.group(1), int(m.group(2))
        if k < 1:
            raise OptionError(f"--shard '{text}': {name} must be >= 1")
        if name in dict(axes):
            raise OptionError(f"--shard '{text}': {name} given twice")
        axes.append((name, k))
    if not axes:
        raise OptionError(f"--shard '{text}': expected tp=N, dp=N or dp=A,tp=B")
    axes.sort(key=lambda a: MESH_AXES.index(a[0]))  # dp outer, tp inner: tp groups are neighbours
    return Mesh(tuple(axes))


@dataclasses.dataclass(frozen=True)
class Shard:
    """Tensor axis split over mesh axis ``mesh`` (``blocks`` segments split separately)."""

    mesh: str
    blocks: int = 1
    repeat: int = 1

    def parts(self, mesh: Mesh) -> int:
        """How many different parts the axis is cut into (per block)."""
        return max(mesh.axis_size(self.mesh) // self.repeat, 1)

    def index(self, coords: dict[str, int]) -> int:
        """Which part the rank at ``coords`` holds."""
        return coords[self.mesh] // self.repeat

    def refines(self, other: Shard) -> bool:
        """Whether every rank's part under ``self`` lies inside its part under ``other``
        (taking it is a local slice, no communication)."""
        return self.mesh == other.mesh and self.blocks == other.blocks and other.repeat % self.repeat == 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """Per-axis shards (None: replicated along that axis) and pending partial sums."""

    dims: tuple[Shard | None, ...]
    partial: frozenset[str] = frozenset()

    @staticmethod
    def replicated(rank: int) -> Layout:
        return Layout((None,) * rank)

    @property
    def is_replicated(self) -> bool:
        return not self.partial and all(d is None for d in self.dims)

    def reduced(self) -> Layout:
        return Layout(self.dims)

    def mesh_axes(self) -> set[str]:
        return {d.mesh for d in self.dims if d is not None} | set(self.partial)

    def local_shape(self, shape: tuple[int, ...], mesh: Mesh) -> tuple[int, ...]:
        return tuple(s // d.parts(mesh) if d is not None else s for s, d in zip(shape, self.dims))

    def describe(self) -> str:
        parts = [f"{i}:{d.mesh}" + (f"x{d.blocks}" if d.blocks > 1 else "") + (f"/{d.repeat}" if d.repeat > 1 else "")
                 for i, d in enumerate(self.dims) if d]
        if self.partial:
            parts.append("partial(" + ",".join(sorted(self.partial)) + ")")
        return "[" + " ".join(parts) + "]" if parts else "replicated"
