"""Communicators: the collectives a rank's graph asks for, on numpy buffers.

- :class:`MpiCommunicator`: one process per rank, MPI through mpi4py (imported lazily);
  one sub-communicator per mesh axis (ranks that differ only along that axis).
- :class:`SimulatedWorld`: every rank in one process, for tests and ``--simulate``;
  collectives are computed across the ranks' buffers in rank order.

The simulator sums in group order; MPI's reduction order is its own, so the two can
differ in the last bits of float sums over more than two ranks.
"""

from __future__ import annotations

__all__ = ["MpiCommunicator", "SimulatedWorld", "apply_collective"]

from collections.abc import Mapping

import numpy as np

from gcomp.passes.sharding.mesh import Mesh
from gcomp.passes.sharding.partition import combine_parts


def apply_collective(op: str, attrs: Mapping, parts: list[np.ndarray]) -> np.ndarray:
    """The result every member of one group gets, from the members' buffers in group order."""
    if op == "AllReduce":
        total = parts[0].copy()
        for p in parts[1:]:
            total = total + p
        return total
    if op == "AllGather":  # a part held by ``repeat`` consecutive ranks counts once
        return combine_parts(parts[::int(attrs.get("repeat", 1))], int(attrs["axis"]), int(attrs.get("blocks", 1)))
    raise ValueError(f"unknown collective {op}")


class SimulatedWorld:
    """All ranks of ``mesh`` in one process; :meth:`collective` takes every rank's buffer."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.calls: list[tuple[str, dict, int]] = []  # (op, attrs, bytes per rank) for tests/reports

    def collective(self, op: str, attrs: Mapping, buffers: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * self.mesh.size
        axes = list(attrs["mesh_axes"]) if op == "AllReduce" else [attrs["mesh_axis"]]
        current = list(buffers)
        for axis in axes:
            for group in self.mesh.groups(axis):
                result = apply_collective(op, attrs, [current[r] for r in group])
                for r in group:
                    out[r] = result
            current = list(out)
        self.calls.append((op, dict(attrs), int(buffers[0].nbytes)))
        return current


class MpiCommunicator:
    """This process's rank in ``mesh`` over MPI (``COMM_WORLD`` must have ``mesh.size`` ranks)."""

    def __init__(self, mesh: Mesh, comm=None) -> None:
        from gcomp.deps import require

        require("running on MPI ranks", "mpi4py")
        from mpi4py import MPI

        self.MPI = MPI
        self.world = comm if comm is not None else MPI.COMM_WORLD
        if self.world.Get_size() != mesh.size:
            from gcomp.errors import GcompError

            raise GcompError(f"MPI world has {self.world.Get_size()} ranks; mesh {mesh} needs {mesh.size}")
        self.mesh = mesh
        self.rank = self.world.Get_rank()
        coords = mesh.coords(self.rank)
        self.groups = {}
        for axis, _ in mesh.axes:
            color = mesh.rank_of({**coords, axis: 0})
            self.groups[axis] = self.world.Split(color, coords[axis])

    def collective(self, op: str, attrs: Mapping, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        if op == "AllReduce":
            for axis in attrs["mesh_axes"]:
                g = self.groups[axis]
                if g.Get_size() == 1:
                    continue
                out = np.empty_like(x)
                g.Allreduce(x, out, op=self.MPI.SUM)
                x = out
            return x
        if op == "AllGather":
            g = self.groups[attrs["mesh_axis"]]
            parts = np.empty((g.Get_size(),) + x.shape, x.dtype)
            g.Allgather(x, parts)
            return apply_collective(op, attrs, list(parts))
        raise ValueError(f"unknown collective {op}")

    def barrier(self) -> None:
        self.world.Barrier()

    def bcast(self, obj):
        return self.world.bcast(obj, root=0)
