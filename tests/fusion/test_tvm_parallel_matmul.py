"""tvm-parallel-matmul: sibling MatMuls of one input with constant weights -> one MatMul + Slices."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts


def _qkv(rng, *, widths=(8, 8, 8), k=16, bias=(True, True, True), opset=17, extra_use=False):
    """x[2, 5, k] -> one MatMul per width (optionally + bias), each feeding a Relu."""
    nodes, inits, outs = [], [], []
    for i, (n, b) in enumerate(zip(widths, bias)):
        inits.append(tensor(f"w{i}", rng.standard_normal((k, n)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        last = f"m{i}"
        if b:
            inits.append(tensor(f"b{i}", rng.standard_normal(n).astype(np.float32)))
            nodes.append(helper.make_node("Add", [f"b{i}", last], [f"a{i}"]))  # bias first: either order
            last = f"a{i}"
        nodes.append(helper.make_node("Relu", [last], [f"y{i}"]))
        outs.append(vinfo(f"y{i}", shape=(2, 5, n)))
    if extra_use:
        nodes.append(helper.make_node("Neg", ["m0"], ["extra"]))
        outs.append(vinfo("extra", shape=(2, 5, widths[0])))
    return make_model(nodes, [vinfo("x", shape=(2, 5, k))], outs, inits, opset=opset)


@pytest.mark.parametrize("opset", [9, 17])
def test_qkv_with_bias_packs_into_one_matmul(rng, opset):
    proto = _qkv(rng, widths=(8, 8, 12), opset=opset)
    model, result = fuse(proto, feeds_for(rng, x=(2, 5, 16)), target="tvm-llvm", family="tvm")
    assert result.details["fired"] == {"tvm-parallel-matmul": 1}
    assert op_counts(model) == {"MatMul": 1, "Add": 1, "Slice": 3, "Relu": 3}
    (matmul,) = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmul.inputs[1].const_value.numpy().shape == (16, 28)


def test_bias_on_only_some_siblings_keeps_the_adds(rng):
    proto = _qkv(rng, bias=(True, False, True))
    model, result = fuse(proto, feeds_for(rng, x=(2, 5, 16)), target="tvm-llvm", family="tvm")
    assert result.details["fired"] == {"tvm-parallel-matmul": 1}
    assert op_counts(model) == {"MatMul": 1, "Slice": 3, "Add": 2, "Relu": 3}


def test_intermediate_used_elsewhere_keeps_bias_separate(rng):
    # m0 feeds both its bias Add and a Neg: the bias cannot be folded into the packed Add,
    # but the MatMuls still pack (m0 is a slice of the packed product).
    proto = _qkv(rng, extra_use=True)
    model, _ = fuse(proto, feeds_for(rng, x=(2, 5, 16)), target="tvm-llvm", family="tvm")
    assert op_counts(model)["MatMul"] == 1
    assert op_counts(model)["Add"] == 3


def test_only_siblings_with_the_same_k_and_constant_weights(rng):
    w = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["y0"]),
        helper.make_node("MatMul", ["x", "wdyn"], ["y1"]),  # weight is an input: not constant
        helper.make_node("MatMul", ["x16", "w0"], ["y2"]),  # another input
    ]
    proto = make_model(nodes, [vinfo("x", shape=(3, 16)), vinfo("wdyn", shape=(16, 4)), vinfo("x16", shape=(3, 16))],
                       [vinfo(f"y{i}", shape=(3, 4)) for i in range(3)], [tensor("w0", w)])
    feeds = feeds_for(rng, x=(3, 16), wdyn=(16, 4), x16=(3, 16))
    model, result = fuse(proto, feeds, target="tvm-llvm", family="tvm")
    assert result.details["fired"] == {}
    assert op_counts(model) == {"MatMul": 3}


def test_graph_output_sibling_is_left_alone(rng):
    proto = _qkv(rng, widths=(8, 8), bias=(False, False))
    proto.graph.output.append(vinfo("m0", shape=(2, 5, 8)))
    model, result = fuse(proto, feeds_for(rng, x=(2, 5, 16)), target="tvm-llvm", family="tvm")
    assert result.details["fired"] == {}
    assert op_counts(model)["MatMul"] == 2


def test_not_for_ort_targets(rng):
    proto = _qkv(rng)
    model, result = fuse(proto, feeds_for(rng, x=(2, 5, 16)), target="ort-cpu", family="ort")
    assert "tvm-parallel-matmul" not in result.details["fired"]
    assert op_counts(model)["MatMul"] == 3
