"""Constant and shape folding: numeric before/after on ORT, no-op cases, structure, size limits."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

import gcomp
from gcomp import runtime
from gcomp.pipeline import registry  # importing the pipeline registers the built-in passes
from tests.conftest import assert_same_outputs, make_model, tensor, vinfo

X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)


def fold(proto, **options):
    model = ir.from_proto(proto)
    result = registry.get_pass("fold-constants").create(context=runtime.pass_context(), **options)(model)
    return result, ir.to_proto(model)


def ops(proto):
    return [n.op_type for n in proto.graph.node]


def test_folds_constant_chains_into_initializers():
    nodes = [
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [2.0]), name="c"),
        helper.make_node("Mul", ["W", "two"], ["W2"], name="scale"),
        helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0], name="t"),
        helper.make_node("Sqrt", ["W2t"], ["Ws"], name="sqrt"),
        helper.make_node("MatMul", ["x", "Ws"], ["y"], name="mm"),
    ]
    w = np.abs(np.random.default_rng(1).standard_normal((4, 4))).astype(np.float32)
    proto = make_model(nodes, [vinfo("x")], [vinfo("y")], [tensor("W", w)])
    result, after = fold(proto)
    assert result.modified
    assert ops(after) == ["MatMul"]
    assert result.details["folded"] == 3 and result.details["folded_by_op"] == {"Mul": 1, "Transpose": 1, "Sqrt": 1}
    assert_same_outputs(proto, after, {"x": X}, rtol=1e-6, atol=1e-6)


def test_no_op_when_nothing_is_constant():
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vinfo("x")], [vinfo("y")])
    result, after = fold(proto)
    assert not result.modified and ops(after) == ["Relu"]


def test_never_folds_random_ops_or_overridable_initializers():
    nodes = [
        helper.make_node("RandomUniform", [], ["r"], shape=[3, 4], name="rand"),
        helper.make_node("Add", ["x", "r"], ["a"], name="add"),
        helper.make_node("Neg", ["B"], ["nb"], name="neg"),  # B is an initializer *and* an input
        helper.make_node("Add", ["a", "nb"], ["y"], name="add2"),
    ]
    proto = make_model(
        nodes, [vinfo("x", shape=(3, 4)), vinfo("B", shape=(3, 4))], [vinfo("y", shape=(3, 4))],
        [tensor("B", np.ones((3, 4), np.float32))],
    )
    result, after = fold(proto)
    assert not result.modified
    assert ops(after) == ["RandomUniform", "Add", "Neg", "Add"]


def test_size_limit_keeps_constant_of_shape_weights_small():
    # Two weights from unnamed nodes (as exporters write them): each is counted.
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["w"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("ConstantOfShape", ["shape"], ["w2"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
    ]
    proto = make_model(nodes, [vinfo("x", shape=(3, 256))], [vinfo("y", shape=(3, 256))], [tensor("shape", np.array([256, 256], np.int64))])
    result, after = fold(proto)
    assert not result.modified and ops(after).count("ConstantOfShape") == 2
    assert result.details["unfolded_by_reason"] == {"size": 2}
    assert [n["node"] for n in result.details["unfolded_nodes"]] == ["<ConstantOfShape>"] * 2
    assert result.details["unfolded_size_bytes"] == 2 * 256 * 256 * 4  # what lifting the limit would add
    assert "max_fold_bytes" in result.details["unfolded_nodes"][0]["reason"]
    assert after.ByteSize() < 2000
    # Asked for, it folds (and the model grows by the 256 KiB weight).
    result, big = fold(proto, max_fold_bytes=1 << 20)
    assert result.modified and ops(big) == ["MatMul"] * 2 and big.ByteSize() > 2 * 256 * 1024
    assert result.details["unfolded_size_bytes"] == 0
    feeds = {"x": np.ones((3, 256), np.float32)}
    assert_same_outputs(proto, big, feeds, rtol=1e-6, atol=1e-6)


def test_huge_outputs_are_never_allocated():
    # 10^12 elements: folding must refuse from the predicted size, before evaluating.
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], name="cos"),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Add", ["x", "s"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [vinfo("x", shape=())], [vinfo("y", shape=())], [tensor("shape", np.array([10**6, 10**6], np.int64))])
    result, _ = fold(proto)
    assert not result.modified
    assert result.details["unfolded_by_reason"]["size"] == 1


def test_shape_folding_keeps_symbolic_dims_symbolic():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "one"], ["d1"], axis=0, name="g1"),  # static dim 4
        helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0, name="g0"),  # symbolic batch
        helper.make_node("Unsqueeze", ["d0", "axes"], ["d0u"], name="u0"),
        helper.make_node("Unsqueeze", ["d1", "axes"], ["d1u"], name="u1"),
        helper.make_node("Mul", ["d1u", "two"], ["d1x2"], name="m"),
        helper.make_node("Concat", ["d0u", "d1x2"], ["target"], axis=0, name="cat"),
        helper.make_node("Concat", ["x", "x"], ["xx"], axis=1, name="xx"),
        helper.make_node("Reshape", ["xx", "target"], ["y"], name="reshape"),
    ]
    proto = make_model(
        nodes, [vinfo("x", shape=("batch", 4))], [vinfo("y", shape=("batch", 8))],
        [tensor("one", np.array(1, np.int64)), tensor("zero", np.array(0, np.int64)),
         tensor("axes", np.array([0], np.int64)), tensor("two", np.array([2], np.int64))],
    )
    result, after = fold(proto)
    assert result.modified
    remaining = ops(after)
    assert "Mul" not in remaining and remaining.count("Unsqueeze") == 1  # the static side folded
    assert "Shape" in remaining  # the batch dim stays symbolic
    for batch in (1, 5):
        xb = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        assert_same_outputs(proto, after, {"x": xb}, rtol=0, atol=0)


def test_fully_static_shape_chain_folds_away():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Size", ["x"], ["n"], name="size"),
        helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape"),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Add", ["y", "nf"], ["z"], name="add"),
    ]
    proto = make_model(nodes, [vinfo("x", shape=(3, 4))], [vinfo("z", shape=(3, 4))])
    result, after = fold(proto)
    assert result.modified and ops(after) == ["Reshape", "Add"]
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)


def test_folds_inside_subgraphs_with_outer_constants():
    body = helper.make_graph(
        [helper.make_node("Mul", ["W", "W"], ["w2"], name="sq"), helper.make_node("Add", ["x", "w2"], ["out"], name="add")],
        "then", [], [vinfo("out", shape=(3, 4))],
    )
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["o2"], name="neg")], "else", [], [vinfo("o2", shape=(3, 4))])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other, name="if"),
    ]
    proto = make_model(nodes, [vinfo("x", shape=(3, 4))], [vinfo("y", shape=(3, 4))],
                       [tensor("W", np.full((3, 4), 3, np.float32)), tensor("zero", np.float32(0))])
    result, after = fold(proto)
    assert result.modified
    then = next(a.g for a in after.graph.node[2].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Add"]  # the folded value is the branch's own initializer
    assert [i.name for i in then.initializer] == ["w2"] and not after.graph.initializer[2:]
    onnx.checker.check_model(after, full_check=True)
    for sign in (1, -1):
        assert_same_outputs(proto, after, {"x": sign * np.abs(X)}, rtol=0, atol=0)


def test_constant_nodes_become_initializers_but_outputs_stay_nodes():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [4], [1, 2, 3, 4]), name="c"),
        helper.make_node("Add", ["x", "c"], ["y"], name="add"),
        helper.make_node("Constant", [], ["k"], value_int=7, name="k"),
    ]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y"), vinfo("k", TensorProto.INT64, ())])
    result, after = fold(proto)
    assert result.modified and ops(after) == ["Add", "Constant"]
    assert [i.name for i in after.graph.initializer] == ["c"]
    assert [o.name for o in after.graph.output] == ["y", "k"]
    assert_same_outputs(proto, after, {"x": X}, rtol=0, atol=0)


def test_o1_reports_unfolded_nodes(tmp_path):
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["w"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]), name="cos"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    proto = make_model(nodes, [vinfo("x", shape=(3, 256))], [vinfo("y", shape=(3, 256))], [tensor("shape", np.array([256, 256], np.int64))])
    result = gcomp.optimize(ir.from_proto(proto), "O1")
    assert result.verification.passed
    fold_rows = [p for p in result.passes if p.name == "fold-constants"]
    assert fold_rows and fold_rows[0].details["unfolded_nodes"][0]["node"] == "cos"


def _reshape_by_shape_of(source: str, tail=(2, -1)):
    """Reshape(MatMul(x, W), Concat(dim0(source), dim1(source), tail))."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Shape", [source], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0, name="g0"),
        helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0, name="g1"),
        helper.make_node("Unsqueeze", ["d0", "ax"], ["u0"], name="u0"),
        helper.make_node("Unsqueeze", ["d1", "ax"], ["u1"], name="u1"),
        helper.make_node("Concat", ["u0", "u1", "tail"], ["target"], axis=0, name="cat"),
        helper.make_node("Reshape", ["h", "target"], ["r"], name="reshape"),
        helper.make_node("Add", ["r", "z"], ["y"], name="add"),
    ]
    inits = [
        tensor("W", np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)),
        tensor("i0", np.array(0, np.int64)), tensor("i1", np.array(1, np.int64)),
        tensor("ax", np.array([0], np.int64)), tensor("tail", np.array(tail, np.int64)),
    ]
    out_tail = [8] if len(tail) == 1 else [2, 4]
    inputs = [vinfo("x", shape=("batch", "seq", 8)), vinfo("z", shape=("other", "seq", *out_tail))]
    return make_model(nodes, inputs, [vinfo("y", shape=("batch", "seq", *out_tail))], inits)


