"""bias: constant Add after Conv/ConvTranspose/Gemm -> bias input; MatMul + bias -> Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

CIN, COUT, HW = 3, 5, 6


def _conv_add(rng, bias_shape, *, conv_bias=True, bias_first=False, rank=2, extra_use=False, op_type="Conv"):
    spatial = (HW,) * rank
    if op_type == "Conv":
        w = rng.standard_normal((COUT, CIN, *(3,) * rank)).astype(np.float32)
        out_spatial = tuple(s - 2 for s in spatial)
    else:
        w = rng.standard_normal((CIN, COUT, *(3,) * rank)).astype(np.float32)
        out_spatial = tuple(s + 2 for s in spatial)
    inits = [tensor("W", w), tensor("b", rng.standard_normal(bias_shape).astype(np.float32))]
    conv_in = ["x", "W"]
    if conv_bias:
        inits.append(tensor("B", rng.standard_normal(COUT).astype(np.float32)))
        conv_in.append("B")
    nodes = [helper.make_node(op_type, conv_in, ["c"], name="conv"),
             helper.make_node("Add", ["b", "c"] if bias_first else ["c", "b"], ["y"], name="add")]
    outputs = [vinfo("y", shape=(2, COUT, *out_spatial))]
    if extra_use:
        outputs.append(vinfo("c", shape=(2, COUT, *out_spatial)))
    return make_model(nodes, [vinfo("x", shape=(2, CIN, *spatial))], outputs, inits), {"x": (2, CIN, *spatial)}


@pytest.mark.parametrize("bias_shape,conv_bias,bias_first,rank", [
    ((COUT, 1, 1), True, False, 2),
    ((1, COUT, 1, 1), False, True, 2),
    ((), True, False, 2),
    ((COUT, 1), False, False, 1),
    ((1, COUT, 1, 1, 1), True, True, 3),
])
def test_conv_bias_add_folds(rng, bias_shape, conv_bias, bias_first, rank):
    proto, shapes = _conv_add(rng, bias_shape, conv_bias=conv_bias, bias_first=bias_first, rank=rank)
    model, result = fuse(proto, feeds_for(rng, **shapes))
    assert result.details["fired"] == {"bias": 1}
    assert op_counts(model) == {"Conv": 1}
    (conv,) = list(model.graph)
    assert conv.inputs[2].const_value.shape == (COUT,)


def test_conv_transpose_bias_add_folds(rng):
    proto, shapes = _conv_add(rng, (COUT, 1, 1), op_type="ConvTranspose")
    model, _ = fuse(proto, feeds_for(rng, **shapes))
    assert op_counts(model) == {"ConvTranspose": 1}


@pytest.mark.parametrize("bias_shape", [(1, 1, HW - 2, HW - 2), (2, COUT, 1, 1), (COUT,), (1, 1, COUT, 1, 1)])
def test_conv_bias_that_broadcasts_over_other_axes_does_not_fire(rng, bias_shape):
    # (COUT,) aligns with the last (spatial) axis: it is not a per-channel bias.
    if bias_shape == (COUT,):
        proto, shapes = _conv_add(rng, (HW - 2,))
    else:
        proto, shapes = _conv_add(rng, bias_shape)
    model, result = fuse(proto, feeds_for(rng, **shapes), explain=True)
    assert not result.modified and op_counts(model)["Add"] == 1
    assert result.details["rules"]["bias"]["near_misses"]


def test_conv_bias_intermediate_used_elsewhere_does_not_fire(rng):
    proto, shapes = _conv_add(rng, (COUT, 1, 1), extra_use=True)
    model, result = fuse(proto, feeds_for(rng, **shapes))
    assert not result.modified and op_counts(model)["Add"] == 1


def _gemm_add(rng, bias_shape, *, with_c=False, beta=1.0, trans_b=0, m=4, k=3, n=5):
    inits = [tensor("W", rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)),
             tensor("b", rng.standard_normal(bias_shape).astype(np.float32))]
    gemm_in = ["x", "W"]
    if with_c:
        inits.append(tensor("C", rng.standard_normal(n).astype(np.float32)))
        gemm_in.append("C")
    nodes = [helper.make_node("Gemm", gemm_in, ["g"], beta=beta, transB=trans_b),
             helper.make_node("Add", ["g", "b"], ["y"])]
    return make_model(nodes, [vinfo("x", shape=(m, k))], [vinfo("y", shape=(m, 5))], inits), {"x": (m, k)}


@pytest.mark.parametrize("bias_shape,with_c,beta,trans_b", [
    ((5,), False, 1.0, 0), ((1, 5), True, 0.5, 1), ((), True, 2.0, 0), ((1,), False, 3.0, 1),
])
def test_gemm_bias_add_folds_respecting_beta(rng, bias_shape, with_c, beta, trans_b):
    proto, shapes = _gemm_add(rng, bias_shape, with_c=with_c, beta=beta, trans_b=trans_b)
    model, _ = fuse(proto, feeds_for(rng, **shapes))
    assert op_counts(model) == {"Gemm": 1}
    (gemm,) = list(model.graph)
    assert gemm.inputs[2] is not None and "beta" not in gemm.attributes


def test_gemm_row_bias_does_not_fire(rng):
    proto, shapes = _gemm_add(rng, (4, 1))
    model, result = fuse(proto, feeds_for(rng, **shapes))
    assert not result.modified and op_counts(model)["Add"] == 1


def _matmul_add(rng, a_shape, b_shape, bias_shape, *, bias_first=False, const_b=True):
    inits = [tensor("b", rng.standard_normal(bias_shape).astype(np.float32))]
    inputs = [vinfo("a", shape=a_shape)]
    if const_b:
        inits.append(tensor("B", rng.standard_normal(b_shape).astype(np.float32)))
    else:
        inputs.append(vinfo("B", shape=b_shape))
    nodes = [helper.make_node("MatMul", ["a", "B"], ["m"]),
             helper.make_node("Add", ["b", "m"] if bias_first else ["m", "b"], ["y"])]
    out = (*a_shape[:-1], b_shape[-1])
    feeds = {"a": a_shape} if const_b else {"a": a_shape, "B": b_shape}
    return make_model(nodes, inputs, [vinfo("y", shape=out)], inits), feeds


@pytest.mark.parametrize("bias_shape,bias_first,const_b", [((6,), False, True), ((1, 6), True, False),
                                                            ((), False, True)])
def test_matmul_add_to_gemm(rng, bias_shape, bias_first, const_b):
    proto, shapes = _matmul_add(rng, ("batch", 4), (4, 6), bias_shape, bias_first=bias_first, const_b=const_b)
    shapes["a"] = (3, 4)
    model, result = fuse(proto, feeds_for(rng, **shapes))
    assert result.details["fired"] == {"matmul-add-gemm": 1}
    assert op_counts(model) == {"Gemm": 1}


@pytest.mark.parametrize("a_shape,bias_shape", [((2, 3, 4), (6,)), ((3, 4), (3, 6)), ((3, 4), (3, 1))])
def test_matmul_add_not_gemm_when_batched_or_row_bias(rng, a_shape, bias_shape):
    proto, shapes = _matmul_add(rng, a_shape, (4, 6), bias_shape)
    model, result = fuse(proto, feeds_for(rng, **shapes))
    assert not result.modified and op_counts(model) == {"MatMul": 1, "Add": 1}
