"""The backend protocol every runtime implements.

``Backend.compile(model, target) -> Executable``; ``Executable.run(feeds) -> outputs``;
``Executable.profile(feeds, iters=, warmup=) -> Profile``; ``Executable.export(path)``
where the runtime has an artifact. A backend also declares which targets it serves
and which ops it consumes, so fusion rules can ask before they fire:
``Backend.supports(op_type, domain="", opset=None) -> bool`` says whether the runtime
imports/loads that op (``opset``: the model's version of ``domain``; ``None``: any).
Across backends, :func:`gcomp.backends.targets` lists the target names (``ort-cpu``,
``ort-cuda``, ``tvm-llvm``, ``tvm-cuda``, ``portable`` = accepted by all) and
:func:`gcomp.backends.supports` answers ``supports(target, op_type, domain, opset)``.
"""

from __future__ import annotations

__all__ = ["Backend", "Executable"]

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from gcomp.perf import Profile


@runtime_checkable
class Executable(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def profile(
        self, feeds: Mapping[str, np.ndarray], *, iters: int = 50, warmup: int = 5
    ) -> Profile: ...

    def export(self, path: str | Path) -> Path: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    targets: tuple[str, ...]

    def available_targets(self) -> list[str]: ...

    def supports(self, op_type: str, domain: str = "", opset: int | None = None) -> bool: ...

    def compile(self, model: ir.Model | str | Path, target: str = "cpu") -> Executable: ...
