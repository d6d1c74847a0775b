"""Validation: the ONNX checker as a pass.

Guarantees: a model that passes is accepted by ``onnx.checker.check_model`` (graph
structure, SSA, op schemas of standard domains, types where declared). Never modifies
the model. External weights are not read: their references are checked, not their bytes.
"""

from __future__ import annotations

__all__ = ["ValidatePass"]

from typing import Annotated

import onnx_ir as ir

from gcomp.errors import GcompError
from gcomp.registry import register_pass


class ModelInvalidError(GcompError):
    """The model fails the ONNX checker."""


@register_pass("validate")
class ValidatePass(ir.passes.InPlacePass):
    """Run the ONNX checker; fail with its first message when the model is invalid."""

    def __init__(
        self,
        *,
        full_check: Annotated[bool, "also run strict shape inference"] = False,
    ) -> None:
        super().__init__()
        self.full_check = full_check

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnx  # the checker works on protobuf; this is the I/O edge

        proto = ir.serde.serialize_model(model)
        try:
            onnx.checker.check_model(proto, full_check=self.full_check)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelInvalidError(f"model fails the ONNX checker: {first}") from None
        return ir.passes.PassResult(model, modified=False)
