"""Comparing a candidate's outputs with the reference's, element by element, per dtype.

Every output is compared with explicit tolerances by dtype (:data:`TOLERANCES`):

    |actual - expected| <= atol * scale + rtol * |expected|      element-wise,

where ``scale`` is the output's root-mean-square magnitude, at least 1 (see the
:mod:`gcomp.verify` docstring for why). NaN must sit where NaN sat, infinities must match
exactly, integers, bools and strings must be equal, and shapes and dtypes must match;
sequence outputs are compared element by element, maps (dicts) key by key.
"""

from __future__ import annotations

__all__ = ["EXACT", "TOLERANCES", "OutputCheck", "Tolerance", "compare_outputs"]

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


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
    # Signal measures of a reduced-precision candidate's float output (gcomp.verify.precision):
    cosine: float | None = None  # cos(a, e); None: not measured, or undefined (fp32 all zeros or constant)
    rel_l2: float | None = None  # ||a - e|| / ||e||; None: not measured, or fp32 all zeros
    flushed: int | None = None  # elements non-zero in fp32, zero in the candidate
    subnormal: int | None = None  # elements non-zero in fp32, subnormal in the candidate's precision


def compare_outputs(
    expected: Mapping[str, Any], actual: Mapping[str, Any], tolerances: Mapping[str, Tolerance]
) -> list[OutputCheck]:
    """One check per output of either side: missing or extra outputs fail."""
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
    if isinstance(exp, list) or isinstance(act, list):
        return _compare_sequences(name, exp, act, tolerances)
    if isinstance(exp, dict) or isinstance(act, dict):
        return _compare_maps(name, exp, act, tolerances)
    e = np.asarray(exp)
    a = np.asarray(act)
    dtype = str(e.dtype)
    if e.dtype != a.dtype:
        return OutputCheck(name, dtype, list(e.shape), False, detail=f"dtype {a.dtype} != {e.dtype}")
    if e.shape != a.shape:
        return OutputCheck(name, dtype, list(e.shape), False, detail=f"shape {list(a.shape)} != {list(e.shape)}")
    if e.dtype.kind not in "fc" and dtype != "bfloat16":
        return _compare_exact(name, e, a)
    return _compare_floats(name, e, a, tolerances.get(dtype, tolerances.get("float32")))


def _compare_sequences(name: str, exp: Any, act: Any, tolerances: Mapping[str, Tolerance]) -> OutputCheck:
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


def _compare_maps(name: str, exp: Any, act: Any, tolerances: Mapping[str, Tolerance]) -> OutputCheck:
    """Maps (ONNX Runtime returns dicts, e.g. ZipMap's): the same keys, values compared as
    one array. ORT hands float map values over as Python floats, though ZipMap's are
    float32: float values get the float32 tolerance."""
    if not (isinstance(exp, dict) and isinstance(act, dict)) or set(exp) != set(act):
        return OutputCheck(name, "map", [], False, detail="map keys or kind differ")
    keys = list(exp)
    e, a = np.asarray([exp[k] for k in keys]), np.asarray([act[k] for k in keys])
    if e.dtype.kind == "f" and e.dtype == a.dtype:
        check = _compare_floats(name, e, a, tolerances.get("float32", tolerances.get(str(e.dtype))))
    else:
        check = _compare(name, e, a, tolerances)
    check.dtype = "map"
    return check


def _compare_exact(name: str, e: np.ndarray, a: np.ndarray) -> OutputCheck:
    """Integers, bools and strings: equal or not."""
    diff = e != a
    n = int(np.count_nonzero(diff))
    err = 0.0
    if n and e.dtype.kind in "iub":
        err = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64))))
    detail = f"{n} element(s) differ (exact compare)" if n else ""
    return OutputCheck(name, str(e.dtype), list(e.shape), n == 0, err, 0.0, n, detail)


def _compare_floats(name: str, e: np.ndarray, a: np.ndarray, tol: Tolerance) -> OutputCheck:
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
        name, str(e.dtype), list(e.shape), n == 0, max_abs, max_rel, n, detail,
        int(np.count_nonzero(nan_a)), int(np.count_nonzero(inf_a)),
    )


def _scale(finite: np.ndarray) -> float:
    """The output's root-mean-square magnitude, at least 1: what ``atol`` is relative to."""
    if not finite.size:
        return 1.0
    return max(1.0, float(np.sqrt(np.mean(np.square(finite)))))
