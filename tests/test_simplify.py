"""Simplification rules: each proven on ORT before/after, with structure and no-op checks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gcomp.pipeline import registry  # importing the pipeline registers the built-in passes
from gcomp.passes.simplify import RULES
from tests.conftest import assert_same_outputs, make_model, tensor, vinfo

X = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
X3 = vinfo("x", shape=(2, 3, 4))


def simplify(proto):
    """infer-shapes then simplify, as O1 runs them (rules read dtypes and static shapes)."""
    model = ir.from_proto(proto)
    registry.get_pass("infer-shapes").create()(model)
    result = registry.get_pass("simplify").create()(model)
    return result, ir.to_proto(model)


def ops(proto):
    return [n.op_type for n in proto.graph.node]


def with_tail(node, inits=(), out_shape=(2, 3, 4)):
    """``node`` followed by Relu, so the rewritten value is not itself a graph output."""
    return make_model([node, helper.make_node("Relu", ["t"], ["y"], name="tail")], [X3], [vinfo("y", shape=out_shape)], list(inits))


CASES = {
    "cast-same": (helper.make_node("Cast", ["x"], ["t"], to=TensorProto.FLOAT, name="n"), []),
    "reshape-same": (helper.make_node("Reshape", ["x", "s"], ["t"], name="n"), [tensor("s", np.array([2, 0, -1], np.int64))]),
    "expand-same": (helper.make_node("Expand", ["x", "s"], ["t"], name="n"), [tensor("s", np.array([3, 1], np.int64))]),
    "transpose-identity": (helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 2], name="n"), []),
    "concat-one": (helper.make_node("Concat", ["x"], ["t"], axis=-2, name="n"), []),
    "dropout-inference": (helper.make_node("Dropout", ["x", "r"], ["t"], name="n"), [tensor("r", np.float32(0.5))]),
    "pad-zero": (helper.make_node("Pad", ["x", "p"], ["t"], name="n"), [tensor("p", np.zeros(6, np.int64))]),
    "slice-all": (
        helper.make_node("Slice", ["x", "st", "en"], ["t"], name="n"),
        [tensor("st", np.array([0, -3], np.int64)), tensor("en", np.array([2**62, 3], np.int64))],
    ),
    "mul-one": (helper.make_node("Mul", ["one", "x"], ["t"], name="n"), [tensor("one", np.ones((1, 1), np.float32))]),
    "add-zero": (helper.make_node("Add", ["x", "zero"], ["t"], name="n"), [tensor("zero", np.zeros(1, np.float32))]),
    "sub-zero": (helper.make_node("Sub", ["x", "zero"], ["t"], name="n"), [tensor("zero", np.float32(0))]),
    # A zero bias / unit scale per channel on x's own static dims (random-init exports).
    "add-zero-bias": (helper.make_node("Add", ["zero", "x"], ["t"], name="n"), [tensor("zero", np.zeros(4, np.float32))]),
    "mul-one-per-row": (helper.make_node("Mul", ["x", "one"], ["t"], name="n"), [tensor("one", np.ones((3, 1), np.float32))]),
    "div-one": (helper.make_node("Div", ["x", "one"], ["t"], name="n"), [tensor("one", np.float32(1))]),
    "pow-one": (helper.make_node("Pow", ["x", "one"], ["t"], name="n"), [tensor("one", np.float32(1))]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_op_is_removed_exactly(case):
    node, inits = CASES[case]
    proto = with_tail(node, inits)
    result, after = simplify(proto)
    assert result.modified, case
    assert ops(after) == ["Relu"], ops(after)
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)


KEPT = {
    # The constant is not the identity everywhere.
    "mul-not-one": (helper.make_node("Mul", ["x", "c"], ["t"], name="n"), [tensor("c", np.array([1, 1, 1, 2], np.float32))], (2, 3, 4)),
    # Broadcasting would change x's shape.
    "add-broadcasts": (helper.make_node("Add", ["x", "z"], ["t"], name="n"), [tensor("z", np.zeros((5, 1, 1, 1), np.float32))], (5, 2, 3, 4)),
    # 0 - x is not x.
    "zero-minus-x": (helper.make_node("Sub", ["z", "x"], ["t"], name="n"), [tensor("z", np.float32(0))], (2, 3, 4)),
    "reshape-changes": (helper.make_node("Reshape", ["x", "s"], ["t"], name="n"), [tensor("s", np.array([6, 4], np.int64))], (6, 4)),
    "slice-part": (helper.make_node("Slice", ["x", "st", "en"], ["t"], name="n"), [tensor("st", np.array([1], np.int64)), tensor("en", np.array([2], np.int64))], (1, 3, 4)),
    "cast-other": (helper.make_node("Cast", ["x"], ["t"], to=TensorProto.DOUBLE, name="n"), [], (2, 3, 4)),
    "concat-two": (helper.make_node("Concat", ["x", "x"], ["t"], axis=0, name="n"), [], (4, 3, 4)),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_non_identities_are_kept(case):
    node, inits, shape = KEPT[case]
    out_type = TensorProto.DOUBLE if case == "cast-other" else TensorProto.FLOAT
    proto = make_model([node, helper.make_node("Relu", ["t"], ["y"], name="tail")], [X3], [vinfo("y", out_type, shape)], inits)
    result, after = simplify(proto)
    assert not result.modified
    assert len(after.graph.node) == 2


def test_a_zero_bias_on_a_symbolic_dim_is_kept():
    """x [b, n] + zeros(4): n may be 1 at run time, and then the Add broadcasts x to [b, 4]."""
    nodes = [helper.make_node("Add", ["x", "zero"], ["t"], name="n"), helper.make_node("Relu", ["t"], ["y"], name="tail")]
    proto = make_model(nodes, [vinfo("x", shape=("b", "n"))], [vinfo("y", shape=("b", 4))],
                       [tensor("zero", np.zeros(4, np.float32))])
    result, after = simplify(proto)
    assert not result.modified and ops(after) == ["Add", "Relu"]


def test_transpose_chain_merges_and_cancels():
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0, 2], name="t1"),
        helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1], name="t2"),
        helper.make_node("Relu", ["b"], ["y"], name="tail"),
    ]
    proto = make_model(nodes, [X3], [vinfo("y", shape=(3, 4, 2))])
    result, after = simplify(proto)
    assert result.modified and ops(after) == ["Transpose", "Relu"]
    assert list(after.graph.node[0].attribute[0].ints) == [1, 2, 0]
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)
    back = make_model(
        [helper.make_node("Transpose", ["x"], ["a"], perm=[2, 0, 1], name="t1"),
         helper.make_node("Transpose", ["a"], ["b"], perm=[1, 2, 0], name="t2"),
         helper.make_node("Relu", ["b"], ["y"], name="tail")],
        [X3], [vinfo("y", shape=(2, 3, 4))],
    )
    _, after = simplify(back)
    assert ops(after) == ["Relu"]
    assert_same_outputs(back, after, {"x": X}, rtol=0, atol=0)


def test_reshape_chain_merges_and_squeeze_pairs_cancel():
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["a"], name="r1"),
        helper.make_node("Reshape", ["a", "s2"], ["b"], name="r2"),
        helper.make_node("Unsqueeze", ["b", "ax"], ["c"], name="u"),
        helper.make_node("Squeeze", ["c", "ax"], ["d"], name="s"),
        helper.make_node("Relu", ["d"], ["y"], name="tail"),
    ]
    proto = make_model(
        nodes, [X3], [vinfo("y", shape=(4, 6))],
        [tensor("s1", np.array([6, 4], np.int64)), tensor("s2", np.array([4, 6], np.int64)), tensor("ax", np.array([1], np.int64))],
    )
    result, after = simplify(proto)
    assert result.modified and ops(after) == ["Reshape", "Relu"]
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)


@pytest.mark.parametrize("cond", [True, False])
def test_constant_if_is_inlined(cond):
    then = helper.make_graph([helper.make_node("Add", ["x", "x"], ["o1"], name="tadd")], "then", [], [vinfo("o1", shape=(2, 3, 4))])
    other = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["o2"], name="emul")], "else", [], [vinfo("o2", shape=(2, 3, 4))],
        [tensor("k", np.float32(3))],
    )
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    proto = make_model(nodes, [X3], [vinfo("y", shape=(2, 3, 4))], [tensor("c", np.array(cond))])
    result, after = simplify(proto)
    assert result.modified
    assert ops(after) == (["Add"] if cond else ["Constant", "Mul"])
    assert [o.name for o in after.graph.output] == ["y"]
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)


def test_constant_if_returning_its_branch_initializer_is_inlined():
    # fold-constants makes a branch's returned Constant the branch's own initializer.
    then = helper.make_graph([], "then", [], [vinfo("k", shape=(4,))], [tensor("k", np.arange(4, dtype=np.float32))])
    other = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["e"], axes=[0, 1], keepdims=0, name="m")], "else", [],
                              [vinfo("e", shape=(4,))])
    nodes = [
        helper.make_node("If", ["c"], ["w"], then_branch=then, else_branch=other, name="if"),
        helper.make_node("Add", ["w", "x"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [X3], [vinfo("y", shape=(2, 3, 4)), vinfo("w", shape=(4,))], [tensor("c", np.array(True))])
    result, after = simplify(proto)
    assert result.modified and ops(after) == ["Constant", "Add"]
    assert [o.name for o in after.graph.output] == ["y", "w"]
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)


def test_rewritten_graph_output_keeps_its_name():
    # y = Cast(x) to its own type, and y is a graph output fed by a graph input:
    # the node must stay (a graph input cannot take an output's name).
    proto = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, name="n")], [X3], [vinfo("y", shape=(2, 3, 4))])
    result, after = simplify(proto)
    assert not result.modified and [o.name for o in after.graph.output] == ["y"]
    # Fed by a node, the producer takes the output's place and name.
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="r"), helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT, name="n")],
        [X3], [vinfo("y", shape=(2, 3, 4))],
    )
    result, after = simplify(proto)
    assert result.modified and ops(after) == ["Relu"] and [o.name for o in after.graph.output] == ["y"]
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)


def test_every_rule_is_exercised():
    covered = {"Cast", "Reshape", "Expand", "Concat", "Transpose", "Dropout", "Pad", "Slice", "Squeeze", "Unsqueeze", "Mul", "Div", "Pow", "Add", "Sub", "If"}
    assert set(RULES) == covered


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("a,b", [([1], [2]), ([0], [0]), ([-1], [1]), ([0, 2], [1, -1]), ([1], [0, 3])])
def test_unsqueeze_chain_merges(rng, opset, a, b):
    from onnx import helper

    from tests.conftest import assert_same_outputs, make_model, tensor, vinfo

    if opset >= 13:
        nodes = [helper.make_node("Unsqueeze", ["x", "a"], ["u"]), helper.make_node("Unsqueeze", ["u", "b"], ["y"])]
        inits = [tensor("a", np.array(a, np.int64)), tensor("b", np.array(b, np.int64))]
    else:
        nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=a), helper.make_node("Unsqueeze", ["u"], ["y"], axes=b)]
        inits = []
    proto = make_model(nodes, [vinfo("x", shape=(3, 4))], [helper.make_tensor_value_info("y", 1, None)], inits,
                       opset=opset)
    model = ir.serde.deserialize_model(proto)
    from gcomp.passes.simplify import Simplify

    assert Simplify()(model).modified
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == ["Unsqueeze"]
    assert_same_outputs(proto, model, {"x": rng.standard_normal((3, 4)).astype(np.float32)})


INT64_MAX = np.iinfo(np.int64).max


def _in_branch(nodes, inits, out_shape, x_shape=("batch", 3, 4)):
    """``nodes`` (reading x, writing t) in the then-branch of an If on sum(x) > 0, the
    branch's constants its own initializers; the else-branch returns Neg(x)."""
    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else list(shape))

    then = helper.make_graph([*nodes, helper.make_node("Relu", ["t"], ["o1"], name="tail")], "then", [],
                             [info("o1", out_shape)], list(inits))
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["o2"], name="neg")], "else", [], [info("o2", x_shape)])
    graph = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    return make_model(graph, [info("x", x_shape)], [info("y", None)], [tensor("zero", np.float32(0))])


