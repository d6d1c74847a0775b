"""The work behind ``gcomp optimize``, as one core function the CLI calls after parsing.

:func:`optimize_file` optimizes a model file into an output file: pipeline, verification,
the decision to write (never a failed or, with ``strict``, an unverified model), the
report document, the optional before/after profiles and backend choice, and the report
file. The CLI only parses options and prints; everything it prints comes from the
returned :class:`Outcome`.
"""

from __future__ import annotations

__all__ = ["OptimizeRequest", "Outcome", "VerificationFailed", "optimize_file"]

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcomp import io
from gcomp import report as reports
from gcomp.errors import GcompError
from gcomp.pipeline import ProgressCallback, Result, optimize


@dataclass(frozen=True)
class OptimizeRequest:
    """What ``gcomp optimize`` was asked to do, parsed."""

    model: Path
    output: Path
    pipeline: str
    options: Mapping[str, Any] = field(default_factory=dict)  # pass options (and precision=...)
    verify: bool = True
    inputs: Path | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    max_tensor_bytes: int | None = None
    verify_timeout: float | None = None
    bisect: bool = True
    strict: bool = False
    external_data: bool | None = None
    report: Path | None = None
    profile: bool | None = None  # None: profile before/after when the report is HTML
    profile_iters: int = 20
    pass_errors: bool = False
    pass_latency: bool = False
    select_backend: bool = False
    quantize: str | None = None  # "int8", "int8-dynamic", "int8-weights", "int4" (gcomp.quantize)
    calibration: Path | None = None
    metric: str | None = None
    speed_gate: bool = True

    @property
    def html(self) -> bool:
        return self.report is not None and self.report.suffix.lower() == ".html"


@dataclass
class Outcome:
    result: Result
    doc: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


class VerificationFailed(GcompError):
    """The optimized model's outputs differ from the original's; nothing was written."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


# A phase after the passes ("profiling before and after"): a context manager giving a
# status callback, the CLI's spinner.
Phase = Callable[[str], contextlib.AbstractContextManager]


def optimize_file(request: OptimizeRequest, *, progress: ProgressCallback | None = None,
                  phase: Phase | None = None) -> Outcome:
    """Optimize ``request.model`` into ``request.output`` (atomically; never over the input)."""
    phase = phase or (lambda text: contextlib.nullcontext(lambda _status: None))
    if request.report is not None:
        reports.check_report_path(request.report)
    io.check_writable(request.output, source=request.model)
    result = _optimize(request, progress)
    warnings = _decide_to_write(request, result)
    result.save(request.output, external_data=request.external_data)
    doc = reports.optimize_document(result, output=str(request.output), input_path=str(request.model))
    _add_measurements(request, result, doc, phase)
    if request.report is not None:
        reports.write_report(doc, request.report)
    return Outcome(result, doc, warnings)


def _optimize(request: OptimizeRequest, progress: ProgressCallback | None) -> Result:
    # An HTML report draws the per-pass error and latency: measure them when verifying.
    return optimize(
        request.model, request.pipeline, verify=request.verify, inputs=request.inputs,
        input_shapes=request.input_shapes, bisect=request.bisect, progress=progress,
        max_tensor_bytes=request.max_tensor_bytes, verify_timeout=request.verify_timeout,
        pass_errors=(request.pass_errors or request.html) and request.verify,
        pass_latency=(request.pass_latency or request.html) and request.verify,
        **_quantization(request), **request.options,
    )


def _quantization(request: OptimizeRequest) -> dict[str, Any]:
    if request.quantize is None:
        return {}
    return {"quantize": request.quantize, "calibration": request.calibration, "metric": request.metric,
            "speed_gate": request.speed_gate}


def _decide_to_write(request: OptimizeRequest, result: Result) -> list[str]:
    """Raise when the output must not be written; the warnings to show when it may."""
    v = result.verification
    if v is None:
        return []
    if v.status == "failed":
        raise VerificationFailed(f"{v.summary()}; nothing written", result)
    if v.status == "unverified":
        if request.strict:
            raise GcompError(f"{v.summary()} (--strict); nothing written")
        return [f"{v.summary()}; writing the output marked unverified"]
    return []


def _add_measurements(request: OptimizeRequest, result: Result, doc: dict[str, Any], phase: Phase) -> None:
    """Profiles before/after and the backend choice, when asked, into the report document."""
    if request.html if request.profile is None else request.profile:
        from gcomp.profiling import optimize_profiles

        with phase("profiling before and after") as status:
            doc["profiles"] = optimize_profiles(
                result, request.model, iters=request.profile_iters, warmup=3, inputs=request.inputs,
                input_shapes=request.input_shapes, max_tensor_bytes=request.max_tensor_bytes,
                output=str(request.output), status=status,
            )
    if request.select_backend:
        from gcomp.autoselect import optimize_selection

        with phase("choosing a backend") as status:
            doc["backend_selection"] = optimize_selection(
                result.model, inputs=request.inputs, input_shapes=request.input_shapes,
                max_tensor_bytes=request.max_tensor_bytes, progress=status,
            )
