"""The result of a pass that reports more than whether it changed the model.

:class:`DetailedResult` is an ``onnx_ir`` pass result with a ``details`` dict (what was
folded, fused or converted, what was left and why); the pipeline copies it into
``PassStats.details`` and the reports show it.
"""

from __future__ import annotations

__all__ = ["DetailedResult"]

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir


@dataclass
class DetailedResult(ir.passes.PassResult):
    """A pass result with what the pass did, beyond ``modified``, in ``details``."""

    details: dict[str, Any] = field(default_factory=dict)
