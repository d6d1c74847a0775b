"""A BERT-style transformer encoder, laid out the way the PyTorch (TorchScript) exporter emits it.

Input ``input_ids`` int64 ``[batch, seq]``, output ``last_hidden_state`` float32
``[batch, seq, hidden]``. Default-domain opset 17 only (``ReduceMean`` takes ``axes`` as
an attribute there).

What the graph contains, on purpose, because real exported graphs contain it:

* embeddings: ``Gather`` on the word table (passed through an ``Identity``, as the
  exporter does for tied weights) plus a ``Gather`` of a constant position table whose
  position ids come from ``Shape -> Gather -> Range -> Unsqueeze``; then a LayerNorm;
* per layer, Q/K/V as ``MatMul`` + ``Add``; the multi-head ``Reshape`` target shapes are
  computed from ``Shape -> Gather -> Unsqueeze -> Concat`` chains of the activations,
  one chain per reshape (so they repeat in every layer), ``Transpose`` to heads,
  ``MatMul`` for the scores, ``Div`` by a ``Constant`` sqrt(head_dim), ``Softmax``, an
  ``Identity`` left by eval-mode dropout, ``MatMul`` with V, ``Transpose``/``Reshape``
  back, output projection, residual ``Add``;
* LayerNorm decomposed: ``ReduceMean, Sub, Pow(2), ReduceMean, Add(eps), Sqrt, Div,
  Mul(gamma), Add(beta)``;
* FFN with the erf GELU decomposed: ``Div(sqrt 2), Erf, Add(1), Mul(x), Mul(0.5)``;
* one ``Constant`` node per use, so equal constants appear many times (CSE fodder).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._graph import GraphBuilder

__all__ = ["build"]

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64


def _std(fan_in: int) -> float:
    return min(0.1, max(0.02, 1.0 / math.sqrt(fan_in)))


def _linear(g: GraphBuilder, x: ir.Value, prefix: str, fan_in: int, fan_out: int) -> ir.Value:
    """``MatMul(x, W) + b`` with W stored as [in, out] (the exporter folds the transpose)."""
    w = g.param(f"{prefix}.weight", g.normal((fan_in, fan_out), _std(fan_in)))
    b = g.param(f"{prefix}.bias", g.normal((fan_out,), 0.02))
    with g.scope(prefix.rsplit(".", 1)[-1]):
        y = g.op("MatMul", [x, w])
        return g.op("Add", [b, y])  # torch emits Add(bias, MatMul)


def _layer_norm(
    g: GraphBuilder,
    x: ir.Value,
    prefix: str,
    hidden: int,
    eps: float,
    *,
    output_name: str | None = None,
) -> ir.Value:
    """LayerNorm over the last axis, decomposed into primitive ops."""
    gamma = g.param(f"{prefix}.weight", g.normal((hidden,), 0.05, mean=1.0))
    beta = g.param(f"{prefix}.bias", g.normal((hidden,), 0.02))
    with g.scope(prefix.rsplit(".", 1)[-1]):
        mean = g.op("ReduceMean", [x], {"axes": [-1], "keepdims": 1})
        centered = g.op("Sub", [x, mean])
        sq = g.op("Pow", [centered, g.const(2.0)])
        var = g.op("ReduceMean", [sq], {"axes": [-1], "keepdims": 1})
        var = g.op("Add", [var, g.const(eps)])
        std = g.op("Sqrt", [var])
        normed = g.op("Div", [centered, std])
        scaled = g.op("Mul", [normed, gamma])
        return g.op("Add", [scaled, beta], output_name=output_name)


def _gelu(g: GraphBuilder, x: ir.Value) -> ir.Value:
    """Exact (erf) GELU as the exporter decomposes it at opset 17."""
    with g.scope("gelu"):
        y = g.op("Div", [x, g.const(math.sqrt(2.0))])
        y = g.op("Erf", [y])
        y = g.op("Add", [y, g.const(1.0)])
        y = g.op("Mul", [x, y])
        return g.op("Mul", [y, g.const(0.5)])


def _dims(g: GraphBuilder, x: ir.Value, axes: tuple[int, ...]) -> list[ir.Value]:
    """``Shape -> Gather(axis) -> Unsqueeze`` per axis: 1-D int64 pieces of ``x``'s shape."""
    pieces = []
    for axis in axes:
        shape = g.op("Shape", [x])
        dim = g.op("Gather", [shape, g.const(axis, "int64")], {"axis": 0})
        pieces.append(g.op("Unsqueeze", [dim, g.const([0], "int64")]))
    return pieces


