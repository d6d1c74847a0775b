"""Compilation targets and the ops each consumes: what fusion rules ask before they fire.

A *target* is a backend plus a device: ``ort-cpu``, ``ort-cuda``, ``tvm-llvm``,
``tvm-cuda``, and ``portable`` (accepted by every other target). This module is the one
definition of both the target names (:data:`TARGETS`) and what each accepts.

``supports(target, op_type, domain, opset)`` answers from the runtimes themselves, read
once and cached:

- ORT: the op schemas ONNX Runtime registers (``get_all_operator_schema``: standard ONNX
  ops, ``com.microsoft`` contrib ops, ``ai.onnx.ml``), for models whose default opset is
  at most the newest ONNX Runtime loads (probed: it refuses newer ones at load).
- TVM: the ONNX frontend's converter table, default domain only (the frontend ignores
  domains, so a contrib op would be misread), minus converters known to be broken
  (opset-23 ``Attention``).

``capabilities(name)`` is what the fusion passes receive (through
:class:`gcomp.registry.PassContext`): a :class:`Target` whose ``accepts`` answers as
``supports`` does for ORT, and for TVM from a static table (:data:`_TVM_LACKS`,
:data:`_TVM_MAX_OPSET`), so that fusing never imports TVM (seconds per process);
tests/fusion/test_targets.py checks that table against TVM's live converter table for
every op a fusion emits. ``portable`` accepts what every other target accepts.

The answers are about importing/loading, not speed.
"""

from __future__ import annotations

__all__ = ["TARGETS", "Target", "capabilities", "ort_max_opset", "ort_supports", "supports", "targets"]

import functools
from dataclasses import dataclass

from gcomp.errors import OptionError

# target name -> (backend name, backend target); portable is the intersection of the rest.
TARGETS: dict[str, tuple[str, str] | None] = {
    "ort-cpu": ("ort", "cpu"),
    "ort-cuda": ("ort", "cuda"),
    "tvm-llvm": ("tvm", "llvm"),
    "tvm-cuda": ("tvm", "cuda"),
    "portable": None,
}
_STANDARD = ("", "ai.onnx")

# TVM 0.27's ONNX frontend (what fusion asks; no TVM import): standard ops up to this opset,
# except those it has no converter for or (Attention-23) one that fails import with
# KeyError 'num_heads' (docs/measurements.md).
_TVM_MAX_OPSET = 23
_TVM_LACKS = frozenset({
    "LSTM", "GRU", "RNN", "Loop", "Scan", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "RotaryEmbedding", "DFT", "STFT", "Attention",
    "SimplifiedLayerNormalization",  # ONNX Runtime's own op in the default domain
})


@dataclass(frozen=True)
class Target:
    """One target's capabilities (:class:`gcomp.registry.Capabilities`)."""

    name: str
    backend: str | None
    device: str | None

    def accepts(self, domain: str, op_type: str, version: int) -> bool:
        """Whether the target runs ``domain::op_type`` in a model of (``domain``) opset ``version``."""
        return _accepts(self.name, domain, op_type, version)


@functools.cache
def capabilities(name: str) -> Target:
    """The :class:`Target` called ``name``; OptionError for an unknown name."""
    if name not in TARGETS:
        raise OptionError(f"unknown target '{name}' (targets: {', '.join(TARGETS)})")
    backend, device = TARGETS[name] or (None, None)
    return Target(name, backend, device)


def targets() -> list[str]:
    """Every target name, ``portable`` last (what ``--target`` accepts)."""
    return list(TARGETS)


def supports(target: str, op_type: str, domain: str = "", opset: int | None = None) -> bool:
    """Whether ``target`` consumes ``op_type`` from ``domain`` in a model of ``opset``.

    ``opset`` is the model's version of ``domain`` (default-domain opset for ONNX ops);
    ``None`` means "any version the target loads". Raises KeyError for an unknown target.
    """
    if target not in TARGETS:
        raise KeyError(f"unknown target {target!r} (targets: {', '.join(TARGETS)})")
    if target == "portable":
        return all(supports(t, op_type, domain, opset) for t in TARGETS if t != "portable")
    backend, _device = TARGETS[target]
    if backend == "ort":
        return ort_supports(op_type, domain, opset)
    from gcomp.backends import tvm

    return tvm.supports(op_type, domain, opset)


@functools.cache
def _accepts(target: str, domain: str, op_type: str, version: int) -> bool:
    if target == "portable":
        return all(_accepts(t, domain, op_type, version) for t in TARGETS if t != "portable")
    backend, _device = TARGETS[target]
    if backend == "ort":
        return ort_supports(op_type, domain, version)
    return domain in _STANDARD and version <= _TVM_MAX_OPSET and op_type not in _TVM_LACKS


@functools.cache
def _ort_schemas() -> dict[tuple[str, str], int]:
    """(domain, op) -> the oldest version ONNX Runtime registers."""
    from gcomp.deps import ensure_onnxruntime

    ensure_onnxruntime()
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    found: dict[tuple[str, str], int] = {}
    for s in C.get_all_operator_schema():
        domain = "" if s.domain in _STANDARD else s.domain
        key = (domain, s.name)
        found[key] = min(found.get(key, s.since_version), s.since_version)
    return found


@functools.cache
def ort_max_opset() -> int:
    """The newest default-domain opset ONNX Runtime loads (probed with a one-Relu model)."""
    import onnx
    from onnx import helper

    from gcomp.deps import ensure_onnxruntime

    ensure_onnxruntime()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    for version in range(onnx.defs.onnx_opset_version(), 6, -1):
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
        model.ir_version = 10
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return version
        except Exception:
            continue
    return 7


def ort_supports(op_type: str, domain: str = "", opset: int | None = None) -> bool:
    """Whether ONNX Runtime registers ``op_type`` of ``domain`` (for that opset)."""
    domain = "" if domain in _STANDARD else domain
    since = _ort_schemas().get((domain, op_type))
    if since is None:
        return False
    if opset is None:
        return True
    if domain == "" and opset > ort_max_opset():
        return False
    return since <= opset
