"""A small CNN: Conv/BatchNormalization/Relu blocks, MaxPool, one residual block, a classifier.

Layout (``size`` = 32)::

    input [batch, 3, 32, 32]
    stem:    Conv 3->16   + BN + Relu
    layer1:  Conv 16->32  + BN + Relu, MaxPool 2x2           -> [batch, 32, 16, 16]
    layer2:  residual block (Conv+BN+Relu, Conv+BN, Add, Relu)
             MaxPool 2x2                                     -> [batch, 32, 8, 8]
    layer3:  Conv 32->64  + BN + Relu
    head:    GlobalAveragePool -> Flatten -> Gemm (transB=1) -> logits [batch, num_classes]

The BatchNormalization nodes are left unfused (as an exporter in eval mode emits them)
so that Conv+BN folding has something to do.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._graph import GraphBuilder

__all__ = ["build"]

FLOAT = ir.DataType.FLOAT


def _conv_bn(
    g: GraphBuilder, x: ir.Value, prefix: str, cin: int, cout: int, *, relu: bool = True
) -> ir.Value:
    """Conv 3x3 (pad 1, with bias) -> BatchNormalization [-> Relu]."""
    fan_in = cin * 9
    std = min(0.1, max(0.02, math.sqrt(2.0 / fan_in)))
    w = g.param(f"{prefix}.conv.weight", g.normal((cout, cin, 3, 3), std))
    b = g.param(f"{prefix}.conv.bias", g.normal((cout,), 0.02))
    scale = g.param(f"{prefix}.bn.weight", g.normal((cout,), 0.1, mean=1.0))
    shift = g.param(f"{prefix}.bn.bias", g.normal((cout,), 0.05))
    mean = g.param(f"{prefix}.bn.running_mean", g.normal((cout,), 0.05))
    var = g.param(f"{prefix}.bn.running_var", g.uniform((cout,), 0.5, 1.5))
    with g.scope(prefix):
        y = g.op(
            "Conv",
            [x, w, b],
            {
                "dilations": [1, 1],
                "group": 1,
                "kernel_shape": [3, 3],
                "pads": [1, 1, 1, 1],
                "strides": [1, 1],
            },
            name="conv/Conv",
        )
        y = g.op(
            "BatchNormalization",
            [y, scale, shift, mean, var],
            {"epsilon": 1e-5, "momentum": 0.9},
            name="bn/BatchNormalization",
        )
        if relu:
            y = g.op("Relu", [y], name="relu/Relu")
    return y


def _max_pool(g: GraphBuilder, x: ir.Value) -> ir.Value:
    return g.op(
        "MaxPool",
        [x],
        {"ceil_mode": 0, "kernel_shape": [2, 2], "pads": [0, 0, 0, 0], "strides": [2, 2]},
        name="pool/MaxPool",
    )


def build(
    *,
    seed: int = 0,
    batch: int | str = "batch",
    channels: int = 3,
    size: int = 32,
    num_classes: int = 10,
) -> ir.Model:
    """Build the CNN with weights drawn from ``seed``; ``size`` must be divisible by 4."""
    if size % 4:
        raise ValueError(f"size must be divisible by 4, got {size}")
    g = GraphBuilder("cnn", seed=seed)
    x = g.input("input", FLOAT, [batch, channels, size, size])

    y = _conv_bn(g, x, "stem", channels, 16)
    y = _conv_bn(g, y, "layer1", 16, 32)
    with g.scope("layer1"):
        y = _max_pool(g, y)

    # Residual block.
    with g.scope("layer2"):
        h = _conv_bn(g, y, "layer2.0", 32, 32)
        h = _conv_bn(g, h, "layer2.1", 32, 32, relu=False)
        y = g.op("Add", [h, y], name="residual/Add")
        y = g.op("Relu", [y], name="residual/Relu")
        y = _max_pool(g, y)

    y = _conv_bn(g, y, "layer3", 32, 64)

    with g.scope("head"):
        y = g.op("GlobalAveragePool", [y])
        y = g.op("Flatten", [y], {"axis": 1})
        w = g.param("fc.weight", g.normal((num_classes, 64), 0.1))
        b = g.param("fc.bias", g.normal((num_classes,), 0.02))
        logits = g.op(
            "Gemm",
            [y, w, b],
            {"alpha": 1.0, "beta": 1.0, "transB": 1},
            name="fc/Gemm",
            output_name="logits",
        )

    return g.model(
        [(logits, FLOAT, [batch, num_classes])],
        doc_string=f"small CNN {channels}x{size}x{size} -> {num_classes}, seed={seed}",
    )
