"""How far a reduced-precision run is from the fp32 original: the ``auto`` search's measure.

:func:`compare` reports, per float output, the largest absolute and relative error
against the fp32 reference, the error scaled by the output's peak magnitude
(``max |a - e| / max(1, max |e|)``, what ``--tolerance`` bounds) and the NaN/Inf counts of
both sides. Pure numpy: the runs themselves come from the pipeline's runtime.
"""

from __future__ import annotations

__all__ = ["OutputError", "compare"]

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class OutputError:
    """One output compared with its fp32 reference."""

    name: str
    max_abs_error: float
    max_rel_error: float
    scaled_error: float  # max |a - e| / max(1, max |e|): the auto search's measure
    nan: int
    inf: int
    reference_nan: int
    reference_inf: int

    @property
    def new_nonfinite(self) -> bool:
        return self.nan > self.reference_nan or self.inf > self.reference_inf


def compare(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[OutputError]:
    """Errors of ``actual`` against ``expected`` per float output (other outputs skipped)."""
    rows = []
    for name, e in expected.items():
        e = np.asarray(e)
        if name not in actual or e.dtype.kind != "f" and str(e.dtype) != "bfloat16":
            continue
        e64 = e.astype(np.float64)
        a64 = np.asarray(actual[name]).astype(np.float64)
        finite = np.isfinite(e64) & np.isfinite(a64)
        diff = np.abs(np.where(finite, a64 - e64, 0.0))
        scale = np.abs(np.where(finite, e64, 0.0))
        rel = np.where(diff > 0, diff / np.maximum(scale, np.finfo(np.float64).tiny), 0.0)
        peak = float(scale.max()) if scale.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        rows.append(OutputError(
            name, max_abs, float(rel.max()) if rel.size else 0.0, max_abs / max(1.0, peak),
            int(np.isnan(a64).sum()), int(np.isinf(a64).sum()),
            int(np.isnan(e64).sum()), int(np.isinf(e64).sum()),
        ))
    return rows