def test_reshape_target_of_own_symbolic_dims_becomes_constant():
    proto = _reshape_by_shape_of("x")
    result = gcomp.optimize(ir.from_proto(proto), "O1", verify=False)
    after = ir.to_proto(result.model)
    remaining = ops(after)
    assert "Shape" not in remaining and "Concat" not in remaining and "Gather" not in remaining
    target = next(i for i in after.graph.initializer if i.name.startswith("target"))
    assert list(onnx.numpy_helper.to_array(target)) == [0, 0, 2, -1]
    for b, s in ((1, 1), (2, 5), (3, 7)):
        rng = np.random.default_rng(b)
        feeds = {"x": rng.standard_normal((b, s, 8)).astype(np.float32), "z": rng.standard_normal((1, s, 2, 4)).astype(np.float32)}
        assert_same_outputs(proto, after, feeds, rtol=1e-6, atol=1e-6)


def test_reshape_to_its_own_symbolic_shape_is_removed():
    proto = _reshape_by_shape_of("x", tail=(-1,))
    result = gcomp.optimize(ir.from_proto(proto), "O1", verify=False)
    after = ir.to_proto(result.model)
    assert ops(after) == ["MatMul", "Add"]
    feeds = {"x": np.ones((2, 3, 8), np.float32), "z": np.ones((1, 3, 8), np.float32)}
    assert_same_outputs(proto, after, feeds, rtol=1e-6, atol=1e-6)


