"""Runtimes behind one protocol (see :mod:`gcomp.backends.base`).

Backends are imported lazily by name so that ``gcomp --help`` never loads a runtime.
"""

from __future__ import annotations

__all__ = ["BACKENDS", "get_backend", "targets", "supports", "capabilities"]

import importlib

from gcomp.errors import OptionError

# name -> "module:class".
BACKENDS: dict[str, str] = {"ort": "gcomp.backends.ort:OrtBackend", "tvm": "gcomp.backends.tvm:TvmBackend"}


def targets() -> list[str]:
    """Compilation target names, ``portable`` last (:data:`gcomp.backends.target_ops.TARGETS`)."""
    from gcomp.backends.target_ops import targets as _targets

    return _targets()


def supports(target: str, op_type: str, domain: str = "", opset: int | None = None) -> bool:
    """Whether ``target`` consumes ``op_type`` of ``domain`` at ``opset`` (cached answers
    read from the runtimes; see :mod:`gcomp.backends.target_ops`)."""
    from gcomp.backends.target_ops import supports as _supports

    return _supports(target, op_type, domain, opset)


def get_backend(name: str):
    """An instance of the backend registered as ``name``."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise OptionError(f"unknown backend '{name}' (backends: {', '.join(BACKENDS)})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def capabilities(name: str):
    """What target ``name`` accepts, as the :class:`gcomp.registry.Capabilities` the
    pipeline hands fusion passes (:func:`gcomp.backends.target_ops.capabilities`: the one
    definition); OptionError for an unknown target."""
    from gcomp.backends.target_ops import capabilities as _capabilities

    return _capabilities(name)
