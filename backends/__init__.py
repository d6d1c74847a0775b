"""Runtimes behind one protocol (see :mod:`gcomp.backends.base`).

Backends are imported lazily by name so that ``gcomp --help`` never loads a runtime.
"""

from __future__ import annotations

__all__ = ["BACKENDS", "get_backend"]

import importlib

from gcomp.errors import OptionError

# name -> "module:class"; the TVM issue adds "tvm".
BACKENDS: dict[str, str] = {"ort": "gcomp.backends.ort:OrtBackend"}


def get_backend(name: str):
    """An instance of the backend registered as ``name``."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise OptionError(f"unknown backend '{name}' (backends: {', '.join(BACKENDS)})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()
