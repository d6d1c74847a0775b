"""Which ONNX ops the TVM backend accepts: those TVM 0.27's ONNX frontend converts.

The frontend ignores domains, so only ONNX's default domain is accepted (a contrib op
would be misread as the standard op of the same name), and converters that exist but
fail on what the standard op means are refused with the reason (:data:`BROKEN`).
:func:`check_importable` refuses a model before any import is tried, naming every op
type TVM cannot import and one node of each.
"""

from __future__ import annotations

__all__ = ["BROKEN", "check_importable", "supported_ops", "supports", "unsupported_nodes"]

import functools

import onnx_ir as ir

from gcomp.errors import BackendError

# Converters present in TVM 0.27's table that fail on what the standard op means.
# Attention: the table's Attention is ORT's contrib op (needs num_heads); ONNX's opset-23
# Attention fails with KeyError 'num_heads'.
BROKEN = {("", "Attention"): "TVM 0.27 reads Attention as ORT's contrib op and fails on ONNX's opset-23 Attention"}


@functools.cache
def supported_ops() -> frozenset[str]:
    """Op types TVM 0.27's ONNX frontend has a converter for (default domain);
    :class:`gcomp.deps.MissingExtraError` when TVM is not installed."""
    from gcomp.backends.tvm.threads import require_tvm

    require_tvm()
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map()) | {"If", "Constant"}


def supports(op_type: str, domain: str = "", opset: int | None = None) -> bool:
    """Whether TVM imports ``op_type`` of ``domain`` (at ``opset``)."""
    domain = "" if domain in ("", "ai.onnx") else domain
    if domain != "":
        return False  # the frontend ignores domains: contrib ops would be misread
    if (domain, op_type) in BROKEN:
        return False
    return op_type in supported_ops()


def unsupported_nodes(model: ir.Model) -> dict[str, list[str]]:
    """``{op (with domain when not ONNX's): [node names]}`` TVM cannot import, every scope."""
    found: dict[str, list[str]] = {}
    opset = model.opset_imports.get("", 1)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not supports(node.op_type, node.domain, opset):
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            found.setdefault(key, []).append(node.name or "?")
    return found


def check_importable(model: ir.Model) -> None:
    """Raise BackendError (with ``unsupported_ops``) when ``model`` holds ops TVM cannot import."""
    bad = unsupported_nodes(model)
    if bad:
        raise _unsupported_error(bad)


def _unsupported_error(bad: dict[str, list[str]]) -> BackendError:
    parts = []
    for op, nodes in sorted(bad.items()):
        why = BROKEN.get(("", op))
        more = f" and {len(nodes) - 1} more" if len(nodes) > 1 else ""
        parts.append(f"{op} (node '{nodes[0]}'{more}{'; ' + why if why else ''})")
    err = BackendError("tvm: TVM's ONNX importer does not support " + ", ".join(parts))
    err.unsupported_ops = sorted(bad)
    return err
