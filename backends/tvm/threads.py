"""TVM's thread pool: how many threads its kernels run on, settled before TVM starts.

Every use of TVM in the backend goes through :func:`tvm_module`, so the pool's size is
decided (:func:`runtime_threads`) before the first kernel can start it with TVM's own
default. :func:`require_tvm` is the one check that TVM is installed (``gcomp[tvm]``):
one line naming the ``pip install`` that brings it, instead of an ImportError.
"""

from __future__ import annotations

__all__ = ["physical_cores", "require_tvm", "runtime_threads", "start_pool", "tvm_module"]

import functools
import os

from gcomp.deps import require


def require_tvm(*, tuning: bool = False) -> None:
    """:class:`gcomp.deps.MissingExtraError` when TVM is not installed or, for
    ``tuning``, the packages MetaSchedule's cost model needs (xgboost, cloudpickle)."""
    require("the TVM backend", "tvm", "tvm_ffi")
    if tuning:
        require("tuning TVM kernels (--tune-trials)", "xgboost", "cloudpickle")


def tvm_module():
    """The ``tvm`` package, imported after the thread count is settled."""
    require_tvm()
    runtime_threads()
    import tvm

    return tvm


def runtime_threads() -> int:
    """Threads TVM's kernels run on: every core this process may use, unless the user set
    ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``).

    TVM's own default halves the hardware thread count on x86 to skip hyper-threads; on a
    VM with one thread per core (this 2-vCPU machine) that leaves half the cores idle: a
    tuned mini-BERT ran 1.52 ms on TVM's one thread, 0.87 ms on two (ORT: 1.03 ms;
    docs/measurements.md). TVM reads the setting when its thread pool starts, at the first
    parallel kernel, so this runs before gcomp builds, tunes or loads anything. When the
    pool had already started (the caller ran TVM kernels first), its size stays, and so
    does the environment: kernels launched for more threads than the pool has stall (50x
    slower, measured).
    """
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return start_pool()


@functools.cache
def start_pool() -> int:
    """Set the thread count and start TVM's pool, once: after that the pool's size is fixed,
    and every later call (:func:`tvm_module` runs on each model run) only needs the answer."""
    from gcomp.backends.tvm.artifact import runtime_function

    want = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(want)
    # TVM's runtime library alone (not ``import tvm``): loading an artifact needs no more
    got = int(runtime_function("runtime.NumThreads")())  # starts the pool, or reads it
    if got != want:
        del os.environ["TVM_NUM_THREADS"]
    return got


def physical_cores() -> int:
    """The machine's cores (not hyper-threads). Not this thread's affinity: TVM's thread
    pool pins the calling thread to one core when it starts, and the count must not
    change after that (it is part of the target, so of the tuning database's key)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1
