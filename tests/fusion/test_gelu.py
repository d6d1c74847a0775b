"""Gelu fusion: decomposed erf/tanh GELU -> Gelu-20 (portable) / com.microsoft ops (ORT)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

SHAPE = (2, 8, 16)


def _erf_gelu(opset=20, *, extra_use=False, wrong_const=False, bias=False):
    k = 1.0 if wrong_const else math.sqrt(2.0)
    nodes = []
    x = "x"
    inits = [tensor("k", np.float32(k)), tensor("one", np.float32(1)), tensor("half", np.float32(0.5))]
    if bias:
        inits.append(tensor("b", np.linspace(-1, 1, SHAPE[-1]).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["x", "b"], ["xb"], name="bias"))
        x = "xb"
    nodes += [
        helper.make_node("Div", [x, "k"], ["d"], name="div"),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="add"),
        helper.make_node("Mul", [x, "a"], ["m"], name="mul"),
        helper.make_node("Mul", ["m", "half"], ["y"], name="half"),
    ]
    outputs = [vinfo("y", shape=SHAPE)]
    if extra_use:
        outputs.append(vinfo("e", shape=SHAPE))
    return make_model(nodes, [vinfo("x", shape=SHAPE)], outputs, inits, opset=opset)


def _tanh_gelu(opset=20, cube="pow"):
    c = math.sqrt(2 / math.pi)
    inits = [tensor("three", np.float32(3)), tensor("c1", np.float32(0.044715)), tensor("c2", np.float32(c)),
             tensor("one", np.float32(1)), tensor("half", np.float32(0.5))]
    if cube == "pow":
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])]
    else:
        nodes = [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x2", "x"], ["x3"])]
    nodes += [
        helper.make_node("Mul", ["c1", "x3"], ["t"]),  # constant first: the commuted variant
        helper.make_node("Add", ["x", "t"], ["u"]),
        helper.make_node("Mul", ["u", "c2"], ["v"]),
        helper.make_node("Tanh", ["v"], ["w"]),
        helper.make_node("Add", ["w", "one"], ["z"]),
        helper.make_node("Mul", ["x", "half"], ["hx"]),
        helper.make_node("Mul", ["hx", "z"], ["y"]),
    ]
    return make_model(nodes, [vinfo("x", shape=SHAPE)], [vinfo("y", shape=SHAPE)], inits, opset=opset)


def test_erf_gelu_to_onnx_gelu(rng):
    model, result = fuse(_erf_gelu(), feeds_for(rng, x=SHAPE))
    assert result.modified and result.details["fired"] == {"gelu-erf": 1}
    assert op_counts(model) == {"Gelu": 1}


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_tanh_gelu_to_onnx_gelu_tanh(rng, cube):
    model, _ = fuse(_tanh_gelu(cube=cube), feeds_for(rng, x=SHAPE))
    (node,) = list(model.graph)
    assert node.op_type == "Gelu" and node.attributes["approximate"].as_string() == "tanh"


def test_gelu_not_emitted_above_model_opset(rng):
    model, result = fuse(_erf_gelu(opset=17), feeds_for(rng, x=SHAPE), explain=True)
    assert not result.modified and "Gelu" not in op_counts(model)
    assert "opset is 17" in result.details["rules"]["gelu-erf"]["not_run"]


def test_gelu_wrong_constant_or_shared_intermediate_does_not_fire(rng):
    for proto in (_erf_gelu(wrong_const=True), _erf_gelu(extra_use=True)):
        model, result = fuse(proto, feeds_for(rng, x=SHAPE))
        assert not result.modified and "Gelu" not in op_counts(model)


def test_ort_bias_gelu_any_opset(rng):
    model, result = fuse(_erf_gelu(opset=17, bias=True), feeds_for(rng, x=SHAPE), target="ort-cpu", family="ort")
    assert op_counts(model) == {"com.microsoft::BiasGelu": 1}, result.details


def test_ort_fast_gelu_from_tanh(rng):
    model, _ = fuse(_tanh_gelu(opset=17), feeds_for(rng, x=SHAPE), target="ort-cpu", family="ort")
    assert op_counts(model) == {"com.microsoft::FastGelu": 1}


def test_gelu_fuses_inside_if_branches_and_functions(rng):
    """Rules walk If/Loop/Scan bodies and model functions, not only the main graph."""
    from onnx import TensorProto

    body_nodes = _erf_gelu().graph.node
    inits = list(_erf_gelu().graph.initializer)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in inits]
    then_g = helper.make_graph(list(body_nodes), "then", [], [vinfo("y", shape=SHAPE)])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [], [vinfo("y2", shape=SHAPE)])
    func = helper.make_function("local", "MyGelu", ["x"], ["y"], consts + list(body_nodes),
                                [helper.make_opsetid("", 20)])
    nodes = consts + [
        helper.make_node("If", ["c"], ["yi"], then_branch=then_g, else_branch=else_g),
        helper.make_node("MyGelu", ["x"], ["yf"], domain="local"),
    ]
    proto = make_model(nodes, [vinfo("x", shape=SHAPE), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       [vinfo("yi", shape=SHAPE), vinfo("yf", shape=SHAPE)], opset=20, functions=[func],
                       extra_opsets=[helper.make_opsetid("local", 1)])
    feeds = {**feeds_for(rng, x=SHAPE), "c": np.array(True)}
    model, result = fuse(proto, feeds)
    assert result.details["fired"] == {"gelu-erf": 2}, result.details
    assert op_counts(model)["Gelu"] == 2 and "Erf" not in op_counts(model)
