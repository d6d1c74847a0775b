"""The one way the core runs a model: what passes, verification and timing share.

Passes never import a runtime. When one must evaluate a model (constant folding of heavy
ops, precision ``auto``, calibration), the pipeline hands it a
:class:`gcomp.registry.PassContext` built here, holding

- a :class:`ReferenceRuntime`: ONNX Runtime on the CPU with its own graph optimizations
  off (what gcomp verifies against), or emulated reduced precision with ``emulate=True``;
- the targets' capabilities (:func:`gcomp.backends.capabilities`), so fusion asks what a
  target accepts without importing a backend.

Verification (:mod:`gcomp.verify`) and per-pass timing (:func:`time_model`) come through
here too, so every place that runs a model runs it the same way.
"""

from __future__ import annotations

__all__ = ["ReferenceRuntime", "Interleaved", "pass_context", "reference", "run_exposing", "time_interleaved",
           "time_model"]

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import backends
from gcomp.backends.ort import OrtBackend, OrtExecutable
from gcomp.errors import BackendError
from gcomp.registry import PassContext


def reference(model: ir.Model | str | Path | bytes, *, threads: int | None = None) -> OrtExecutable:
    """``model`` loaded in ONNX Runtime on the CPU with its optimizations off."""
    return OrtBackend().compile(model, "cpu", optimization="disable", threads=threads)


class ReferenceRuntime:
    """:class:`gcomp.registry.Runtime` on ONNX Runtime's CPU provider, optimizations off."""

    def __init__(self, *, timeout: float | None = None) -> None:
        self.timeout = timeout

    def run(
        self,
        model: Any,
        feeds: Mapping[str, np.ndarray],
        *,
        threads: int | None = None,
        emulate: bool = False,
    ) -> dict[str, np.ndarray]:
        if emulate:
            from gcomp.verify.emulate import emulate as run_emulated

            return run_emulated(model, feeds, timeout=self.timeout)
        if not isinstance(model, (ir.Model, str, Path, bytes)):
            model = model.SerializeToString()  # an onnx.ModelProto (fold's one-node models)
        timeout = {"timeout": self.timeout} if self.timeout else {}
        return reference(model, threads=threads).run(feeds, **timeout)


def run_exposing(model: ir.Model, names: set[str], feeds: Mapping[str, np.ndarray], *,
                 untyped: ir.DataType | None = None) -> dict[str, np.ndarray]:
    """``model`` run on the reference runtime with the node outputs named in ``names`` also
    returned (on a copy; ``model`` is not changed). ORT needs a type on every graph output:
    a value without one gets ``untyped``, or is left out when that is None."""
    copy = model.clone()
    present = {v.name for v in copy.graph.outputs}
    for node in copy.graph:
        for v in node.outputs:
            if v.name in names and v.name not in present:
                if v.type is None:
                    if untyped is None:
                        continue
                    v.type = ir.TensorType(untyped)
                copy.graph.outputs.append(v)
    return reference(copy).run(feeds)


def pass_context(
    *,
    timeout: float | None = None,
    inputs: str | Path | Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> PassContext:
    """The context the pipeline gives passes: the reference runtime, the targets,
    specialization for sharding plans, and the inputs verification uses (``inputs``,
    ``input_shapes`` and ``seed`` as :func:`gcomp.optimize` takes them)."""
    from gcomp.verify.precision import calibration_feeds

    given, path = (None, inputs) if isinstance(inputs, (str, Path)) else (inputs, None)
    given = {k: np.asarray(v) for k, v in dict(given or {}).items()}

    def feeds(model: ir.Model, calibration_path: str | None = None) -> dict[str, np.ndarray]:
        return calibration_feeds(model, given=given, path=calibration_path or path,
                                 input_shapes=dict(input_shapes or {}), seed=seed)

    return PassContext(
        runtime=ReferenceRuntime(timeout=timeout), capabilities=backends.capabilities, specialize=_specialize,
        inputs=feeds,
    )


def _specialize(model: ir.Model, mesh: Any) -> ir.Model:
    from gcomp.distributed.runner import specialize_for_mesh

    return specialize_for_mesh(model, mesh)


@dataclass
class Interleaved:
    """Per-run times (ms) of two executables timed in alternating blocks."""

    a_ms: list[float]
    b_ms: list[float]
    block_ratios: list[float]  # median a / median b of each pair of blocks, sorted

    def summary(self) -> dict[str, Any]:
        r = self.block_ratios
        return {
            "rounds": len(self.a_ms), "a_ms_min": min(self.a_ms), "b_ms_min": min(self.b_ms),
            "a_ms_median": statistics.median(self.a_ms), "b_ms_median": statistics.median(self.b_ms),
            "ratio_median": statistics.median(self.a_ms) / statistics.median(self.b_ms),
            "ratio_p10": r[len(r) // 10], "ratio_p90": r[(9 * len(r)) // 10],
        }


def time_interleaved(a, b, feeds: Mapping[str, np.ndarray], *, blocks: int = 8, block: int = 8,
                     warmup: int = 3) -> Interleaved:
    """Time executables ``a`` and ``b`` on ``feeds`` in alternating blocks of ``block`` runs.

    Blocks, not single alternating runs: ONNX Runtime's worker threads keep spinning for a
    while after a run, so a run of the other session right after it competes with them
    (measured: single-run alternation doubled both medians on 2 cores and moved a ratio
    between 2.5x and 3.7x run to run; blocks gave steady figures)."""
    for exe in (a, b):
        for _ in range(warmup):
            exe.run(feeds)
    times: list[list[float]] = [[], []]
    ratios = []
    for _ in range(blocks):
        medians = []
        for i, exe in enumerate((a, b)):
            block_times = _timed_runs(exe, feeds, block)
            times[i] += block_times
            medians.append(statistics.median(block_times))
        ratios.append(medians[0] / medians[1])
    return Interleaved(times[0], times[1], sorted(ratios))


def time_model(model: ir.Model, feeds: Mapping[str, np.ndarray], runs: int = 7) -> float | None:
    """Median wall time (ms) of ``runs`` runs on ONNX Runtime (all its optimizations),
    after one untimed run; None when the model does not run there."""
    try:
        exe = OrtBackend().compile(model, "cpu")
        exe.run(feeds)
        samples = _timed_runs(exe, feeds, runs)
    except BackendError:
        return None
    return sorted(samples)[len(samples) // 2]


def _timed_runs(exe, feeds: Mapping[str, np.ndarray], runs: int) -> list[float]:
    """Wall time (ms) of each of ``runs`` runs of ``exe`` on ``feeds``."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        exe.run(feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples
