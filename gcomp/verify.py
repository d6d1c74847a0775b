"""Numerical verification: the original and the transformed model, same inputs, same runtime.

The reference runtime is ONNX Runtime on the CPU with its own graph optimizations off,
so what is compared is gcomp's transformation, not ORT's. Every output is compared
with explicit tolerances by dtype (:data:`TOLERANCES`):

    |actual - expected| <= atol * scale + rtol * |expected|      element-wise,

where ``scale`` is the output's root-mean-square magnitude, at least 1. Reordered
floating-point sums err in proportion to the size of their terms, not of their result:
an element near zero in an output whose typical value is 27 (ResNet-18's logits) carries
the rounding of terms of that size (6e-5 there between two correct runtimes, 2e-6 of the
scale). For outputs of order one, the check is the plain ``atol + rtol * |expected|``.

NaN must sit where NaN sat, infinities must match exactly, integers, bools and strings
must be equal, and shapes and dtypes must match. A model that cannot run on the
inputs (no ORT kernel for an op, inputs gcomp cannot guess) is *unverified*, never
*passed*: the reason says why and what to do.
"""

from __future__ import annotations

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "OutputCheck",
    "Verification",
    "Reference",
    "CannotVerify",
    "verify",
    "compare_outputs",
]

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import inputs as _inputs
from gcomp import io
from gcomp.errors import BackendError


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# Chosen for passes that reorder floating-point work (folding, fusion): a handful of
# ulps of accumulated rounding on values of order one, never "rtol=1" equality.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=2e-2, atol=1e-2),
}
EXACT = Tolerance(rtol=0.0, atol=0.0)


@dataclass
class OutputCheck:
    name: str
    dtype: str
    shape: list[int]
    ok: bool
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mismatched: int = 0
    detail: str = ""
    nan: int = 0  # NaN elements in the transformed model's output
    inf: int = 0  # infinite elements in the transformed model's output


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


# Verification refuses to run a model that would allocate a tensor larger than this.
DEFAULT_MAX_TENSOR_BYTES = 4 << 30
# A reference run still going after this many seconds is stopped (an endless Loop).
DEFAULT_RUN_TIMEOUT = 300.0


def _huge_tensor(model: ir.Model, limit: int) -> str | None:
    """A node whose output size follows from constants alone and exceeds ``limit``.

    Lower bounds from the constant inputs of the ops that make big tensors from small
    ones (a 16-byte shape can ask for terabytes): gcomp never asks ORT to try.
    """
    from gcomp.passes.fold import constant_lookup

    const = constant_lookup(model)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        op = node.op_type

        def value(i):
            v = node.inputs[i] if i < len(node.inputs) else None
            return None if v is None else const(v)

        elements = None
        if op in ("ConstantOfShape", "Expand"):
            shape = value(0 if op == "ConstantOfShape" else 1)
            if shape is not None and shape.size and shape.dtype.kind in "iu":
                elements = int(np.prod(np.maximum(shape.astype(np.float64), 0)))
        elif op == "Tile":
            reps = value(1)
            if reps is not None and reps.dtype.kind in "iu":
                elements = int(np.prod(np.maximum(reps.astype(np.float64), 0)))
        elif op == "Range":
            start, limit_, delta = value(0), value(1), value(2)
            if start is not None and limit_ is not None and delta is not None and float(delta) != 0:
                elements = max(0, int(np.ceil((float(limit_) - float(start)) / float(delta))))
        elif op == "Loop":
            reason = _unbounded_loop(node, value, const)
            if reason:
                return f"node '{node.name or op}' (Loop) {reason}"
        if elements is not None and elements > limit:
            return (
                f"node '{node.name or op}' ({op}) would make a tensor of at least {elements:,} elements, "
                f"over the {limit:,} byte limit for verification (--max-tensor-bytes)"
            )
    return None


# A Loop running more times than this is not run for verification (it would hang).
MAX_LOOP_TRIPS = 10_000_000


