"""How every renderer words the roofline: a kernel's share of its roof, the model's share of
the peak, and where the roofs came from.

A measured rate above the roof is not an efficiency above 100 %: either the roof was
calibrated too low (a busy machine during calibration) or the kernel's time is below what
the runtime's timer resolves. It is written as a calibration error with the measured
figure, the same way in the terminal, Markdown and HTML. Documents written before gcomp
flagged such kernels (``roof_efficiency`` above 1, no ``above_roof``) are read the same way.
"""

from __future__ import annotations

__all__ = ["above_roof", "kernel_roof_text", "peak_share_text", "roof_origin"]

from typing import Any


def above_roof(op: dict[str, Any]) -> bool:
    """Whether a kernel row measured above its roof (flagged, or an old document's share > 1)."""
    return bool(op.get("above_roof")) or (op.get("roof_efficiency") or 0) > 1.0


def kernel_roof_text(op: dict[str, Any], *, missing: str = "-") -> str:
    """``"83%"`` of the roof, or ``"calibration error (425 GFLOP/s measured > 357 roof)"``."""
    if above_roof(op):
        roof = op.get("attainable_gflops_per_s")
        measured = op.get("gflops_per_s")
        figures = f"{_rate(measured)} GFLOP/s measured" if measured is not None else "measured"
        return f"calibration error ({figures}" + (f" > {_rate(roof)} roof)" if roof else " above the roof)")
    share = op.get("roof_efficiency")
    return f"{share * 100:.0f}%" if share is not None else missing


def peak_share_text(achieved: float | None, roof: dict[str, Any]) -> str:
    """The whole model's GFLOP/s against the compute peak: ``"34% of the 357 GFLOP/s
    measured peak"``, or a calibration error when above it; empty when unknown."""
    peak = roof.get("peak_gflops")
    if not achieved or not peak:
        return ""
    source = roof.get("peak_source") or "measured"
    if achieved > peak:
        return f"calibration error: {achieved:.0f} GFLOP/s achieved > the {peak:.0f} GFLOP/s {source} peak"
    return f"{achieved / peak * 100:.0f}% of the {peak:.0f} GFLOP/s {source} peak"


def roof_origin(roof: dict[str, Any]) -> str:
    """One sentence saying how the roofs were obtained (from the machine's ``peak_method``
    and ``bandwidth_method``; older documents only say measured or theoretical)."""
    if not roof:
        return "no roofline: no machine peaks"
    peak, bandwidth = roof.get("peak_gflops"), roof.get("bandwidth_gbs")
    peak_how = roof.get("peak_method") or f"{roof.get('peak_source', 'measured')} (how: not recorded)"
    bw_how = roof.get("bandwidth_method") or "how: not recorded"
    parts = [f"compute roof {peak:.1f} GFLOP/s, {peak_how}" if peak else "compute roof unknown"]
    parts.append(f"memory roof {bandwidth:.1f} GB/s, {bw_how}" if bandwidth else "memory roof unknown")
    theoretical = roof.get("theoretical_gflops")
    if theoretical and roof.get("peak_source") == "measured":
        parts.append(f"theoretical peak {theoretical:.1f} GFLOP/s ({roof.get('vector_bits', '?')}-bit vectors x "
                     f"{roof.get('fma_units', '?')} FMA units x {roof.get('cores', '?')} cores x "
                     f"{roof.get('clock_ghz') or '?'} GHz)")
    return "; ".join(parts) + "."


def _rate(gflops: float) -> str:
    """A GFLOP/s figure: whole numbers from 100, three significant digits below."""
    return f"{gflops:.0f}" if gflops >= 100 else f"{gflops:.3g}"
