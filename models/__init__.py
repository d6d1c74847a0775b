"""Builders of small ONNX test and benchmark models with seeded weights (onnx-ir, no torch).

Each builder returns an :class:`onnx_ir.Model` (IR version 10, opset 17)::

    from models import build
    model = build("transformer", layers=2, seed=0)

``models/make_default.py`` writes ``models/default.onnx``; ``models/export_torch.py``
exports real architectures with random weights (needs the ``export`` extra).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from . import cnn, mlp, resnet, transformer

__all__ = ["BUILDERS", "build", "cnn", "mlp", "resnet", "transformer"]

BUILDERS: dict[str, Callable[..., ir.Model]] = {
    "cnn": cnn.build,
    "transformer": transformer.build,
    "mlp": mlp.build,
    "resnet18": resnet.build,
}


def build(name: str, **kw) -> ir.Model:
    """Build the model registered as ``name`` (see :data:`BUILDERS`) with keyword arguments."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(BUILDERS)}") from None
    return builder(**kw)
