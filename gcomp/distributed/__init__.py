"""Distributed execution of partitioned models: communicators (MPI, simulated) and per-rank runners.

``run(model, "tp=2", check=True)`` runs every rank in this process (``simulate=True``) or,
under ``mpiexec``, this process's rank; see :mod:`gcomp.distributed.runner`. The
``gcomp run`` / ``gcomp shard`` commands live in :mod:`gcomp.distributed.launch`.
mpi4py and ONNX Runtime are imported only when a run needs them.
"""

from __future__ import annotations

__all__ = ["MpiCommunicator", "RunResult", "SimulatedWorld", "prepare", "run", "simulate"]

_LAZY = {
    "run": ("gcomp.distributed.runner", "run"),
    "prepare": ("gcomp.distributed.runner", "prepare"),
    "simulate": ("gcomp.distributed.runner", "simulate"),
    "RunResult": ("gcomp.distributed.runner", "RunResult"),
    "SimulatedWorld": ("gcomp.distributed.comm", "SimulatedWorld"),
    "MpiCommunicator": ("gcomp.distributed.comm", "MpiCommunicator"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'gcomp.distributed' has no attribute '{name}'")