def _split_heads(
    g: GraphBuilder, x: ir.Value, heads: int, head_dim: int, perm: list[int]
) -> ir.Value:
    """``[b, s, h*d] -> Reshape [b, s, h, d] -> Transpose(perm)`` with a computed shape."""
    b, s = _dims(g, x, (0, 1))
    shape = g.op(
        "Concat",
        [b, s, g.const([heads], "int64"), g.const([head_dim], "int64")],
        {"axis": 0},
    )
    y = g.op("Reshape", [x, shape])
    return g.op("Transpose", [y], {"perm": perm})


def _attention(g: GraphBuilder, x: ir.Value, prefix: str, hidden: int, heads: int) -> ir.Value:
    head_dim = hidden // heads
    with g.scope("self"):
        q = _linear(g, x, f"{prefix}.self.query", hidden, hidden)
        k = _linear(g, x, f"{prefix}.self.key", hidden, hidden)
        v = _linear(g, x, f"{prefix}.self.value", hidden, hidden)
        q = _split_heads(g, q, heads, head_dim, [0, 2, 1, 3])  # [b, h, s, d]
        k = _split_heads(g, k, heads, head_dim, [0, 2, 3, 1])  # [b, h, d, s]
        v = _split_heads(g, v, heads, head_dim, [0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("MatMul", [q, k])
        scores = g.op("Div", [scores, g.const(math.sqrt(head_dim))])
        probs = g.op("Softmax", [scores], {"axis": -1})
        probs = g.op("Identity", [probs], name="dropout/Identity")  # eval-mode dropout
        ctx = g.op("MatMul", [probs, v])
        ctx = g.op("Transpose", [ctx], {"perm": [0, 2, 1, 3]})  # [b, s, h, d]
        b, s = _dims(g, ctx, (0, 1))
        shape = g.op("Concat", [b, s, g.const([hidden], "int64")], {"axis": 0})
        ctx = g.op("Reshape", [ctx, shape])
    with g.scope("output"):
        out = _linear(g, ctx, f"{prefix}.output.dense", hidden, hidden)
        out = g.op("Add", [out, x], name="residual/Add")
    return out


def build(
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    ffn: int = 512,
    vocab: int = 1000,
    seq: int | str = "seq",
    batch: int | str = "batch",
    max_positions: int = 512,
    eps: float = 1e-12,
) -> ir.Model:
    """Build the encoder with weights drawn from ``seed``; ``seq`` must be <= ``max_positions``."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    g = GraphBuilder("transformer_encoder", seed=seed)
    input_ids = g.input("input_ids", INT64, [batch, seq])

    with g.scope("embeddings"):
        word = g.param("embeddings.word_embeddings.weight", g.normal((vocab, hidden), 0.02))
        pos_table = g.param(
            "embeddings.position_embeddings.weight", g.normal((max_positions, hidden), 0.02)
        )
        # Tied weights reach the graph through an Identity in TorchScript exports.
        word = g.op("Identity", [word], name="word_embeddings/Identity")
        tok = g.op("Gather", [word, input_ids], {"axis": 0}, name="word_embeddings/Gather")
        shape = g.op("Shape", [input_ids])
        seq_len = g.op("Gather", [shape, g.const(1, "int64")], {"axis": 0})
        pos_ids = g.op("Range", [g.const(0, "int64"), seq_len, g.const(1, "int64")])
        pos_ids = g.op("Unsqueeze", [pos_ids, g.const([0], "int64")])  # [1, seq]
        pos = g.op("Gather", [pos_table, pos_ids], {"axis": 0}, name="position_embeddings/Gather")
        emb = g.op("Add", [tok, pos])
        x = _layer_norm(g, emb, "embeddings.LayerNorm", hidden, eps)

    for i in range(layers):
        prefix = f"encoder.layer.{i}"
        last = i == layers - 1
        with g.scope(f"encoder/layer.{i}"):
            with g.scope("attention"):
                h = _attention(g, x, f"{prefix}.attention", hidden, heads)
                with g.scope("output"):
                    x = _layer_norm(g, h, f"{prefix}.attention.output.LayerNorm", hidden, eps)
            with g.scope("intermediate"):
                h = _linear(g, x, f"{prefix}.intermediate.dense", hidden, ffn)
                h = _gelu(g, h)
            with g.scope("output"):
                h = _linear(g, h, f"{prefix}.output.dense", ffn, hidden)
                h = g.op("Add", [h, x], name="residual/Add")
                x = _layer_norm(
                    g,
                    h,
                    f"{prefix}.output.LayerNorm",
                    hidden,
                    eps,
                    output_name="last_hidden_state" if last else None,
                )

    if layers == 0:
        x = g.op("Identity", [x], output_name="last_hidden_state")

    return g.model(
        [(x, FLOAT, [batch, seq, hidden])],
        doc_string=(
            f"transformer encoder layers={layers} hidden={hidden} heads={heads} "
            f"ffn={ffn} vocab={vocab} max_positions={max_positions}, seed={seed}"
        ),
    )
