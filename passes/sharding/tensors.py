"""Tensor facts the sharding modules read: static-or-symbolic shapes, constness, element size."""

from __future__ import annotations

__all__ = ["Dim", "element_bytes", "is_const", "shape_of"]

import onnx_ir as ir

Dim = int | str | None


def shape_of(v: ir.Value | None) -> tuple[Dim, ...] | None:
    if v is None or v.shape is None:
        return None
    out: list[Dim] = []
    for d in v.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if isinstance(d.value, str) and d.value else None)
    return tuple(out)


def is_const(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None


def element_bytes(v: ir.Value) -> int:
    t = v.type
    try:
        return t.dtype.itemsize if t is not None else 4
    except AttributeError:
        return 4
