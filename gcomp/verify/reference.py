"""The original model's outputs on fixed inputs, and checking candidates against them.

:class:`Reference` runs the original once on the reference runtime
(:func:`gcomp.runtime.reference`: ONNX Runtime on the CPU, optimizations off) on given or
seeded generated inputs (:mod:`gcomp.inputs`); :meth:`Reference.check` runs a candidate on
the same inputs and compares every output (:mod:`.compare`). A reduced-precision
candidate of a full-precision original runs in emulation instead (:mod:`.precision`). A
model that cannot run is *unverified* (:class:`CannotVerify`), never *passed*. With an
execution provider named (``gcomp verify --provider``), the candidate runs on it instead
(optimizations off; no emulation: the provider computes reduced precision itself) while
the original stays on the reference; a provider that cannot run here is an error, not a
verdict. A reduced-precision candidate's float outputs must also keep their signal
(cosine, rel-l2, not zeroed: :func:`gcomp.verify.precision.judge_signal`).
"""

from __future__ import annotations

__all__ = ["DEFAULT_RUN_TIMEOUT", "CannotVerify", "Reference", "Verification", "verify"]

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import inputs as _inputs
from gcomp import io, runtime
from gcomp.backends.ort_providers import CPU, ProviderError, check_machine, resolve_provider
from gcomp.errors import BackendError, first_line
from gcomp.passes.precision.accuracy import Bounds
from gcomp.verify.compare import TOLERANCES, OutputCheck, Tolerance, compare_outputs
from gcomp.verify.emulate import reduced_precision
from gcomp.verify.limits import DEFAULT_MAX_TENSOR_BYTES, huge_tensor
from gcomp.verify.metrics import Budget, measure
from gcomp.verify.precision import emulated_outputs, judge_signal, signal_bounds

# A reference run still going after this many seconds is stopped (an endless Loop).
DEFAULT_RUN_TIMEOUT = 300.0


@dataclass
class Verification:
    """Outcome of comparing a transformed model with its original."""

    status: str  # "passed" | "failed" | "unverified"
    reason: str = ""
    outputs: list[OutputCheck] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    first_bad_pass: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs_error"] = self.max_abs_error
        return d

    def summary(self) -> str:
        if self.status == "passed":
            return f"verified: {len(self.outputs)} output(s) match, max abs error {self.max_abs_error:.3g}"
        if self.status == "unverified":
            return f"not verified: {self.reason}"
        where = f" (first bad pass: {self.first_bad_pass})" if self.first_bad_pass else ""
        return f"verification FAILED: {self.reason}{where}"


class CannotVerify(Exception):
    """The original model cannot be run on these inputs; carries the reason."""


