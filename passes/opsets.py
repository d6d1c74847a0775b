"""The model's default-domain opset: the one reading every pass uses."""

from __future__ import annotations

__all__ = ["NON_DETERMINISTIC", "model_opset"]

import onnx_ir as ir

# Ops whose outputs differ run to run: never folded, never merged by CSE.
NON_DETERMINISTIC = frozenset(
    {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}
)


def model_opset(model: ir.Model) -> int:
    """The opset the model imports for standard ONNX ops (domain ``""`` or ``"ai.onnx"``).

    A model importing neither has no standard ops to read it for; 1 then, the oldest,
    so that nothing newer is ever assumed."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
