"""scale: Mul/Div/Sub by constants after Conv/ConvTranspose/Gemm folded into weights and bias."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

CIN, COUT = 3, 4


def _conv_op(rng, op, c, *, const_first=False, conv_bias=True, op_type="Conv", group=1, weight_input=False):
    if op_type == "Conv":
        w_shape = (COUT, CIN // group if CIN % group == 0 else CIN, 3, 3)
        out = (2, COUT, 4, 4)
    else:
        w_shape = (COUT, COUT // group, 3, 3)
        out = (2, COUT, 8, 8)
    cin = CIN if op_type == "Conv" else COUT
    inits = [tensor("c", np.asarray(c, np.float32))]
    inputs = [vinfo("x", shape=(2, cin, 6, 6))]
    if weight_input:
        inputs.append(vinfo("W", shape=w_shape))
    else:
        inits.append(tensor("W", rng.standard_normal(w_shape).astype(np.float32)))
    conv_in = ["x", "W"]
    if conv_bias:
        inits.append(tensor("B", rng.standard_normal(COUT).astype(np.float32)))
        conv_in.append("B")
    nodes = [helper.make_node(op_type, conv_in, ["y"], group=group),
             helper.make_node(op, ["c", "y"] if const_first else ["y", "c"], ["z"])]
    shapes = {"x": (2, cin, 6, 6)}
    if weight_input:
        shapes["W"] = w_shape
    return make_model(nodes, inputs, [vinfo("z", shape=out)], inits), shapes


PER_CHANNEL = np.array([0.5, -2.0, 3.0, 0.25], np.float32).reshape(COUT, 1, 1)


@pytest.mark.parametrize("op,const_first", [("Mul", False), ("Mul", True), ("Div", False), ("Sub", False),
                                            ("Sub", True)])
@pytest.mark.parametrize("c", [PER_CHANNEL, np.float32(1.5)], ids=["per-channel", "scalar"])
def test_conv_scale_folds(rng, op, const_first, c):
    proto, shapes = _conv_op(rng, op, c, const_first=const_first)
    model, result = fuse(proto, feeds_for(rng, **shapes))
    assert result.details["fired"] == {"scale": 1}
    assert op_counts(model) == {"Conv": 1}


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_scale_folds(rng, group):
    proto, shapes = _conv_op(rng, "Mul", PER_CHANNEL, op_type="ConvTranspose", group=group, conv_bias=False)
    model, _ = fuse(proto, feeds_for(rng, **shapes))
    assert op_counts(model) == {"ConvTranspose": 1}


def test_conv_scale_does_not_fire(rng):
    cases = [
        _conv_op(rng, "Div", np.array([1, 0, 2, 3], np.float32).reshape(COUT, 1, 1)),  # a zero divisor
        _conv_op(rng, "Mul", rng.standard_normal((1, 1, 4, 4)).astype(np.float32)),  # over spatial axes
        _conv_op(rng, "Mul", PER_CHANNEL, weight_input=True),  # weights not constant
    ]
    for proto, shapes in cases:
        model, result = fuse(proto, feeds_for(rng, **shapes))
        assert not result.modified and len(list(model.graph)) == 2


def test_conv_sub_with_dynamic_weights_still_folds_into_bias(rng):
    proto, shapes = _conv_op(rng, "Sub", PER_CHANNEL, weight_input=True)
    model, _ = fuse(proto, feeds_for(rng, **shapes))
    assert op_counts(model) == {"Conv": 1}


@pytest.mark.parametrize("op,c", [("Mul", np.float32(0.125)), ("Div", np.arange(1, 6, dtype=np.float32)),
                                  ("Mul", np.arange(1, 6, dtype=np.float32).reshape(1, 5))])
@pytest.mark.parametrize("weight_input", [False, True])
def test_gemm_scale_folds(rng, op, c, weight_input):
    inits = [tensor("c", c), tensor("C", rng.standard_normal(5).astype(np.float32))]
    inputs = [vinfo("x", shape=(3, 4))]
    if weight_input:
        inputs.append(vinfo("W", shape=(5, 4)))
    else:
        inits.append(tensor("W", rng.standard_normal((5, 4)).astype(np.float32)))
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, alpha=2.0, beta=0.5),
             helper.make_node(op, ["y", "c"], ["z"])]
    proto = make_model(nodes, inputs, [vinfo("z", shape=(3, 5))], inits)
    feeds = feeds_for(rng, x=(3, 4), **({"W": (5, 4)} if weight_input else {}))
    model, result = fuse(proto, feeds)
    # A per-column scale needs constant weights; a scalar one goes into alpha.
    expect = not weight_input or np.ndim(c) == 0
    assert result.modified == expect
    assert op_counts(model) == ({"Gemm": 1} if expect else {"Gemm": 1, op: 1})