class Reference:
    """The original model's outputs on a fixed set of inputs, to check candidates against."""

    def __init__(
        self,
        feeds: dict[str, np.ndarray],
        outputs: dict[str, Any],
        notes: list[str],
        tolerances: Mapping[str, Tolerance] | None = None,
    ) -> None:
        self.feeds = feeds
        self.outputs = outputs
        self.notes = notes
        self.tolerances = dict(TOLERANCES, **(tolerances or {}))
        self.explicit_tolerances = dict(tolerances or {})
        # "fp16"/"bf16" when the original itself holds reduced precision: then candidates
        # run on ORT like it (an O1 of an fp16 model compares like with like).
        self.original_precision: str | None = None
        self.timeout = DEFAULT_RUN_TIMEOUT
        # The ONNX Runtime execution provider candidates run on, with its options (None: the reference).
        self.provider: str | None = None
        self.provider_options: dict[str, str] = {}

    @classmethod
    def build(
        cls,
        original: ir.Model | str | Path,
        *,
        inputs: str | Path | Mapping[str, np.ndarray] | None = None,
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        seed: int = 0,
        tolerances: Mapping[str, Tolerance] | None = None,
        model: ir.Model | None = None,
        max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
        timeout: float = DEFAULT_RUN_TIMEOUT,
    ) -> Reference:
        """Run the original model once; raise :class:`CannotVerify` when it cannot run.

        ``model`` is ``original`` already loaded, when the caller has it. Nothing is run
        when an input or a constant-sized tensor would exceed ``max_tensor_bytes``.
        """
        if model is None:
            model = original if isinstance(original, ir.Model) else io.load(original, check=False)
        if isinstance(inputs, (str, Path)):
            given = _inputs.load_inputs(inputs, model)
        else:
            given = dict(inputs or {})
        too_big = huge_tensor(model, max_tensor_bytes)
        if too_big:
            raise CannotVerify(too_big)
        feeds, notes = _generate(model, given, input_shapes, seed, max_tensor_bytes)
        outputs = _run_original(original, feeds, given=inputs is not None, timeout=timeout)
        reference = cls(feeds, outputs, notes, tolerances)
        reference.timeout = timeout
        reference.original_precision = reduced_precision(model)
        return reference

    def check(self, candidate: ir.Model | str | Path) -> Verification:
        """Run ``candidate`` on the reference inputs and compare every output."""
        info = _inputs.describe_feeds(self.feeds)
        try:
            actual, tolerances, note, signal = self._run(candidate)
        except ProviderError:
            raise  # the provider cannot run here: not a verdict on the model
        except BackendError as e:
            reason = f"the transformed model does not run: {first_line(e)}"
            return Verification("failed", reason, inputs=info, notes=list(self.notes))
        checks = compare_outputs(self.outputs, actual, tolerances)
        if signal is not None:  # a reduced-precision candidate: direction and relative error too
            judge_signal(checks, self.outputs, actual, *signal)
        notes = list(self.notes) + ([note] if note else [])
        bad = [c for c in checks if not c.ok]
        if bad:
            reason = "; ".join(f"output '{c.name}': {c.detail}" for c in bad[:3])
            return Verification("failed", reason, checks, info, notes)
        return Verification("passed", "", checks, info, notes)

    def check_budget(self, candidate: ir.Model, budget: Budget) -> Verification:
        """Compare a lossy candidate (a quantized model) under an accuracy budget instead
        of element-wise tolerances (:mod:`gcomp.verify.metrics`)."""
        info = _inputs.describe_feeds(self.feeds)
        try:
            actual = runtime.reference(candidate).run(self.feeds, timeout=self.timeout)
        except BackendError as e:
            reason = f"the transformed model does not run: {first_line(e)}"
            return Verification("failed", reason, inputs=info, notes=list(self.notes))
        checks = []
        for row in measure([self.outputs], [actual], budget):
            e, a = np.asarray(self.outputs[row.name]), np.asarray(actual.get(row.name))
            same = e.shape == a.shape and e.dtype.kind == "f" and a.dtype.kind == "f"
            diff = float(np.max(np.abs(a.astype(np.float64) - e))) if same and e.size else 0.0
            detail = f"{budget.metric} error {row.error:.4g}" + (f", cosine {row.cosine:.5f}" if row.cosine else "")
            checks.append(OutputCheck(row.name, str(e.dtype), list(e.shape), row.within, diff, detail=detail))
        notes = list(self.notes) + [f"compared under the accuracy budget {budget.describe()} (a lossy model)"]
        bad = [c for c in checks if not c.ok]
        if bad:
            reason = "; ".join(f"output '{c.name}': {c.detail} exceeds {budget.describe()}" for c in bad[:3])
            return Verification("failed", reason, checks, info, notes)
        return Verification("passed", "", checks, info, notes)

    def _run(self, candidate: ir.Model | str | Path) -> tuple[dict[str, Any], Mapping[str, Tolerance], str | None,
                                                              tuple[str, Bounds] | None]:
        """(outputs, tolerances, a note, (precision, signal bounds) of a reduced-precision
        candidate). A reduced-precision (fp16/bf16) candidate of a full-precision original
        runs in emulation with its own tolerances: ORT on the CPU upcasts and would hide
        overflow (:mod:`gcomp.verify.emulate`)."""
        if self.provider is not None:
            return self._run_on_provider(candidate)
        if self.original_precision is None:
            emulated = emulated_outputs(candidate, self.feeds, self.outputs, self.explicit_tolerances, self.timeout)
            if emulated is not None:
                return emulated
        return runtime.reference(candidate).run(self.feeds, timeout=self.timeout), self.tolerances, None, None

    def _run_on_provider(self, candidate: ir.Model | str | Path) -> tuple[dict[str, Any], Mapping[str, Tolerance], str,
                                                                          tuple[str, Bounds] | None]:
        """The candidate on :attr:`provider`, optimizations off; a reduced-precision candidate
        of a full-precision original is held to its precision's tolerances and signal bounds."""
        from gcomp.backends.ort import OrtBackend
        from gcomp.verify.emulate import TOLERANCES as REDUCED

        exe = OrtBackend().compile(candidate, self.provider, optimization="disable",
                                   provider_options=self.provider_options)
        outputs = exe.run(self.feeds, timeout=self.timeout)
        tolerances = self.tolerances
        model = candidate if isinstance(candidate, ir.Model) else io.load(candidate, check=False)
        low = reduced_precision(model) if self.original_precision is None else None
        signal = None
        if low is not None:
            tolerances = {**self.tolerances, **dict.fromkeys(("float32", "float16", "bfloat16", "float64"),
                                                             REDUCED[low]), **self.explicit_tolerances}
            signal = (low, signal_bounds(model, low))
        note = (f"the candidate ran on {', '.join(exe.providers)} (optimizations off), the original on the "
                f"reference ({CPU}, optimizations off)")
        return outputs, tolerances, note, signal


