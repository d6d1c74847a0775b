"""How far a reduced-precision run is from the fp32 original: the measures and their bounds.

:func:`compare` reports, per float output, against the fp32 reference:

- the largest absolute and relative error, and the error scaled by the output's peak
  magnitude, ``max |a - e| / max(1, max |e|)`` (``max-abs``: ``auto``'s search bound);
- the direction and relative size of the error: ``cosine`` (of the flattened outputs) and
  ``rel-l2`` (``||a - e|| / ||e||``), over the elements finite on both sides. Below
  magnitude 1 the scaled error is absolute, so an output of 1e-9 flushed to zeros has an
  error of 1e-9; these two see it. ``cosine`` is undefined (None) when ``e`` is all zeros
  or constant (every element equal, a single element included: the angle says nothing
  there), ``rel-l2`` when ``e`` is all zeros: such outputs are judged by the absolute error;
- the output elements non-zero in fp32 that are zero in the candidate (``flushed``) or
  below the low type's smallest normal (``subnormal``: a few bits left), and whether the
  whole output is ``zeroed`` (all zeros where fp32 is not);
- the NaN/Inf counts of both sides.

:class:`Bounds` are the floors an output must meet (:data:`BOUNDS`: fp16 cosine >= 0.999
and rel-l2 <= 1e-2, bf16 cosine >= 0.99 and rel-l2 <= 5e-2); :meth:`OutputError.miss`
names the first measure an output misses. An output that is zeroed, or has NaN/Inf fp32
did not have, misses whatever the bounds. Non-float outputs, sequences and maps are not
measured here (the element-wise check compares them). Pure numpy: the runs themselves come from the pipeline's
runtime. :mod:`gcomp.verify.metrics` (quantization's accuracy budget) uses the same
:func:`one_minus_cos` and :func:`rel_l2`.
"""

from __future__ import annotations

__all__ = ["BOUNDS", "BOUNDS_META", "METRICS", "Bounds", "OutputError", "compare", "one_minus_cos", "rel_l2"]

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from gcomp.errors import OptionError

# The measures a --tolerance may bound for a precision check (see Bounds.with_metric).
METRICS = ("cosine", "rel-l2", "max-abs")


@dataclass(frozen=True)
class Bounds:
    """What every float output must meet: ``1 - cos <= cosine``, ``rel-l2 <= rel_l2`` and,
    when set, ``max |a - e| / max(1, max |e|) <= max_abs``."""

    cosine: float
    rel_l2: float
    max_abs: float | None = None

    def with_metric(self, metric: str, tolerance: float) -> Bounds:
        """These bounds with ``metric`` (one of :data:`METRICS`) bounded by ``tolerance``."""
        if metric not in METRICS:
            raise OptionError(f"a precision check bounds {', '.join(METRICS)}, not '{metric}'")
        if not (tolerance > 0 and math.isfinite(tolerance)):
            raise OptionError(f"tolerance must be positive and finite, got {tolerance}")
        return replace(self, **{metric.replace("-", "_"): float(tolerance)})

    def cosine_floor(self) -> str:
        """``1 - cosine`` in words: ``0.999``, or ``1 - 1e-07`` where digits would hide it."""
        return f"{1 - self.cosine:g}" if self.cosine >= 1e-4 else f"1 - {self.cosine:g}"

    def describe(self) -> str:
        text = f"cosine >= {self.cosine_floor()}, rel-l2 <= {self.rel_l2:g}"
        return text + (f", max|a-e| / max(1, max|e|) <= {self.max_abs:g}" if self.max_abs is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# On the zoo and the torch exports of bench/PRECISION.md, fp16 keeps 1 - cos under 1e-6 and
# rel-l2 under 2e-3, bf16 under 6e-5 and 1e-2: the floors leave 1000x/200x (cosine) and 5x
# (rel-l2) of room, so only a lost signal fails.
BOUNDS = {"fp16": Bounds(cosine=1e-3, rel_l2=1e-2), "bf16": Bounds(cosine=1e-2, rel_l2=5e-2)}
# Where a conversion records the Bounds it was held to: a key of the main graph's meta (in
# memory only; ir.Model.clone keeps it), read by verification.
BOUNDS_META = "gcomp.precision.bounds"


@dataclass
class OutputError:
    """One output compared with its fp32 reference."""

    name: str
    max_abs_error: float
    max_rel_error: float
    scaled_error: float  # max |a - e| / max(1, max |e|): the auto search's max-abs
    nan: int
    inf: int
    reference_nan: int
    reference_inf: int
    cosine: float | None = None  # cos(a, e); None where undefined (see the module docstring)
    rel_l2: float | None = None  # ||a - e|| / ||e||; None where ||e|| == 0
    flushed: int = 0  # elements non-zero in fp32, zero here
    subnormal: int = 0  # elements non-zero in fp32, below the low type's smallest normal here
    zeroed: bool = False  # all zeros where fp32 is not
    size: int = 0

    @property
    def new_nonfinite(self) -> bool:
        return self.nan > self.reference_nan or self.inf > self.reference_inf

    def miss(self, bounds: Bounds, low: str = "the lower precision") -> str | None:
        """The first measure this output misses under ``bounds``, in words; None if none."""
        if self.new_nonfinite:
            return f"{self.nan + self.inf} NaN/Inf where fp32 has {self.reference_nan + self.reference_inf}"
        if self.zeroed:
            return f"all {self.size} element(s) are zero in {low} where fp32 is not ({self.flushed} flushed to zero)"
        if self.cosine is not None and 1.0 - self.cosine > bounds.cosine:
            return f"cosine {self.cosine:.7g} < {bounds.cosine_floor()}{self._lost()}"
        if self.rel_l2 is not None and self.rel_l2 > bounds.rel_l2:
            return f"rel-l2 {self.rel_l2:.3g} > {bounds.rel_l2:g}{self._lost()}"
        if bounds.max_abs is not None and self.scaled_error > bounds.max_abs:
            return f"max|a-e| / max(1, max|e|) {self.scaled_error:.3g} > {bounds.max_abs:g}"
        return None

    def _lost(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.flushed, "flushed to zero"), (self.subnormal, "subnormal")) if n]
        return f" ({', '.join(parts)} of {self.size})" if parts else ""