def _then_ops(proto):
    then = next(a.g for a in proto.graph.node[2].attribute if a.name == "then_branch")
    return [n.op_type for n in then.node]


def _both_branches(before, after, batch=2):
    x = np.abs(np.random.default_rng(batch).standard_normal((batch, 3, 4)).astype(np.float32))
    for sign in (1, -1):
        assert_same_outputs(before, after, {"x": sign * x}, rtol=0, atol=0)


def _ints(name, values):
    return tensor(name, np.array(values, np.int64))


def test_full_slices_of_symbolic_dims_are_removed_in_a_branch():
    # x[:, :] the exporters' way (INT64_MAX ends, on the symbolic batch), and x[-2**62:] on an
    # axis of unknown size (rank unknown too).
    nodes = [helper.make_node("Slice", ["x", "z", "big", "z", "one"], ["t"], name="s")]
    inits = [_ints("z", [0]), _ints("big", [INT64_MAX]), _ints("one", [1])]
    for x_shape in (("batch", 3, 4), None):
        proto = _in_branch(nodes, inits, ("batch", 3, 4), x_shape)
        result, after = simplify(proto)
        assert result.modified and _then_ops(after) == ["Relu"]
        _both_branches(proto, after, batch=3)
    nodes = [helper.make_node("Slice", ["x", "start", "big", "two"], ["t"], name="s")]
    proto = _in_branch(nodes, [_ints("start", [-(2**62)]), _ints("big", [2**62]), _ints("two", [2])], None, None)
    result, after = simplify(proto)
    assert result.modified and _then_ops(after) == ["Relu"]
    _both_branches(proto, after)


