"""Human-readable sizes, shared by every renderer and the command line.

``human_bytes`` is the one byte-size formatter of gcomp: binary units, no decimals for
bytes and one decimal above; the HTML pages ask for an en dash for a missing value and
TiB as the largest unit, the terminal and Markdown for a hyphen and GiB.
"""

from __future__ import annotations

__all__ = ["human_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float | None, *, missing: str = "-", largest: str = "GiB") -> str:
    """``n`` bytes as e.g. ``"12.3 MiB"``; ``missing`` when ``n`` is None; no unit above
    ``largest`` (``"GiB"`` or ``"TiB"``)."""
    if n is None:
        return missing
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == largest:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
