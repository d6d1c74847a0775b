"""The targets the TVM backend builds for, as TVM ``Target`` objects.

``llvm`` (alias ``cpu``) is the host CPU with its real features (``mcpu`` from LLVM's
host detection, ``num-cores``), not generic ``llvm``. ``cuda`` (alias ``gpu``) is the
architecture asked for (``--cuda-arch sm_90``), else the local GPU's when there is one,
else ``sm_80``: CUDA code is generated without a GPU, running it needs one
(:func:`cuda_available`). The host side of a CUDA artifact (the VM's glue code, not the
kernels) is built for a portable CPU level, :func:`portable_host` (x86-64-v3 on x86),
not for the build machine's CPU, since it runs on the GPU machine.
"""

from __future__ import annotations

__all__ = ["TARGETS", "check_cuda_arch", "cuda_available", "cuda_target", "host_target", "portable_host",
           "target_kind", "tvm_target"]

import contextlib
import functools
import platform
import re

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


def portable_host():
    """The LLVM target for a CUDA artifact's host code: ``x86-64-v3`` on x86 (AVX2, FMA,
    BMI: x86 servers since about 2015, every machine an H100/H200 sits in), the generic
    CPU of this machine's architecture elsewhere."""
    tvm = tvm_module()
    if platform.machine().lower() in ("x86_64", "amd64"):
        return tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})
    return tvm.target.Target({"kind": "llvm"})


_ARCH = re.compile(r"sm_[1-9][0-9]{1,2}[a-z]?")


def check_cuda_arch(arch: str) -> str:
    """``arch`` if it names a CUDA architecture as nvcc spells it (``sm_80``, ``sm_90a``)."""
    if not _ARCH.fullmatch(arch or ""):
        raise BackendError(f"tvm: CUDA architecture '{arch}' is not of the form sm_XY (e.g. sm_80, sm_90, sm_90a)")
    return arch


def cuda_target(arch: str | None = None):
    """A CUDA target for ``arch`` (else the local GPU's architecture when there is one,
    else ``sm_80``), its host code for :func:`portable_host`."""
    tvm = tvm_module()
    if arch is not None:
        check_cuda_arch(arch)
    elif cuda_available():
        with contextlib.suppress(Exception):
            major, minor = tvm.cuda(0).compute_version.split(".")
            arch = f"sm_{major}{minor}"
    return tvm.target.Target({"kind": "cuda", "arch": arch or "sm_80"}, host=portable_host())


def tvm_target(kind: str, cuda_arch: str | None = None):
    """The TVM ``Target`` of ``kind`` (``llvm`` or ``cuda``) on this machine."""
    if kind == "llvm" and cuda_arch is not None:
        raise BackendError("tvm: a CUDA architecture is for the cuda target, not llvm")
    return host_target() if kind == "llvm" else cuda_target(cuda_arch)