def compare(expected: Mapping[str, Any], actual: Mapping[str, Any], low: str | None = None) -> list[OutputError]:
    """Errors of ``actual`` against ``expected`` per float output (other outputs skipped);
    ``low`` (``"fp16"``/``"bf16"``) is the precision whose subnormals are counted."""
    rows = []
    for name, e in expected.items():
        if name not in actual or not all(isinstance(x, (np.ndarray, np.generic)) for x in (e, actual[name])):
            continue  # sequences and maps: the element-wise check compares them
        e = np.asarray(e)
        if e.dtype.kind != "f" and str(e.dtype) != "bfloat16":
            continue
        e64 = e.astype(np.float64)
        a64 = np.asarray(actual[name]).astype(np.float64)
        if a64.shape != e64.shape:
            continue  # a shape mismatch is the element-wise check's to report
        finite = np.isfinite(e64) & np.isfinite(a64)
        diff = np.abs(np.where(finite, a64 - e64, 0.0))
        scale = np.abs(np.where(finite, e64, 0.0))
        rel = np.where(diff > 0, diff / np.maximum(scale, np.finfo(np.float64).tiny), 0.0)
        peak = float(scale.max()) if scale.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        row = OutputError(
            name, max_abs, float(rel.max()) if rel.size else 0.0, max_abs / max(1.0, peak),
            int(np.isnan(a64).sum()), int(np.isinf(a64).sum()),
            int(np.isnan(e64).sum()), int(np.isinf(e64).sum()), size=int(e64.size),
        )
        _signal(row, e64[finite], a64[finite], low)
        rows.append(row)
    return rows


def _signal(row: OutputError, e: np.ndarray, a: np.ndarray, low: str | None) -> None:
    """Direction, relative size and lost elements of ``a`` against ``e`` (finite on both sides)."""
    nonzero = e != 0
    row.flushed = int(np.count_nonzero(nonzero & (a == 0)))
    row.subnormal = _subnormal(a[nonzero], low)
    row.zeroed = bool(nonzero.any() and not np.any(a != 0))
    if not nonzero.any():
        return  # cosine and rel-l2 undefined: the absolute error judges
    row.rel_l2 = rel_l2(e, a)
    if e.size > 1 and np.any(e != e[0]):
        row.cosine = 1.0 - one_minus_cos(e, a)


def _subnormal(a: np.ndarray, low: str | None) -> int:
    """Elements of ``a`` that are subnormals of ``low``: non-zero, below its smallest normal,
    and held exactly by it (an output kept in fp32 has values fp16 cannot hold, not subnormals)."""
    if low not in ("fp16", "bf16") or not a.size:
        return 0
    if low == "fp16":
        dtype, tiny = np.float16, float(np.finfo(np.float16).tiny)
    else:
        import ml_dtypes

        dtype, tiny = ml_dtypes.bfloat16, float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny)
    small = a[(a != 0) & (np.abs(a) < tiny)]
    return int(np.count_nonzero(small.astype(dtype).astype(np.float64) == small))


def one_minus_cos(e: np.ndarray, a: np.ndarray) -> float:
    """``1 - cos(a, e)`` of the flattened arrays over the elements finite on both sides:
    0 when both are zero, 1 when only one is."""
    x = e.astype(np.float64).ravel()
    y = a.astype(np.float64).ravel()
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 and ny == 0:
        return 0.0
    if nx == 0 or ny == 0:
        return 1.0
    return float(max(0.0, 1.0 - np.dot(x, y) / (nx * ny)))


def rel_l2(e: np.ndarray, a: np.ndarray) -> float:
    """``||a - e|| / ||e||`` (``||a - e||`` when ``e`` is all zeros)."""
    x = e.astype(np.float64)
    diff = np.linalg.norm(a.astype(np.float64) - x)
    norm = np.linalg.norm(x)
    return float(diff / norm) if norm else float(diff)