def _unbounded_loop(node: ir.Node, value, const) -> str | None:
    trips = value(0)
    if trips is not None and trips.size == 1 and int(trips.reshape(-1)[0]) > MAX_LOOP_TRIPS:
        return f"runs up to {int(trips.reshape(-1)[0]):,} times, more than verification runs ({MAX_LOOP_TRIPS:,})"
    if node.inputs[0] is not None:
        return None
    body = node.attributes.get("body")
    if body is None:
        return None
    graph = body.as_graph()
    carried = len(node.inputs) - 2
    if len(graph.outputs) > 1 + carried:
        # No trip count and stacked scan outputs: memory grows for as long as it runs, and
        # ONNX Runtime aborts the whole process (not an exception) when its arena fails.
        return "has no trip count and stacks scan outputs: its memory is unbounded"
    cond = value(1) if len(node.inputs) > 1 else None
    if cond is None or not bool(np.asarray(cond).all()):
        return None
    if len(graph.inputs) < 2 or not graph.outputs:
        return None
    cond_out = graph.outputs[0]
    producer = cond_out.producer()
    passes_through = cond_out is graph.inputs[1] or (
        producer is not None and producer.op_type == "Identity" and producer.inputs[0] is graph.inputs[1]
    )
    stays_true = const(cond_out)
    always = passes_through or (stays_true is not None and bool(np.asarray(stays_true).all()))
    return "has no trip count and a condition that stays true: it never ends" if always else None


class CannotVerify(Exception):
    """The original model cannot be run on these inputs; carries the reason."""


def _reference_runtime(model: ir.Model | str | Path):
    from gcomp.backends.ort import OrtBackend

    return OrtBackend().compile(model, "cpu", optimization="disable")


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
        too_big = _huge_tensor(model, max_tensor_bytes)
        if too_big:
            raise CannotVerify(too_big)
        try:
            feeds, notes = _inputs.generate_inputs(
                model, shapes=dict(input_shapes or {}), given=given, seed=seed, max_bytes=max_tensor_bytes
            )
        except _inputs.InputsTooLarge as e:
            raise CannotVerify(f"{e} (--max-tensor-bytes; or smaller --input-shape)") from None
        except _inputs.CannotGenerate as e:
            raise CannotVerify(str(e)) from None
        try:
            runner = _reference_runtime(original)
        except BackendError as e:
            raise CannotVerify(f"the original model does not load in ONNX Runtime: {_strip(e)}") from None
        try:
            outputs = runner.run(feeds, timeout=timeout)
        except BackendError as e:
            if "stopped after" in str(e):
                hint = " (--verify-timeout)"
            else:
                hint = "" if inputs is not None else " (pass real inputs with --inputs or shapes with --input-shape)"
            raise CannotVerify(
                f"the original model does not run on the {'given' if inputs is not None else 'generated'} inputs: {_strip(e)}{hint}"
            ) from None
        reference = cls(feeds, outputs, notes, tolerances)
        reference.timeout = timeout
        from gcomp.passes.precision.emulate import reduced_precision

        reference.original_precision = reduced_precision(model)
        return reference

    def check(self, candidate: ir.Model | str | Path) -> Verification:
        """Run ``candidate`` on the reference inputs and compare every output."""
        info = {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in self.feeds.items()}
        try:
            # A reduced-precision (fp16/bf16) candidate of a full-precision original runs in
            # emulation with its own tolerances: ORT on the CPU upcasts and would hide
            # overflow (gcomp.passes.precision).
            from gcomp.passes.precision.check import emulated_outputs

            emulated = None
            if self.original_precision is None:
                emulated = emulated_outputs(candidate, self.feeds, self.outputs, self.explicit_tolerances, self.timeout)
            if emulated is not None:
                actual, tolerances, note = emulated
            else:
                runner = _reference_runtime(candidate)
                actual = runner.run(self.feeds, timeout=self.timeout)
                tolerances, note = self.tolerances, None
        except BackendError as e:
            return Verification("failed", f"the transformed model does not run: {_strip(e)}", inputs=info, notes=list(self.notes))
        checks = compare_outputs(self.outputs, actual, tolerances)
        notes = list(self.notes) + ([note] if note else [])
        bad = [c for c in checks if not c.ok]
        if bad:
            reason = "; ".join(f"output '{c.name}': {c.detail}" for c in bad[:3])
            return Verification("failed", reason, checks, info, notes)
        return Verification("passed", "", checks, info, notes)


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
) -> Verification:
    """Compare two models on the same inputs; never raises for a model that cannot run."""
    try:
        ref = Reference.build(
            original, inputs=inputs, input_shapes=input_shapes, seed=seed, tolerances=tolerances,
            max_tensor_bytes=max_tensor_bytes, timeout=timeout,
        )
    except CannotVerify as e:
        return Verification("unverified", str(e))
    return ref.check(candidate)


