"""gcomp: a graph-optimizing compiler toolchain for ONNX models.

The Python API in one screen::

    import gcomp
    result = gcomp.optimize("model.onnx", pipeline="O1")   # verified on ONNX Runtime
    result.save("model.opt.onnx")

    @gcomp.register_pass("my-pass")                         # your own onnx-ir pass
    class MyPass(onnx_ir.passes.InPlacePass): ...

Names are imported lazily so ``import gcomp`` (and ``gcomp --help``) stays fast.
"""

from __future__ import annotations

__all__ = [
    "__version__",
    "optimize",
    "Result",
    "PassStats",
    "register_pass",
    "register_pipeline",
    "Stage",
    "load",
    "save",
    "GcompError",
]

__version__ = "0.1.0"

from gcomp.errors import GcompError

_LAZY = {
    "optimize": ("gcomp.pipeline", "optimize"),
    "Result": ("gcomp.pipeline", "Result"),
    "PassStats": ("gcomp.pipeline", "PassStats"),
    "register_pass": ("gcomp.registry", "register_pass"),
    "register_pipeline": ("gcomp.registry", "register_pipeline"),
    "Stage": ("gcomp.registry", "Stage"),
    "load": ("gcomp.io", "load"),
    "save": ("gcomp.io", "save"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gcomp' has no attribute '{name}'")
