"""Human-readable sizes, shared by every renderer and the command line.

``human_bytes`` is the one byte-size formatter of gcomp: binary units, no decimals for
bytes and one decimal above; the HTML pages ask for an en dash for a missing value and
TiB as the largest unit, the terminal and Markdown for a hyphen and GiB. ``bytes_change``
is the one way a size change is written: signed bytes and percent of the size before,
so a change too small to show in ``2.3 MiB -> 2.3 MiB`` is still visible. ``file_size``
is what a model takes on disk, external data included. ``model_memory_words`` says what a
profile's model memory estimate is made of, apart from the process's peak RSS.
``signal_cells`` writes a reduced-precision output's signal measures (cosine, rel-l2,
elements flushed to zero / left subnormal) for the verification tables.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SIGNAL_HEADER", "bytes_change", "file_size", "human_bytes", "model_memory_words", "signal_cells",
           "signal_measured"]

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


def bytes_change(before: float | None, after: float | None, *, missing: str = "-") -> str:
    """The change from ``before`` to ``after`` bytes, e.g. ``"-1.2 KiB (-0.05 %)"``;
    ``"+24 B (<0.001 %)"`` (three decimals under 0.01 %, ``<0.001`` below that);
    ``"no change"``; ``missing`` when either size is unknown."""
    if before is None or after is None:
        return missing
    delta = float(after) - float(before)
    if delta == 0:
        return "no change"
    sign = "+" if delta > 0 else "-"
    size = human_bytes(abs(delta), largest="TiB")
    if not before:
        return f"{sign}{size}"
    pct = abs(delta) / float(before) * 100
    if pct < 0.001:
        return f"{sign}{size} (<0.001 %)"
    return f"{sign}{size} ({sign}{pct:.2f} %)" if pct >= 0.01 else f"{sign}{size} ({sign}{pct:.3f} %)"


def file_size(entry: dict[str, Any] | None) -> int | None:
    """Bytes a written model takes on disk: the ``.onnx`` file plus its ``.data`` file, from
    an optimize document's ``input``/``output`` entry (None when unknown)."""
    if not entry or entry.get("file_bytes") is None:
        return None
    return int(entry["file_bytes"]) + int(entry.get("data_bytes") or 0)


def model_memory_words(memory: dict[str, Any]) -> str:
    """``"weights 2.3 MiB + activations 516.2 KiB at most alive at once"``, with the count of
    activations of unknown size when there are any; empty without an estimate."""
    if memory.get("model_bytes_estimate") is None:
        return ""
    words = (f"weights {human_bytes(memory.get('weights_bytes'))} + activations "
             f"{human_bytes(memory.get('activations_peak_bytes'))} at most alive at once")
    unsized = memory.get("unsized_activations") or 0
    return words + (f" ({unsized} activation(s) of unknown size not counted)" if unsized else "")


SIGNAL_HEADER = ("cosine", "rel-l2", "flushed / subnormal")


def signal_measured(outputs: list[dict[str, Any]]) -> bool:
    """Whether any verified output carries signal measures (a reduced-precision candidate)."""
    return any(o.get(k) is not None for o in outputs for k in ("cosine", "rel_l2", "flushed"))


def signal_cells(output: dict[str, Any], missing: str = "-") -> list[str]:
    """The cells under :data:`SIGNAL_HEADER` for one output of a verification."""
    cos, rel, flushed = output.get("cosine"), output.get("rel_l2"), output.get("flushed")
    return [
        f"{cos:.7g}" if cos is not None else missing,
        f"{rel:.3g}" if rel is not None else missing,
        f"{flushed} / {output.get('subnormal') or 0}" if flushed is not None else missing,
    ]
