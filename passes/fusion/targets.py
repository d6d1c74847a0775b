"""Which fusion targets exist and which ops each accepts.

A target is a backend plus a device: ``ort-cpu``, ``ort-cuda``, ``tvm-llvm``,
``tvm-cuda``, and ``portable`` (every backend gcomp supports must accept the op). A
fusion rule fires only when its target accepts every op it emits (DESIGN.md,
"Passes"). When a backend declares its own capabilities (``gcomp.backends``'s
``accepts``), that declaration is used; otherwise the table below, measured on the
versions in FACTS.md, is.
"""

from __future__ import annotations

__all__ = ["TARGETS", "accepts", "check_target", "backend_of"]

import functools

from gcomp.errors import OptionError

TARGETS: tuple[str, ...] = ("portable", "ort-cpu", "ort-cuda", "tvm-llvm", "tvm-cuda")

# Standard ops the backends cannot run (beyond the opset limit).
_ORT_MAX_OPSET = 23  # onnxruntime 1.31: Attention-23, RMSNormalization-23, Gelu-20 run on CPU
_TVM_MAX_OPSET = 23
_TVM_LACKS = frozenset({
    # TVM 0.27's ONNX frontend: missing converters, or (Attention-23) a converter that
    # fails import with KeyError 'num_heads' (FACTS.md).
    "LSTM", "GRU", "RNN", "Loop", "Scan", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "RotaryEmbedding", "DFT", "STFT", "Attention",
})
# com.microsoft ops the ORT fusions emit; ORT has CPU and CUDA kernels for each.
_ORT_CONTRIB = frozenset({
    "FusedConv", "FusedMatMul", "Gelu", "FastGelu", "BiasGelu", "QuickGelu",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
    "Attention", "MultiHeadAttention", "RotaryEmbedding", "BiasAdd", "EmbedLayerNormalization",
})


def backend_of(target: str) -> str:
    return target.split("-", 1)[0]


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise OptionError(f"unknown target '{target}' (targets: {', '.join(TARGETS)})")
    return target


@functools.cache
def accepts(target: str, domain: str, op_type: str, version: int) -> bool:
    """Whether ``target`` runs ``domain::op_type`` at opset ``version``."""
    check_target(target)
    if target == "portable":
        return all(accepts(t, domain, op_type, version) for t in ("ort-cpu", "tvm-llvm"))
    declared = _declared(target)
    if declared is not None and backend_of(target) == "ort":
        return bool(declared(target, domain, op_type, version))
    standard = domain in ("", "ai.onnx")
    if backend_of(target) == "ort":
        if standard:
            return version <= _ORT_MAX_OPSET
        return domain == "com.microsoft" and op_type in _ORT_CONTRIB
    if backend_of(target) == "tvm":
        return standard and version <= _TVM_MAX_OPSET and op_type not in _TVM_LACKS
    return False


def _declared(target: str):
    """The backend's own capability function, when gcomp.backends provides one."""
    try:
        import gcomp.backends as backends
    except ImportError:  # pragma: no cover
        return None
    return getattr(backends, "target_accepts", None)
