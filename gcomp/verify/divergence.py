"""Where a lossy model (a quantized one) first leaves its accuracy budget.

When a quantized model misses the budget on the verification inputs, naming the pass is
not enough: the user needs the node. :func:`first_divergent_node` runs the float model
and the candidate on the same inputs with every float intermediate value both models share
(same name) exposed, walks the float model's nodes in graph order, and returns the first
node with an output whose error under the budget's metric exceeds its tolerance.
"""

from __future__ import annotations

__all__ = ["Divergence", "first_divergent_node"]

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gcomp import runtime
from gcomp.errors import BackendError
from gcomp.verify.metrics import Budget, measure


@dataclass(frozen=True)
class Divergence:
    node: str  # the float model's node (ONNX name, or op type and index when unnamed)
    value: str
    error: float

    def describe(self, budget: Budget) -> str:
        return f"first node over the budget: '{self.node}' (output '{self.value}': {budget.metric} {self.error:.4g})"


def first_divergent_node(float_model: ir.Model, candidate: ir.Model, feeds: Mapping[str, np.ndarray],
                         budget: Budget) -> Divergence | None:
    """The first node of ``float_model`` whose output differs beyond ``budget`` in
    ``candidate``; None when none does or the models cannot run with values exposed."""
    float_copy, candidate_copy = _typed(float_model), _typed(candidate)
    shared = _float_values(float_copy) & _float_values(candidate_copy)
    try:
        expected = runtime.run_exposing(float_copy, shared, feeds)
        actual = runtime.run_exposing(candidate_copy, shared, feeds)
    except BackendError:
        return None
    labels = {node: node.name or f"{node.op_type}_{i}" for i, node in enumerate(float_copy.graph)}
    replaced: set[ir.Node] = set()  # float nodes the candidate computes under other value names
    for node in float_copy.graph:
        if not any(v.name in actual for v in node.outputs):
            replaced.add(node)
            continue
        for v in node.outputs:
            if v.name in expected and v.name in actual:
                row = measure([{v.name: expected[v.name]}], [{v.name: actual[v.name]}], budget)[0]
                if not row.within:
                    # a replaced producer (a quantized node whose output got a new name) is the culprit
                    culprit = next((i.producer() for i in node.inputs if i is not None and i.producer() in replaced),
                                   node)
                    return Divergence(labels[culprit], v.name, row.error)
    return None


def _typed(model: ir.Model) -> ir.Model:
    """A copy with inferred types on its values (ORT needs a type on every graph output)."""
    from onnx_ir.passes.common import ShapeInferencePass

    copy = model.clone()
    try:
        return ShapeInferencePass()(copy).model
    except Exception:  # noqa: BLE001  (an op ONNX cannot infer: the values already typed still serve)
        return copy


def _float_values(model: ir.Model) -> set[str]:
    return {v.name for node in model.graph for v in node.outputs
            if v.name and v.type is not None and v.dtype == ir.DataType.FLOAT}