def test_reshape_target_of_another_tensors_dims_is_left_alone():
    # Reshape(h, dims of z): z's first dim is a different symbolic dim ("other"), so 0
    # ("copy h's dim") would be wrong whenever other != batch.
    proto = _reshape_by_shape_of("z")
    result = gcomp.optimize(ir.from_proto(proto), "O1", verify=False)
    assert "Shape" in ops(ir.to_proto(result.model))


def _bodies(graph):
    """Every If/Loop/Scan body under ``graph`` (a GraphProto), depth first."""
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield body
                yield from _bodies(body)


def _if_of_loop(ir_version=10):
    """y = x + [1,2,3,4] if sum(x) > 0 else x * 0.5**n (a Loop of n steps); Constant nodes in both bodies."""
    step = helper.make_graph(
        [
            helper.make_node("Constant", [], ["half"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [0.5]), name="half"),
            helper.make_node("Mul", ["h", "half"], ["h2"], name="mul"),
            helper.make_node("Identity", ["c"], ["c2"], name="keep"),
        ],
        "step", [vinfo("i", TensorProto.INT64, ()), vinfo("c", TensorProto.BOOL, ()), vinfo("h", shape=("batch", 4))],
        [vinfo("c2", TensorProto.BOOL, ()), vinfo("h2", shape=("batch", 4))],
    )
    then = helper.make_graph(
        [
            helper.make_node("Constant", [], ["bias"], value=helper.make_tensor("b", TensorProto.FLOAT, [4], [1, 2, 3, 4]), name="bias"),
            helper.make_node("Add", ["x", "bias"], ["t"], name="add"),
        ],
        "then", [], [vinfo("t")],
    )
    other = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["e"], body=step, name="loop")], "else", [], [vinfo("e")],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    proto = make_model(nodes, [vinfo("x"), vinfo("n", TensorProto.INT64, ())], [vinfo("y")], [tensor("zero", np.float32(0))])
    proto.ir_version = ir_version
    return proto


