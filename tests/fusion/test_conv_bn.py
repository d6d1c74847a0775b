"""conv-bn: inference BatchNormalization folded into Conv / ConvTranspose / Gemm weights."""

from __future__ import annotations

import numpy as np
import pytest
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from gcomp.passes.fusion import Fuse
from gcomp.runtime import pass_context

from tests.conftest import assert_same_outputs, make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts


def _bn_inits(rng, c, prefix="bn"):
    return [
        tensor(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        tensor(f"{prefix}_b", rng.standard_normal(c).astype(np.float32)),
        tensor(f"{prefix}_m", rng.standard_normal(c).astype(np.float32)),
        tensor(f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(np.float32)),
    ]


def _bn(inp, out, prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [inp, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [out], name=prefix, **attrs)


def _conv_bn(rng, *, bias=True, group=1, rank=2, shared_w=False, extra_use=False, bn_param_input=False):
    cin, cout = 4, 6
    k = (3,) * rank
    spatial = (7,) * rank
    inits = [tensor("W", rng.standard_normal((cout, cin // group, *k)).astype(np.float32))]
    conv_in = ["x", "W"]
    if bias:
        inits.append(tensor("B", rng.standard_normal(cout).astype(np.float32)))
        conv_in.append("B")
    inits += _bn_inits(rng, cout)
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", group=group, pads=[1] * (2 * rank)),
             _bn("c", "y", epsilon=1e-3)]
    outputs = [vinfo("y", shape=(2, cout, *spatial))]
    inputs = [vinfo("x", shape=(2, cin, *spatial))]
    if shared_w:  # a second Conv reads the same W: it must keep its weights
        nodes.append(helper.make_node("Conv", ["x", "W"], ["z"], name="conv2", group=group, pads=[1] * (2 * rank)))
        outputs.append(vinfo("z", shape=(2, cout, *spatial)))
    if extra_use:
        outputs.append(vinfo("c", shape=(2, cout, *spatial)))
    if bn_param_input:  # gamma is a graph input: not a constant
        inits = [i for i in inits if i.name != "bn_g"]
        inputs.append(vinfo("bn_g", shape=(cout,)))
    return make_model(nodes, inputs, outputs, inits), {"x": (2, cin, *spatial)}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group,rank", [(1, 2), (2, 2), (1, 1), (1, 3)])
def test_conv_bn_folds(rng, bias, group, rank):
    proto, shapes = _conv_bn(rng, bias=bias, group=group, rank=rank)
    model, result = fuse(proto, feeds_for(rng, **shapes))
    assert result.details["fired"] == {"conv-bn": 1}
    assert op_counts(model) == {"Conv": 1}
    (conv,) = list(model.graph)
    assert len(conv.inputs) == 3 and conv.inputs[2] is not None


def test_conv_bn_shared_weight_keeps_other_conv(rng):
    proto, shapes = _conv_bn(rng, shared_w=True)
    model, _ = fuse(proto, feeds_for(rng, **shapes))
    assert op_counts(model) == {"Conv": 2}
    convs = list(model.graph)
    assert convs[0].inputs[1] is not convs[1].inputs[1]
    original = next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == "W")
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), original)


def test_conv_bn_does_not_fire(rng):
    for kwargs in ({"extra_use": True}, {"bn_param_input": True}):
        proto, shapes = _conv_bn(rng, **kwargs)
        feeds = feeds_for(rng, **shapes)
        if kwargs.get("bn_param_input"):
            feeds["bn_g"] = rng.uniform(0.5, 1.5, 6).astype(np.float32)
        model, result = fuse(proto, feeds, explain=True)
        assert not result.modified and op_counts(model)["BatchNormalization"] == 1, kwargs
    assert any("not constants" in r for r in result.details["rules"]["conv-bn"]["near_misses"])


def test_training_mode_bn_does_not_fire(rng):
    proto, _ = _conv_bn(rng)
    proto.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    proto.opset_import[0].version = 15
    assert not Fuse(context=pass_context())(ir.serde.deserialize_model(proto)).modified


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_folds(rng, group):
    cin, cout = 4, 6
    inits = [tensor("W", rng.standard_normal((cin, cout // group, 3, 3)).astype(np.float32)),
             tensor("B", rng.standard_normal(cout).astype(np.float32)), *_bn_inits(rng, cout)]
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], group=group, strides=[2, 2]), _bn("c", "y")]
    proto = make_model(nodes, [vinfo("x", shape=(2, cin, 5, 5))], [vinfo("y", shape=(2, cout, 11, 11))], inits)
    model, _ = fuse(proto, feeds_for(rng, x=(2, cin, 5, 5)))
    assert op_counts(model) == {"ConvTranspose": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [False, True])
def test_gemm_bn_folds(rng, trans_b, with_c):
    k, n = 5, 6
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [tensor("W", w), *_bn_inits(rng, n)]
    gemm_in = ["x", "W"]
    if with_c:
        inits.append(tensor("C", rng.standard_normal(n).astype(np.float32)))
        gemm_in.append("C")
    nodes = [helper.make_node("Gemm", gemm_in, ["g"], transB=trans_b, alpha=0.5, beta=2.0), _bn("g", "y")]
    proto = make_model(nodes, [vinfo("x", shape=(3, k))], [vinfo("y", shape=(3, n))], inits)
    model, _ = fuse(proto, feeds_for(rng, x=(3, k)))
    assert op_counts(model) == {"Gemm": 1}


def test_conv_bn_folds_inside_an_if_branch(rng):
    """Subgraphs are fused too; the new weights become initializers of the branch."""
    inner, shapes = _conv_bn(rng)
    then_graph = helper.make_graph(list(inner.graph.node), "then", [], [vinfo("y", shape=(2, 6, 7, 7))])
    else_graph = helper.make_graph([helper.make_node("Conv", ["x", "W", "B"], ["z"], pads=[1, 1, 1, 1])], "else", [],
                                   [vinfo("z", shape=(2, 6, 7, 7))])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph)
    proto = make_model([node], [vinfo("x", shape=shapes["x"]), vinfo("cond", TensorProto.BOOL, shape=())],
                       [vinfo("out", shape=(2, 6, 7, 7))], list(inner.graph.initializer))
    feeds = feeds_for(rng, **shapes)
    feeds["cond"] = np.array(True)
    model, result = fuse(proto, feeds)
    assert result.details["fired"] == {"conv-bn": 1}
    assert op_counts(model) == {"If": 1, "Conv": 2}
    feeds["cond"] = np.array(False)  # the else branch still reads the original W and B
    assert_same_outputs(proto, model, feeds, rtol=1e-5, atol=1e-5)