def _generate(model: ir.Model, given: dict[str, np.ndarray], input_shapes, seed: int, max_tensor_bytes: int):
    """(feeds, notes): ``given``, the other inputs generated; CannotVerify when impossible."""
    try:
        return _inputs.generate_inputs(
            model, shapes=dict(input_shapes or {}), given=given, seed=seed, max_bytes=max_tensor_bytes
        )
    except _inputs.InputsTooLarge as e:
        raise CannotVerify(f"{e} (--max-tensor-bytes; or smaller --input-shape)") from None
    except _inputs.CannotGenerate as e:
        raise CannotVerify(str(e)) from None


def _run_original(original: ir.Model | str | Path, feeds, *, given: bool, timeout: float) -> dict[str, Any]:
    """The original's outputs on the reference runtime; CannotVerify when it does not run."""
    try:
        runner = runtime.reference(original)
    except BackendError as e:
        raise CannotVerify(f"the original model does not load in ONNX Runtime: {first_line(e)}") from None
    try:
        return runner.run(feeds, timeout=timeout)
    except BackendError as e:
        if "stopped after" in str(e):
            hint = " (--verify-timeout)"
        else:
            hint = "" if given else " (pass real inputs with --inputs or shapes with --input-shape)"
        raise CannotVerify(
            f"the original model does not run on the {'given' if given else 'generated'} inputs: {first_line(e)}{hint}"
        ) from None


def verify(
    original: ir.Model | str | Path,
    candidate: ir.Model | str | Path,
    *,
    inputs: str | Path | Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    tolerances: Mapping[str, Tolerance] | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    timeout: float = DEFAULT_RUN_TIMEOUT,
    provider: str | None = None,
    provider_options: Mapping[str, str] | None = None,
) -> Verification:
    """Compare two models on the same inputs; never raises for a model that cannot run.

    ``provider`` (an ONNX Runtime execution provider, full or short name) runs the
    candidate there, with ``provider_options``; one that cannot run here raises
    :class:`~gcomp.backends.ort_providers.ProviderError`, an unknown one an OptionError."""
    chosen = resolve_provider(provider) if provider is not None else None
    if chosen is not None:
        check_machine(chosen)  # before the original runs: a GPU provider on a machine without one
    try:
        ref = Reference.build(
            original, inputs=inputs, input_shapes=input_shapes, seed=seed, tolerances=tolerances,
            max_tensor_bytes=max_tensor_bytes, timeout=timeout,
        )
    except CannotVerify as e:
        return Verification("unverified", str(e))
    if chosen not in (None, CPU) or provider_options:
        ref.provider, ref.provider_options = chosen or CPU, dict(provider_options or {})
    return ref.check(candidate)
