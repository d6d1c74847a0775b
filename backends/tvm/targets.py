"""The targets the TVM backend builds for, as TVM ``Target`` objects.

``llvm`` (alias ``cpu``) is the host CPU with its real features (``mcpu`` from LLVM's
host detection, ``num-cores``), not generic ``llvm``. ``cuda`` (alias ``gpu``) is the
local GPU's architecture when there is one, else ``sm_80``: CUDA code is generated
without a GPU, running it needs one (:func:`cuda_available`).
"""

from __future__ import annotations

__all__ = ["TARGETS", "cuda_available", "cuda_target", "host_target", "target_kind", "tvm_target"]

import contextlib
import functools

from gcomp.backends._device import nvidia_gpu_present
from gcomp.backends.tvm.threads import physical_cores, tvm_module
from gcomp.errors import BackendError

TARGETS = ("llvm", "cuda")
_ALIASES = {"cpu": "llvm", "llvm": "llvm", "cuda": "cuda", "gpu": "cuda"}


def target_kind(target: str) -> str:
    """``llvm`` or ``cuda`` for a target name or its alias; BackendError for another."""
    kind = _ALIASES.get(target)
    if kind is None:
        raise BackendError(f"tvm: unknown target '{target}' (targets: {', '.join(TARGETS)})")
    return kind


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA device is present and TVM can see it."""
    if not nvidia_gpu_present():
        return False
    try:
        return bool(tvm_module().cuda(0).exist)
    except Exception:
        return False


def host_target(cores: int | None = None):
    """The host CPU as an LLVM target with its real features (not generic ``llvm``)."""
    tvm = tvm_module()
    from tvm.target.codegen import llvm_get_system_cpu

    cfg = {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": cores or physical_cores()}
    return tvm.target.Target(cfg)


def cuda_target(arch: str | None = None):
    """A CUDA target (the local GPU's architecture when there is one, else ``sm_80``)."""
    tvm = tvm_module()
    if arch is None and cuda_available():
        with contextlib.suppress(Exception):
            major, minor = tvm.cuda(0).compute_version.split(".")
            arch = f"sm_{major}{minor}"
    return tvm.target.Target({"kind": "cuda", "arch": arch or "sm_80"}, host=host_target())


def tvm_target(kind: str):
    """The TVM ``Target`` of ``kind`` (``llvm`` or ``cuda``) on this machine."""
    return host_target() if kind == "llvm" else cuda_target()
