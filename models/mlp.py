"""A multilayer perceptron: ``(MatMul + Add + Relu) * n -> MatMul + Add -> Softmax``.

Input ``x`` float32 ``[batch, features]``, output ``probs`` float32 ``[batch, classes]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir

from ._graph import GraphBuilder

__all__ = ["build"]

FLOAT = ir.DataType.FLOAT


def build(
    *,
    seed: int = 0,
    batch: int | str = "batch",
    features: int = 64,
    hidden: Sequence[int] = (256, 256),
    classes: int = 10,
) -> ir.Model:
    """Build the MLP with weights drawn from ``seed``."""
    g = GraphBuilder("mlp", seed=seed)
    x = g.input("x", FLOAT, [batch, features])

    h, width = x, features
    for i, out in enumerate([*hidden, classes]):
        last = i == len(hidden)
        scope = "classifier" if last else f"layers.{i}"
        with g.scope(scope):
            std = min(0.1, max(0.02, math.sqrt(2.0 / width)))
            w = g.param(f"{scope}.weight", g.normal((width, out), std))
            b = g.param(f"{scope}.bias", g.normal((out,), 0.02))
            h = g.op("MatMul", [h, w])
            h = g.op("Add", [h, b])
            if not last:
                h = g.op("Relu", [h])
        width = out

    probs = g.op("Softmax", [h], {"axis": -1}, output_name="probs")
    return g.model(
        [(probs, FLOAT, [batch, classes])],
        doc_string=f"MLP {features}->{'->'.join(map(str, hidden))}->{classes}, seed={seed}",
    )
