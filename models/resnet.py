"""ResNet-18 (He et al. 2015, torchvision's layout) with seeded random weights, no torch.

Layout at ``size`` = 224::

    input [batch, 3, 224, 224]
    stem:    Conv 7x7/2 3->64 + BN + Relu, MaxPool 3x3/2      -> [batch, 64, 56, 56]
    layer1:  2 basic blocks, 64 channels                       -> [batch, 64, 56, 56]
    layer2:  2 basic blocks, 128 channels, first one /2 with a 1x1/2 projection shortcut
    layer3:  2 basic blocks, 256 channels, /2                  -> [batch, 256, 14, 14]
    layer4:  2 basic blocks, 512 channels, /2                  -> [batch, 512, 7, 7]
    head:    GlobalAveragePool -> Flatten -> Gemm 512->1000

A basic block is Conv3x3+BN+Relu, Conv3x3+BN, Add (shortcut), Relu. Convolutions have
no bias (BN follows), as in torchvision. 11.69 M parameters; 1.814 G multiply-accumulates
per 224x224 image (the "1.8 GFLOPs" the paper quotes). Weights are He-initialised so
activations stay finite through the 18 layers; the model is for profiling and FLOP
counting, not accuracy.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._graph import GraphBuilder

__all__ = ["build"]

FLOAT = ir.DataType.FLOAT


def _conv_bn(
    g: GraphBuilder,
    x: ir.Value,
    prefix: str,
    cin: int,
    cout: int,
    *,
    kernel: int,
    stride: int,
    relu: bool,
) -> ir.Value:
    pad = kernel // 2
    w = g.param(
        f"{prefix}.conv.weight",
        g.normal((cout, cin, kernel, kernel), math.sqrt(2.0 / (cin * kernel**2))),
    )
    scale = g.param(f"{prefix}.bn.weight", g.normal((cout,), 0.05, mean=1.0))
    shift = g.param(f"{prefix}.bn.bias", g.normal((cout,), 0.05))
    mean = g.param(f"{prefix}.bn.running_mean", g.normal((cout,), 0.05))
    var = g.param(f"{prefix}.bn.running_var", g.uniform((cout,), 0.8, 1.2))
    with g.scope(prefix):
        y = g.op(
            "Conv",
            [x, w],
            {"kernel_shape": [kernel, kernel], "pads": [pad] * 4, "strides": [stride, stride]},
            name="conv/Conv",
        )
        y = g.op(
            "BatchNormalization",
            [y, scale, shift, mean, var],
            {"epsilon": 1e-5},
            name="bn/BatchNormalization",
        )
        if relu:
            y = g.op("Relu", [y], name="relu/Relu")
    return y


def _block(g: GraphBuilder, x: ir.Value, prefix: str, cin: int, cout: int, stride: int) -> ir.Value:
    h = _conv_bn(g, x, f"{prefix}.conv1", cin, cout, kernel=3, stride=stride, relu=True)
    h = _conv_bn(g, h, f"{prefix}.conv2", cout, cout, kernel=3, stride=1, relu=False)
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = _conv_bn(
            g, x, f"{prefix}.downsample", cin, cout, kernel=1, stride=stride, relu=False
        )
    with g.scope(prefix):
        y = g.op("Add", [h, shortcut], name="add/Add")
        return g.op("Relu", [y], name="relu/Relu")


def build(
    *, seed: int = 0, batch: int | str = "batch", size: int = 224, num_classes: int = 1000
) -> ir.Model:
    """ResNet-18 for ``size`` x ``size`` RGB images (``size`` divisible by 32)."""
    if size % 32:
        raise ValueError(f"size must be divisible by 32, got {size}")
    g = GraphBuilder("resnet18", seed=seed)
    x = g.input("input", FLOAT, [batch, 3, size, size])
    y = _conv_bn(g, x, "stem", 3, 64, kernel=7, stride=2, relu=True)
    with g.scope("stem"):
        y = g.op(
            "MaxPool",
            [y],
            {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]},
            name="pool/MaxPool",
        )
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for index in range(2):
            stride = 2 if stage > 1 and index == 0 else 1
            y = _block(g, y, f"layer{stage}.{index}", cin, cout, stride)
            cin = cout
    with g.scope("head"):
        y = g.op("GlobalAveragePool", [y])
        y = g.op("Flatten", [y], {"axis": 1})
        w = g.param("fc.weight", g.normal((num_classes, 512), math.sqrt(1.0 / 512)))
        b = g.param("fc.bias", g.normal((num_classes,), 0.01))
        logits = g.op("Gemm", [y, w, b], {"transB": 1}, name="fc/Gemm", output_name="logits")
    return g.model(
        [(logits, FLOAT, [batch, num_classes])],
        doc_string=f"ResNet-18 3x{size}x{size} -> {num_classes}, seed={seed}",
    )
