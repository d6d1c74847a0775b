"""bias-residual-sum: (y + constant) + r -> Sum(y, constant, r), not for ort-cuda / TVM."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

S = (2, 3, 8)


def _block(rng, *, outer="Add", bias_first=False, inner_first=True, bias=(8,), shared=False, const_residual=False):
    """x @ W, + bias, + residual (optionally a second use of the biased value)."""
    inner = ["c", "mm"] if bias_first else ["mm", "c"]
    outer_in = ["biased", "r"] if inner_first else ["r", "biased"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", inner, ["biased"]),
             helper.make_node(outer, outer_in, ["y"])]
    outputs = [vinfo("y", shape=S)]
    if shared:
        nodes.append(helper.make_node("Relu", ["biased"], ["side"]))
        outputs.append(vinfo("side", shape=S))
    inits = [tensor("w", rng.standard_normal((8, 8)).astype(np.float32)),
             tensor("c", rng.standard_normal(bias).astype(np.float32))]
    inputs = [vinfo("x", shape=S)]
    if const_residual:
        inits.append(tensor("r", rng.standard_normal(S).astype(np.float32)))
    else:
        inputs.append(vinfo("r", shape=S))
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("outer", ["Add", "Sum"])
@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("inner_first", [True, False])
@pytest.mark.parametrize("bias", [(8,), (1, 1, 8), ()])
def test_bias_and_residual_become_one_sum(rng, outer, bias_first, inner_first, bias):
    proto = _block(rng, outer=outer, bias_first=bias_first, inner_first=inner_first, bias=bias)
    model, result = fuse(proto, feeds_for(rng, x=S, r=S))
    assert result.details["fired"].get("bias-residual-sum") == 1
    assert op_counts(model) == {"MatMul": 1, "Sum": 1}
    (s,) = [n for n in model.graph if n.op_type == "Sum"]
    assert len(s.inputs) == 3


def test_not_fired_when_the_biased_value_is_used_elsewhere_or_nothing_is_computed(rng):
    model, result = fuse(_block(rng, shared=True), feeds_for(rng, x=S, r=S))
    assert "bias-residual-sum" not in result.details["fired"] and op_counts(model)["Add"] == 2
    # A constant "residual" is a second bias (constant folding's business), not a residual.
    model, result = fuse(_block(rng, const_residual=True), feeds_for(rng, x=S))
    assert "bias-residual-sum" not in result.details["fired"]


@pytest.mark.parametrize("target", ["ort-cuda", "tvm-llvm"])
def test_not_for_targets_where_the_pair_is_faster(rng, target):
    model, result = fuse(_block(rng), feeds_for(rng, x=S, r=S), target=target)
    assert "bias-residual-sum" not in result.details["fired"] and op_counts(model)["Add"] == 2
