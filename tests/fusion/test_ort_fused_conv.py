"""ort-fused-conv: Conv(+bias) + activation -> com.microsoft FusedConv, proven on ORT."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gcomp.passes.fusion import FuseTarget
from gcomp.runtime import pass_context
from gcomp.passes.shapes import InferShapes
from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

X, Y = (2, 3, 8, 8), (2, 4, 8, 8)


def _conv_act(rng, act, *, attrs=None, act_inputs=(), inits=(), bias=True, extra_use=False, opset=17,
              dtype=np.float32):
    conv_in = ["x", "W"] + (["B"] if bias else [])
    all_inits = [tensor("W", rng.standard_normal((4, 3, 3, 3)).astype(dtype)),
                 tensor("B", rng.standard_normal(4).astype(dtype)), *inits]
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node(act, ["c", *act_inputs], ["y"], name="act", **(attrs or {}))]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    outputs = [vinfo("y", elem, Y)] + ([vinfo("c", elem, Y)] if extra_use else [])
    return make_model(nodes, [vinfo("x", elem, X)], outputs, all_inits, opset=opset)


CASES = {
    "relu": ("Relu", {}, (), ()),
    "sigmoid": ("Sigmoid", {}, (), ()),
    "tanh": ("Tanh", {}, (), ()),
    "leaky": ("LeakyRelu", {"alpha": 0.2}, (), ()),
    "leaky-default": ("LeakyRelu", {}, (), ()),
    "hardsigmoid": ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, (), ()),
    "relu6": ("Clip", {}, ("lo", "hi"), (tensor("lo", np.float32(0)), tensor("hi", np.float32(6)))),
    "clip-max-only": ("Clip", {}, ("", "hi"), (tensor("hi", np.float32(0.5)),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conv_activation_to_fused_conv(rng, case):
    act, attrs, act_inputs, inits = CASES[case]
    proto = _conv_act(rng, act, attrs=attrs, act_inputs=act_inputs, inits=inits, bias=case != "tanh")
    model, result = fuse(proto, feeds_for(rng, x=X), target="ort-cpu", family="ort")
    assert result.details["fired"] == {"ort-fused-conv": 1}
    assert op_counts(model) == {"com.microsoft::FusedConv": 1}
    (node,) = list(model.graph)
    assert node.attributes["activation"].as_string() == act
    assert list(node.attributes["pads"].as_ints()) == [1, 1, 1, 1]


def test_clip_attribute_form_opset_6(rng):
    proto = _conv_act(rng, "Clip", attrs={"min": -1.0, "max": 1.0}, opset=10)
    model, _ = fuse(proto, feeds_for(rng, x=X), target="ort-cpu", family="ort")
    (node,) = list(model.graph)
    assert list(node.attributes["activation_params"].as_floats()) == [-1.0, 1.0]


def test_fused_conv_does_not_fire(rng):
    feeds = feeds_for(rng, x=X)
    cases = [
        _conv_act(rng, "Relu", extra_use=True),  # the Conv output is also a graph output
        _conv_act(rng, "Clip", act_inputs=("lo", "hi"), inits=(tensor("lo", np.float32(0)),)),  # hi not constant
    ]
    for i, proto in enumerate(cases):
        if i == 1:
            proto.graph.input.append(vinfo("hi", shape=()))
        f = dict(feeds, **({"hi": np.array(6, np.float32)} if i == 1 else {}))
        model, result = fuse(proto, f, target="ort-cpu", family="ort")
        assert not result.modified and "com.microsoft::FusedConv" not in op_counts(model)
    # float64: ORT has no FusedConv kernel for it (nor a Conv one: structural check only).
    model = ir.serde.deserialize_model(_conv_act(rng, "Relu", dtype=np.float64))
    InferShapes()(model)
    assert not FuseTarget(target="ort-cpu", context=pass_context())(model).modified


def test_cuda_target_fuses_relu_only(rng):
    for act, expect in (("Relu", True), ("Sigmoid", False)):
        model = ir.serde.deserialize_model(_conv_act(rng, act))
        assert FuseTarget(target="ort-cuda", context=pass_context())(model).modified == expect, act


def test_portable_target_does_not_fuse(rng):
    model, result = fuse(_conv_act(rng, "Relu"), feeds_for(rng, x=X), target="portable", family="ort")
    assert not result.modified and op_counts(model) == {"Conv": 1, "Relu": 1}
