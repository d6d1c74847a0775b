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
from gcomp.io import call_without_weights
from gcomp.registry import register_pass


class ModelInvalidError(GcompError):
    """The model fails the ONNX checker."""


@register_pass("validate")
class ValidatePass(ir.passes.InPlacePass):
    """Run the ONNX checker; fail with its first message when the model is invalid."""

    # A pure check: gcomp.optimize skips it while the model is exactly as gcomp.io.load
    # checked it (no pass has modified it yet), instead of checking the same model twice.
    validates = True

    def __init__(
        self,
        *,
        full_check: Annotated[bool, "also run strict shape inference"] = False,
    ) -> None:
        super().__init__()
        self.full_check = full_check

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnx  # the checker works on protobuf; this is the I/O edge

        def check(proto) -> None:
            onnx.checker.check_model(proto, full_check=self.full_check)

        try:
            # Weights become typed inputs for the call: the checker never reads their bytes,
            # and external data needs no resolving (gcomp.io.load checked those files).
            call_without_weights(check, model)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise ModelInvalidError(f"model fails the ONNX checker: {first}") from None
        return ir.passes.PassResult(model, modified=False)