@pytest.mark.parametrize("start,end,step", [(0, 1000, 1), (1, INT64_MAX, 1), (0, INT64_MAX, 2), (-1000, INT64_MAX, 1)])
def test_slices_that_may_cut_a_symbolic_dim_are_kept(start, end, step):
    nodes = [helper.make_node("Slice", ["x", "st", "en", "z", "sp"], ["t"], name="s")]
    inits = [_ints("st", [start]), _ints("en", [end]), _ints("z", [0]), _ints("sp", [step])]
    proto = _in_branch(nodes, inits, (None, 3, 4))
    result, after = simplify(proto)
    assert not result.modified and _then_ops(after) == ["Slice", "Relu"]
    # On a batch of 1001 each of these slices drops rows, so removing one would show.
    x = np.abs(np.random.default_rng(0).standard_normal((1001, 3, 4)).astype(np.float32))
    assert_same_outputs(proto, after, {"x": x}, rtol=0, atol=0)


def test_slices_of_different_axes_merge_into_one():
    nodes = [
        helper.make_node("Slice", ["x", "s1", "e1", "a1"], ["u"], name="first"),  # x[:, 1:3]
        helper.make_node("Slice", ["u", "s2", "e2", "a2", "st2"], ["t"], name="second"),  # [..., ::-2] on axis -1
    ]
    inits = [_ints("s1", [1]), _ints("e1", [3]), _ints("a1", [1]),
             _ints("s2", [-1]), _ints("e2", [-INT64_MAX]), _ints("a2", [-1]), _ints("st2", [-2])]
    proto = _in_branch(nodes, inits, ("batch", 2, 2))
    result, after = simplify(proto)
    assert result.modified and _then_ops(after) == ["Slice", "Relu"]
    then = next(a.g for a in after.graph.node[2].attribute if a.name == "then_branch")
    made = {i.name: list(onnx.numpy_helper.to_array(i)) for i in then.initializer if i.name.startswith("second_")}
    assert made == {"second_starts": [1, -1], "second_ends": [3, -INT64_MAX], "second_axes": [1, 2], "second_steps": [1, -2]}
    assert not [i for i in after.graph.initializer if i.name.startswith("second_")]  # in the branch, not the main graph
    onnx.checker.check_model(after, full_check=True)
    _both_branches(proto, after)


@pytest.mark.parametrize("case", ["same-axis", "negative-axis-rank-unknown", "inner-used-twice"])
def test_slices_that_cannot_merge_stay_two(case):
    second_axis = {"same-axis": 1, "negative-axis-rank-unknown": -1, "inner-used-twice": 2}[case]
    nodes = [
        helper.make_node("Slice", ["x", "s1", "e1", "a1"], ["u"], name="first"),
        helper.make_node("Slice", ["u", "s2", "e2", "a2"], ["v"], name="second"),
        helper.make_node("Add", ["v", "u" if case == "inner-used-twice" else "v"], ["t"], name="add"),
    ]
    inits = [_ints("s1", [1]), _ints("e1", [3]), _ints("a1", [1]), _ints("s2", [0]), _ints("e2", [1]),
             _ints("a2", [second_axis])]
    x_shape = None if case == "negative-axis-rank-unknown" else ("batch", 3, 4)
    proto = _in_branch(nodes, inits, None, x_shape)
    _, after = simplify(proto)
    assert _then_ops(after).count("Slice") == 2
    _both_branches(proto, after)