def test_constants_in_if_and_loop_bodies_become_their_own_initializers():
    proto = _if_of_loop()
    result, after = fold(proto)
    assert result.modified
    bodies = {b.name: b for b in _bodies(after.graph)}
    assert not [n for b in bodies.values() for n in b.node if n.op_type == "Constant"]
    assert [i.name for i in bodies["then"].initializer] == ["bias"]
    assert [i.name for i in bodies["step"].initializer] == ["half"]
    assert [i.name for i in after.graph.initializer] == ["zero"]  # nothing moved out of its body
    onnx.checker.check_model(after, full_check=True)
    for sign, n in ((1, 2), (-1, 0), (-1, 1), (-1, 3)):
        feeds = {"x": sign * np.abs(X), "n": np.array(n, np.int64)}
        assert_same_outputs(proto, after, feeds, rtol=0, atol=0)
    again, _ = fold(after)
    assert not again.modified


def test_bodies_of_an_ir3_model_and_functions_keep_constant_nodes():
    model = ir.from_proto(_if_of_loop(ir_version=3))
    result = registry.get_pass("fold-constants").create()(model)
    assert not result.modified  # IR 3: a body's initializers would have to be its inputs
    assert sum(n.op_type == "Constant" for g in model.graphs() for n in g) == 2

    body = [
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [], [3.0]), name="k"),
        helper.make_node("Mul", ["a", "k"], ["b"], name="mul"),
    ]
    fn = helper.make_function("local", "Triple", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    proto = make_model([helper.make_node("Triple", ["x"], ["y"], domain="local", name="call")], [vinfo("x")], [vinfo("y")],
                       functions=[fn], extra_opsets=[helper.make_opsetid("local", 1)])
    result, after = fold(proto)
    assert not result.modified and [n.op_type for n in after.functions[0].node] == ["Constant", "Mul"]


def test_a_constant_returned_by_a_body_becomes_its_initializer():
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=helper.make_tensor("v", TensorProto.FLOAT, [4], [1, 2, 3, 4]), name="c")],
        "then", [], [vinfo("t", shape=(4,))],
    )
    other = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["e"], axes=[0], keepdims=0, name="m")], "else", [],
                              [vinfo("e", shape=(4,))])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y", shape=(4,))], [tensor("zero", np.float32(0))])
    result, after = fold(proto)
    assert result.modified
    then = next(b for b in _bodies(after.graph) if b.name == "then")
    assert not then.node and [i.name for i in then.initializer] == [o.name for o in then.output] == ["t"]
    onnx.checker.check_model(after, full_check=True)
    for sign in (1, -1):
        assert_same_outputs(proto, after, {"x": sign * np.abs(X)}, rtol=0, atol=0)
    # A Loop body's constant condition output, as the TorchScript exporter writes it.
    proto = _if_of_loop()
    step = next(b for b in _bodies(proto.graph) if b.name == "step")
    step.node[2].CopyFrom(helper.make_node("Constant", [], ["c2"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True]), name="keep"))
    _, after = fold(proto)
    step = next(b for b in _bodies(after.graph) if b.name == "step")
    assert [n.op_type for n in step.node] == ["Mul"] and step.output[0].name in [i.name for i in step.initializer]
    for n in (0, 1, 3):
        assert_same_outputs(proto, after, {"x": -np.abs(X), "n": np.array(n, np.int64)}, rtol=0, atol=0)
