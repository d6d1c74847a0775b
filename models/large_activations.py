"""A precision stress model: activations near 1e3 through a decomposed LayerNorm.

``x [batch, seq, 128]`` → ``MatMul`` with large weights (activations of magnitude ~1e3,
all inside fp16's range) → residual ``Add`` → LayerNorm decomposed as the TorchScript
exporter writes it (``ReduceMean, Sub, Pow(2), ReduceMean, Add(eps=1e-12), Sqrt, Div,
Mul, Add``) → ``MatMul`` → ``Softmax`` → ``probs``, plus the normalized hidden state
``hidden`` as a second output.

Why it breaks plain per-op fp16 conversion: ``Pow(x - mean, 2)`` reaches ~1e6-1e7,
beyond fp16's 65504, so an fp16 ``Pow`` gives inf, the variance is inf and the
normalized output collapses to ``beta``; ``eps = 1e-12`` flushes to zero in fp16.
A converter that keeps the statistics region in fp32 stays accurate.
"""

from __future__ import annotations

import onnx_ir as ir

from ._graph import GraphBuilder

__all__ = ["build"]

FLOAT = ir.DataType.FLOAT


def build(*, seed: int = 0, batch: int | str = "batch", seq: int | str = "seq", hidden: int = 128,
          classes: int = 16, scale: float = 300.0) -> ir.Model:
    """Build the model; ``scale`` is the std of the first weights (activations ~ scale × 4)."""
    g = GraphBuilder("large_activations", seed=seed)
    x = g.input("x", FLOAT, [batch, seq, hidden])
    with g.scope("proj"):
        w = g.param("proj.weight", g.normal((hidden, hidden), scale))
        b = g.param("proj.bias", g.normal((hidden,), scale / 10))
        h = g.op("Add", [g.op("MatMul", [x, w]), b])
        h = g.op("Add", [h, x])  # residual
    with g.scope("LayerNorm"):
        mean = g.op("ReduceMean", [h], {"axes": [-1], "keepdims": 1})
        d = g.op("Sub", [h, mean])
        sq = g.op("Pow", [d, g.const(2.0, "float32")])
        var = g.op("ReduceMean", [sq], {"axes": [-1], "keepdims": 1})
        std = g.op("Sqrt", [g.op("Add", [var, g.const(1e-12, "float32")])])
        n = g.op("Div", [d, std])
        gamma = g.param("ln.weight", 1.0 + g.normal((hidden,), 0.02))
        beta = g.param("ln.bias", g.normal((hidden,), 0.02))
        normed = g.op("Add", [g.op("Mul", [n, gamma]), beta], output_name="hidden")
    with g.scope("head"):
        w2 = g.param("head.weight", g.normal((hidden, classes), 0.2))
        logits = g.op("MatMul", [normed, w2])
    probs = g.op("Softmax", [logits], {"axis": -1}, output_name="probs")
    return g.model(
        [(probs, FLOAT, [batch, seq, classes]), (normed, FLOAT, [batch, seq, hidden])],
        doc_string=f"large activations (std {scale}) through a decomposed LayerNorm, seed={seed}",
    )