def compare_outputs(
    expected: Mapping[str, Any], actual: Mapping[str, Any], tolerances: Mapping[str, Tolerance]
) -> list[OutputCheck]:
    checks = []
    for name, exp in expected.items():
        if name not in actual:
            checks.append(OutputCheck(name, "?", [], False, detail="missing from the transformed model"))
            continue
        checks.append(_compare(name, exp, actual[name], tolerances))
    for name in actual:
        if name not in expected:
            checks.append(OutputCheck(name, "?", [], False, detail="not an output of the original model"))
    return checks


def _compare(name: str, exp: Any, act: Any, tolerances: Mapping[str, Tolerance]) -> OutputCheck:
    if isinstance(exp, list) or isinstance(act, list):  # sequence outputs
        if not (isinstance(exp, list) and isinstance(act, list)) or len(exp) != len(act):
            return OutputCheck(name, "sequence", [], False, detail="sequence length or kind differs")
        parts = [_compare(f"{name}[{i}]", e, a, tolerances) for i, e in enumerate(exp) for a in [act[i]]]
        bad = [p for p in parts if not p.ok]
        return OutputCheck(
            name, "sequence", [len(exp)], not bad,
            max((p.max_abs_error for p in parts), default=0.0),
            max((p.max_rel_error for p in parts), default=0.0),
            sum(p.mismatched for p in parts), bad[0].detail if bad else "",
        )
    e = np.asarray(exp)
    a = np.asarray(act)
    dtype = str(e.dtype)
    if e.dtype != a.dtype:
        return OutputCheck(name, dtype, list(e.shape), False, detail=f"dtype {a.dtype} != {e.dtype}")
    if e.shape != a.shape:
        return OutputCheck(name, dtype, list(e.shape), False, detail=f"shape {list(a.shape)} != {list(e.shape)}")
    if e.dtype.kind not in "fc" and dtype != "bfloat16":
        diff = e != a
        n = int(np.count_nonzero(diff))
        err = 0.0
        if n and e.dtype.kind in "iub":
            err = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64))))
        return OutputCheck(name, dtype, list(e.shape), n == 0, err, 0.0, n, f"{n} element(s) differ (exact compare)" if n else "")
    tol = tolerances.get(dtype, tolerances.get("float32"))
    e64 = e.astype(np.float64)
    a64 = a.astype(np.float64)
    nan_e, nan_a = np.isnan(e64), np.isnan(a64)
    inf_e, inf_a = np.isinf(e64), np.isinf(a64)
    bad = (nan_e != nan_a) | ((inf_e | inf_a) & ~(nan_e | nan_a) & (e64 != a64))
    finite = np.isfinite(e64) & np.isfinite(a64)
    absdiff = np.abs(np.where(finite, a64, 0.0) - np.where(finite, e64, 0.0))
    scale = _scale(e64[np.isfinite(e64)])
    bad |= absdiff > tol.atol * scale + tol.rtol * np.abs(np.where(finite, e64, 0.0))
    rel = absdiff / np.maximum(np.abs(np.where(finite, e64, 0.0)), np.finfo(np.float64).tiny)
    rel = np.where(absdiff > 0, rel, 0.0)
    n = int(np.count_nonzero(bad))
    max_abs = float(absdiff.max()) if absdiff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    detail = ""
    if n:
        scaled = f" x {scale:.3g} (the output's rms)" if scale > 1.0 else ""
        detail = (
            f"{n} of {e.size} element(s) beyond rtol={tol.rtol:g}, atol={tol.atol:g}{scaled} "
            f"(max abs error {max_abs:.3g}, max rel error {max_rel:.3g})"
        )
    return OutputCheck(
        name, dtype, list(e.shape), n == 0, max_abs, max_rel, n, detail,
        int(np.count_nonzero(nan_a)), int(np.count_nonzero(inf_a)),
    )


def _scale(finite: np.ndarray) -> float:
    """The output's root-mean-square magnitude, at least 1: what ``atol`` is relative to."""
    if not finite.size:
        return 1.0
    return max(1.0, float(np.sqrt(np.mean(np.square(finite)))))


def _strip(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
