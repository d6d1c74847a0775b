"""The speed headline of an optimize report: what a before/after timing can support.

Two models timed one after the other see different machines (other processes, clock
changes, a runtime's threads still spinning), so the before/after figure comes from one
process timing both models in alternating blocks (:func:`gcomp.runtime.time_interleaved`).
Each pair of blocks gives one ratio, median time before / median time after; the
headline follows one rule, stated in every report and in the README:

- the **speed-up** is the median of the per-block ratios; its **spread** is their
  10th-90th percentile range (linear interpolation between blocks);
- when that range includes 1.0, the headline is *no measurable difference (within ±x %)*,
  x being the range's farthest end from 1.0; otherwise it is *N.NNx faster* or
  *N.NNx slower* (the slower figure is after / before, so 0.80x reads "1.25x slower").

The minimum and median latencies of both models are reported beside it. Nothing here
measures: :func:`speed_summary` turns timings into the figures, :func:`headline` words
them, so the wording is tested on fabricated timings.
"""

from __future__ import annotations

__all__ = ["RULE", "detail", "headline", "speed_summary", "within_percent"]

import statistics
from collections.abc import Sequence
from typing import Any

RULE = ("both models timed in one process in alternating blocks; speed-up = median of the per-block "
        "ratios (median before / median after), spread = their p10-p90; when the spread includes 1.0 "
        "the report says no measurable difference")


def speed_summary(before_ms: Sequence[float], after_ms: Sequence[float], block_ratios: Sequence[float],
                  *, block: int, backend: str = "ort/cpu") -> dict[str, Any]:
    """The figures of an interleaved timing: per-model min and median (ms), the per-block
    ratios, their median and p10-p90, and the verdict of the rule above."""
    if not before_ms or not after_ms or not block_ratios:
        raise ValueError("no timings")
    ratios = sorted(float(r) for r in block_ratios)
    p10, p90 = _percentiles(ratios)
    speed = {
        "method": "interleaved", "rule": RULE, "backend": backend,
        "blocks": len(ratios), "runs_per_block": block, "runs": len(before_ms),
        "before_ms_min": min(before_ms), "after_ms_min": min(after_ms),
        "before_ms_median": statistics.median(before_ms), "after_ms_median": statistics.median(after_ms),
        "speedup_median": statistics.median(ratios), "speedup_p10": p10, "speedup_p90": p90,
        "speedup_min_ratio": min(before_ms) / min(after_ms),
        "block_ratios": ratios,
    }
    speed["verdict"] = _verdict(p10, p90)
    speed["headline"] = headline(speed)
    return speed


def _percentiles(ordered: list[float]) -> tuple[float, float]:
    """10th and 90th percentiles with linear interpolation (one value: itself twice)."""
    if len(ordered) == 1:
        return ordered[0], ordered[0]
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def _verdict(p10: float, p90: float) -> str:
    if p10 <= 1.0 <= p90:
        return "no measurable difference"
    return "faster" if p10 > 1.0 else "slower"


def within_percent(speed: dict[str, Any]) -> float:
    """How far from 1.0 the spread reaches, in percent (the ±x of "within ±x %")."""
    return max(1.0 - speed["speedup_p10"], speed["speedup_p90"] - 1.0, 0.0) * 100


def headline(speed: dict[str, Any]) -> str:
    """One line a reader can trust, e.g. ``1.42x faster (p10-p90 1.35-1.50x)`` or
    ``no measurable difference (within ±4.1 %)``; the verdict is recomputed from the
    figures, so a document written by an older gcomp is worded by today's rule."""
    p10, p90, median = speed["speedup_p10"], speed["speedup_p90"], speed["speedup_median"]
    verdict = _verdict(p10, p90)
    if verdict == "no measurable difference":
        return f"no measurable difference (within ±{within_percent(speed):.1f} %)"
    spread = f"p10-p90 {p10:.2f}-{p90:.2f}x"
    if verdict == "faster":
        return f"{median:.2f}x faster ({spread})"
    return f"{1 / median:.2f}x slower ({median:.2f}x; {spread})"


def detail(speed: dict[str, Any]) -> str:
    """The figures behind the headline: medians, minimums and how they were timed."""
    return (f"median {speed['before_ms_median']:.3f} → {speed['after_ms_median']:.3f} ms, "
            f"min {speed['before_ms_min']:.3f} → {speed['after_ms_min']:.3f} ms; "
            f"{speed['blocks']} alternating blocks of {speed['runs_per_block']} runs each on {speed['backend']}")
