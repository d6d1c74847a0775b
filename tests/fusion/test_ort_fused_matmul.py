"""ort-fused-matmul: MatMul + last-two-axes Transpose / scalar scale -> com.microsoft FusedMatMul."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts


def _model(rng, *, ta=False, tb=False, scale=None, rank=3, softmax=False, extra_use=False, perm=None):
    batch = (2, 3)[: rank - 2]
    a_shape = (*batch, 5, 4) if ta else (*batch, 4, 5)  # as fed; the product sees [.., 4, 5]
    b_shape = (*batch, 6, 5) if tb else (*batch, 5, 6)
    swap = perm or [*range(rank - 2), rank - 1, rank - 2]
    if perm:  # the fed shape that this perm turns into [.., 4, 5]
        a_shape = tuple(int(d) for d in np.array((*batch, 4, 5))[np.argsort(perm)])
    nodes, a, b, inits = [], "a", "b", []
    if ta:
        nodes.append(helper.make_node("Transpose", ["a"], ["at"], perm=swap))
        a = "at"
    if tb:
        nodes.append(helper.make_node("Transpose", ["b"], ["bt"], perm=swap))
        b = "bt"
    nodes.append(helper.make_node("MatMul", [a, b], ["m"]))
    out = "m"
    if scale is not None:
        op, value = scale
        inits.append(tensor("s", np.float32(value)))
        nodes.append(helper.make_node(op, ["m", "s"], ["ms"]))
        out = "ms"
    if softmax:
        nodes.append(helper.make_node("Softmax", [out], ["sm"], axis=-1))
        out = "sm"
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    outputs = [vinfo("y", shape=(*batch, 4, 6))] + ([vinfo("m", shape=(*batch, 4, 6))] if extra_use else [])
    proto = make_model(nodes, [vinfo("a", shape=a_shape), vinfo("b", shape=b_shape)], outputs, inits)
    return proto, {"a": a_shape, "b": b_shape}


@pytest.mark.parametrize("ta,tb,scale,rank", [
    (True, False, None, 3), (False, True, None, 4), (True, True, None, 2),
    (False, False, ("Mul", 0.125), 3), (False, True, ("Div", 8.0), 4), (True, True, ("Mul", -2.0), 2),
])
def test_fused_matmul(rng, ta, tb, scale, rank):
    proto, shapes = _model(rng, ta=ta, tb=tb, scale=scale, rank=rank)
    model, result = fuse(proto, feeds_for(rng, **shapes), target="ort-cpu", family="ort")
    assert op_counts(model) == {"com.microsoft::FusedMatMul": 1, "Identity": 1}, result.details
    node = next(n for n in model.graph if n.op_type == "FusedMatMul")
    assert node.attributes.get_int("transA", 0) == ta and node.attributes.get_int("transB", 0) == tb
    expect_alpha = 1.0 if scale is None else (scale[1] if scale[0] == "Mul" else 1 / scale[1])
    assert node.attributes.get_float("alpha", 1.0) == pytest.approx(expect_alpha)


def test_scale_constant_first(rng):
    proto, shapes = _model(rng, scale=("Mul", 0.5))
    mul = proto.graph.node[1]
    mul.input[:] = [mul.input[1], mul.input[0]]
    model, _ = fuse(proto, feeds_for(rng, **shapes), target="ort-cpu", family="ort")
    assert "com.microsoft::FusedMatMul" in op_counts(model)


@pytest.mark.parametrize("kwargs", [
    {},  # a plain MatMul: nothing to gain
    {"ta": True, "perm": [1, 0, 2]},  # moves a batch axis
    {"tb": True, "softmax": True},  # attention scores: left to the Attention fusions
    {"scale": ("Mul", 0.5), "softmax": True},
    {"scale": ("Div", 0.0)},  # division by zero
    {"scale": ("Mul", 0.5), "extra_use": True},  # the unscaled product is used elsewhere
])
def test_fused_matmul_does_not_fire(rng, kwargs):
    proto, shapes = _model(rng, **kwargs)
    model, result = fuse(proto, feeds_for(rng, **shapes), target="ort-cpu", family="ort")
    assert not result.modified and "com.microsoft::FusedMatMul" not in op_counts(model), kwargs
