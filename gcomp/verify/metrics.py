"""Error measures that catch lost signal, for lossy transformations (quantization).

Per float output, over a list of samples (one feed dict each), the candidate's outputs
``a`` against the float model's ``e``:

- ``cosine``: ``1 - cos(a, e)`` of the flattened outputs, the worst sample: a quantized
  model that keeps the direction of every output vector keeps its meaning;
- ``rel-l2``: ``||a - e|| / ||e||``, the worst sample;
- ``top1``: the fraction of rows (every index of the leading axes; the last axis holds
  the classes) whose argmax differs, over all samples;
- ``max-abs``: ``max |a - e|``, over all samples (the plain check's measure);
- ``tokens`` (decoder LLMs): ``top1`` over the outputs that score tokens, with the float
  model's margin (top-1 minus top-2 score) at the positions whose token changed. A KV
  cache's outputs (``present*``, ``*cache*``, ``past*``) are measured and reported but not
  bounded: their error reaches the tokens at the positions after them, which the token
  outputs of a teacher-forced sequence (calibration samples that feed the reference
  tokens) already count. ``--tolerance 0`` demands every token equal.

A :class:`Budget` bounds one of them: ``error(metric) <= tolerance`` for every output.
``cosine`` with tolerance 0.01 (cosine >= 0.99) is the default for quantization.
Non-float outputs (indices, masks) must be equal; a NaN or infinity the float model did
not have counts as an infinite error. A sequence of maps (ZipMap's) is measured as the
array of its values, one row per map. Cosine and rel-l2 are computed by
:mod:`gcomp.passes.precision.accuracy`, which the fp16/bf16 checks share.
"""

from __future__ import annotations

__all__ = ["COUNTING", "METRICS", "Budget", "OutputError", "measure"]

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import math
import re

import numpy as np

from gcomp.errors import OptionError
from gcomp.passes.precision.accuracy import one_minus_cos, rel_l2

METRICS = ("cosine", "rel-l2", "top1", "max-abs", "tokens")
COUNTING = frozenset({"top1", "tokens"})  # shares of changed argmaxes: 0 (none may change) is a bound
_CACHE = re.compile(r"present|past|cache", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    metric: str = "cosine"
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise OptionError(f"unknown metric '{self.metric}' (metrics: {', '.join(METRICS)})")
        low_ok = self.tolerance >= 0 if self.metric in COUNTING else self.tolerance > 0
        if not (low_ok and math.isfinite(self.tolerance)):
            kind = "non-negative" if self.metric in COUNTING else "positive"
            raise OptionError(f"tolerance must be {kind} and finite for --metric {self.metric}, got {self.tolerance}")

    def describe(self) -> str:
        if self.metric == "cosine":
            return f"cosine >= {1 - self.tolerance:g}"
        return f"{self.metric} <= {self.tolerance:g}"


@dataclass
class OutputError:
    name: str
    error: float  # under the budget's metric
    within: bool
    cosine: float | None = None  # the plain cosine similarity (worst sample), for reports
    bounded: bool = True  # False: reported only (a decoder's KV cache under ``tokens``)
    margin: float | None = None  # ``tokens``: the float model's largest top-1 - top-2 margin where a token changed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "error": self.error, "within": self.within, "cosine": self.cosine,
                "bounded": self.bounded, "margin": self.margin}


def measure(
    expected: Sequence[Mapping[str, Any]], actual: Sequence[Mapping[str, Any]], budget: Budget
) -> list[OutputError]:
    """One :class:`OutputError` per output of the expected samples."""
    rows = []
    for name in expected[0]:
        pairs = [(_array(e[name]), _array(a[name])) for e, a in zip(expected, actual)]
        error = _error(pairs, budget.metric)
        cosine = None
        if all(e.dtype.kind == "f" for e, _ in pairs):
            cosine = 1.0 - max(one_minus_cos(e, a) for e, a in pairs)
        if budget.metric == "tokens" and _CACHE.search(name) and len(expected[0]) > 1:
            rows.append(OutputError(name, error, True, cosine, bounded=False))
            continue
        margin = _flip_margin(pairs) if budget.metric == "tokens" else None
        rows.append(OutputError(name, error, bool(error <= budget.tolerance), cosine, margin=margin))
    return rows


def _flip_margin(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float | None:
    """The float model's largest top-1 minus top-2 score over the positions whose argmax
    changed (a flip between near-equal scores is benign; a large margin is lost signal)."""
    worst = None
    for e, a in pairs:
        if e.dtype.kind != "f" or e.ndim == 0 or e.shape[-1] < 2 or e.shape != a.shape:
            continue
        rows_e, rows_a = e.reshape(-1, e.shape[-1]), a.reshape(-1, a.shape[-1])
        changed = rows_e.argmax(-1) != rows_a.argmax(-1)
        if changed.any():
            top2 = np.sort(rows_e[changed].astype(np.float64), axis=-1)[:, -2:]
            m = float(np.max(top2[:, 1] - top2[:, 0]))
            worst = m if worst is None else max(worst, m)
    return worst


def _array(value: Any) -> np.ndarray:
    """An output as one array: a sequence of maps (ZipMap's probabilities, which ONNX
    Runtime returns as a list of dicts) as one row of values per map, in key order."""
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        keys = sorted(value[0])
        return np.asarray([[row.get(k) for k in keys] for row in value])
    return np.asarray(value)


def _error(pairs: list[tuple[np.ndarray, np.ndarray]], metric: str) -> float:
    if any(e.shape != a.shape for e, a in pairs):
        return float("inf")
    if not all(e.dtype.kind == "f" for e, _ in pairs):
        return 0.0 if all(np.array_equal(e, a) for e, a in pairs) else float("inf")
    if any(_new_nonfinite(e, a) for e, a in pairs):
        return float("inf")
    if metric == "cosine":
        return max(one_minus_cos(e, a) for e, a in pairs)
    if metric == "rel-l2":
        return max(rel_l2(e, a) for e, a in pairs)
    if metric in ("top1", "tokens"):
        differ = total = 0
        for e, a in pairs:
            if e.size == 0:
                continue
            rows_e = e.reshape(-1, e.shape[-1]) if e.ndim else e.reshape(1, 1)
            rows_a = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
            differ += int((rows_e.argmax(-1) != rows_a.argmax(-1)).sum())
            total += rows_e.shape[0]
        return differ / max(total, 1)
    return max(float(np.max(np.abs(a.astype(np.float64) - e))) if e.size else 0.0 for e, a in pairs)


def _new_nonfinite(e: np.ndarray, a: np.ndarray) -> bool:
    return bool(np.any(~np.isfinite(a) & np.isfinite(e)))
