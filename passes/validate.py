"""Validation: the ONNX checker as a pass.

Guarantees: a model that passes is accepted by ``onnx.checker.check_model`` (graph
structure, SSA, op schemas of standard domains, types where declared). Never modifies
the model. External weights are not read: their references are checked, not their bytes.
"""

from __future__ import annotations

__all__ = ["ValidatePass"]

from typing import Annotated

import onnx_ir as ir

from gcomp import io
from gcomp.errors import GcompError
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

        proto = ir.serde.serialize_model(model)
        externals = list(io.external_tensors(model))
        try:
            if externals:
                _check_with_external_data(proto, externals, self.full_check)
            else:
                onnx.checker.check_model(proto, full_check=self.full_check)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelInvalidError(f"model fails the ONNX checker: {first}") from None
        return ir.passes.PassResult(model, modified=False)


def _check_with_external_data(proto, externals: list[ir.ExternalTensor], full_check: bool) -> None:
    """Check a model whose weights live in files elsewhere, without reading them.

    The checker resolves external data against the folder of the file it checks (or
    the cwd for an in-memory proto) and refuses symlinks, so it cannot check data
    files in place; :func:`gcomp.io.load` already checked them (existence, bounds,
    containment). Here each external initializer of the main graph becomes a graph
    input of the same type and shape: structure, schemas and (with ``full_check``)
    shape inference are checked exactly as before.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = proto.graph
    inputs = {i.name for i in graph.input}
    kept = []
    for init in graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            if init.name not in inputs:
                graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    onnx.checker.check_model(proto, full_check=full_check)
