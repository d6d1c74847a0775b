"""Every O1 pass proven numerically on ORT (optimizations off), plus structure and no-op cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gcomp.pipeline import registry  # importing the pipeline registers the built-in passes
from tests.conftest import assert_same_outputs, make_model, tensor, vinfo

FEEDS = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}


def run_pass(name: str, proto: onnx.ModelProto, **options):
    model = ir.from_proto(proto)
    result = registry.get_pass(name).create(**options)(model)
    return result, ir.to_proto(result.model)


def ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_cse_merges_duplicates_and_is_exact(small_model):
    result, after = run_pass("cse", small_model)
    assert result.modified
    assert ops(after).count("Relu") == 1
    assert_same_outputs(small_model, after, FEEDS, rtol=0, atol=0)


def test_cse_no_op_reports_unmodified():
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vinfo("x")], [vinfo("y")])
    result, _ = run_pass("cse", proto)
    assert not result.modified


@pytest.mark.parametrize("op", ["RandomNormalLike", "RandomUniformLike", "Bernoulli"])
def test_cse_refuses_nondeterministic_ops(op):
    nodes = [
        helper.make_node(op, ["x"], ["a"], name="r1"),
        helper.make_node(op, ["x"], ["b"], name="r2"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y")], opset=17)
    result, after = run_pass("cse", proto)
    assert not result.modified
    assert ops(after).count(op) == 2


def test_cse_refuses_custom_domain_ops():
    nodes = [
        helper.make_node("Sample", ["x"], ["a"], name="s1", domain="com.example"),
        helper.make_node("Sample", ["x"], ["b"], name="s2", domain="com.example"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y")], extra_opsets=[helper.make_opsetid("com.example", 1)])
    result, after = run_pass("cse", proto)
    assert not result.modified


def test_cse_keeps_both_graph_output_names():
    nodes = [
        helper.make_node("Relu", ["x"], ["y1"], name="r1"),
        helper.make_node("Relu", ["x"], ["y2"], name="r2"),
    ]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y1"), vinfo("y2")])
    result, after = run_pass("cse", proto)
    assert result.modified
    assert [o.name for o in after.graph.output] == ["y1", "y2"]
    assert ops(after).count("Relu") == 1
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(proto, after, FEEDS, rtol=0, atol=0)


def test_cse_inside_if_branches():
    def branch(name):
        return helper.make_graph(
            [
                helper.make_node("Relu", ["x"], ["a"], name=f"{name}_r1"),
                helper.make_node("Relu", ["x"], ["b"], name=f"{name}_r2"),
                helper.make_node("Add", ["a", "b"], [f"{name}_out"], name=f"{name}_add"),
            ],
            name, [], [vinfo(f"{name}_out")],
        )

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="if"),
    ]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y")], [tensor("zero", np.float32(0))])
    result, after = run_pass("cse", proto)
    assert result.modified
    then = next(a.g for a in after.graph.node[2].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node].count("Relu") == 1
    for sign in (1, -1):
        assert_same_outputs(proto, after, {"x": sign * np.abs(FEEDS["x"])}, rtol=0, atol=0)


def test_eliminate_identity(small_model):
    result, after = run_pass("eliminate-identity", small_model)
    assert result.modified and "Identity" not in ops(after)
    assert_same_outputs(small_model, after, FEEDS, rtol=0, atol=0)
    again, _ = run_pass("eliminate-identity", after)
    assert not again.modified


def test_remove_unused_nodes(small_model):
    result, after = run_pass("remove-unused-nodes", small_model)
    assert result.modified and "Neg" not in ops(after)
    assert_same_outputs(small_model, after, FEEDS, rtol=0, atol=0)


def test_dedup_initializers(small_model):
    result, after = run_pass("dedup-initializers", small_model)
    assert result.modified
    assert len(after.graph.initializer) == 1
    assert_same_outputs(small_model, after, FEEDS, rtol=0, atol=0)


def test_dedup_keeps_initializers_that_are_inputs():
    w = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
        helper.make_node("MatMul", ["x", "W2"], ["b"], name="m2"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [vinfo("x"), vinfo("W", shape=(4, 4))], [vinfo("y")], [tensor("W", w), tensor("W2", w)])
    result, after = run_pass("dedup-initializers", proto)
    assert {i.name for i in after.graph.initializer} == {"W", "W2"}  # W may be overridden by a caller


def test_dedup_merges_listed_initializers_of_an_ir3_model():
    """IR 3 lists every initializer as an input, yet they are constants (ONNX Runtime
    refuses a feed for them): equal ones merge, and the merged one leaves the inputs."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
        helper.make_node("MatMul", ["x", "W2"], ["b"], name="m2"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    inits = [tensor("W", w), tensor("W2", w), tensor("B", w * 2)]
    proto = make_model(nodes, [vinfo("x"), *(vinfo(t.name, shape=(4, 4)) for t in inits)], [vinfo("y")], inits)
    proto.ir_version = 3
    result, after = run_pass("dedup-initializers", proto)
    assert result.modified
    assert [i.name for i in after.graph.input] == ["x", "W", "B"]  # x keeps its place
    assert {t.name for t in after.graph.initializer} == {"W", "B"}
    assert {n.input[1] for n in after.graph.node if n.op_type == "MatMul"} == {"W"}
    assert_same_outputs(proto, after, FEEDS, rtol=0, atol=0)
    # Newer IR: listed initializers are defaults a caller may override, and stay apart.
    proto.ir_version = 4
    result, after = run_pass("dedup-initializers", proto)
    assert not result.modified and {t.name for t in after.graph.initializer} == {"W", "W2", "B"}


def _branches_with_loop(then_inits, else_inits, step_inits, main_inits=()):
    """y = Sub(Add(x, c), k2) if sum(x) > 0 else Loop(n) of h + k over Add(x, c): each body's
    constants are its own initializers, given by the caller."""
    step = helper.make_graph(
        [helper.make_node("Add", ["h", "k"], ["h2"], name="step_add"), helper.make_node("Identity", ["c_in"], ["c_out"], name="step_c")],
        "step", [vinfo("i", TensorProto.INT64, ()), vinfo("c_in", TensorProto.BOOL, ()), vinfo("h")],
        [vinfo("c_out", TensorProto.BOOL, ()), vinfo("h2")], list(step_inits),
    )
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["t"], name="then_add"), helper.make_node("Sub", ["t", "k2"], ["o1"], name="then_sub")],
        "then", [], [vinfo("o1")], list(then_inits),
    )
    other = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["e"], name="else_add"), helper.make_node("Loop", ["n", "", "e"], ["o2"], body=step, name="loop")],
        "else", [], [vinfo("o2")], list(else_inits),
    )
    nodes = [
        helper.make_node("Mul", ["x", "m"], ["xm"], name="main_mul"),
        helper.make_node("ReduceSum", ["xm"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    inits = [tensor("zero", np.float32(0)), *main_inits]
    return make_model(nodes, [vinfo("x"), vinfo("n", TensorProto.INT64, ())], [vinfo("y")], inits)


def _bodies_of(proto):
    out = {}
    stack = [proto.graph]
    while stack:
        for node in stack.pop().node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    out[attr.g.name] = attr.g
                    stack.append(attr.g)
    return out


def _dedup(proto):
    """dedup-initializers on a copy (ir.from_proto shares the proto's tensors, whose names a
    hoisted initializer's rename would change)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return run_pass("dedup-initializers", copy)


def _check_both_branches_and_loop(before, after):
    onnx.checker.check_model(after, full_check=True)
    x = np.abs(FEEDS["x"])
    for sign, n in ((1, 0), (-1, 0), (-1, 1), (-1, 3)):
        assert_same_outputs(before, after, {"x": sign * x, "n": np.array(n, np.int64)}, rtol=0, atol=0)


ROW = np.array([1, 2, 3, 4], np.float32)


def test_dedup_hoists_a_constant_several_bodies_hold_into_the_main_graph():
    proto = _branches_with_loop(
        then_inits=[tensor("c", ROW), tensor("k2", np.full(4, 7, np.float32))],
        else_inits=[tensor("c", ROW)],  # sibling bodies may reuse a name
        step_inits=[tensor("k", ROW)],
        main_inits=[tensor("m", np.full(4, 2, np.float32))],
    )
    result, after = _dedup(proto)
    assert result.modified
    bodies = _bodies_of(after)
    main = {i.name: onnx.numpy_helper.to_array(i) for i in after.graph.initializer}
    shared = [name for name, a in main.items() if a.shape == (4,) and np.array_equal(a, ROW)]
    assert len(shared) == 1 and shared[0] not in ("c", "k")  # moved out under a name no body uses
    assert [i.name for i in bodies["then"].initializer] == ["k2"]  # held by one body: stays there
    assert not bodies["else"].initializer and not bodies["step"].initializer
    _check_both_branches_and_loop(proto, after)
    again, _ = _dedup(after)
    assert not again.modified


def test_dedup_reuses_the_main_graph_copy_under_a_name_no_body_shadows():
    # The main graph's k equals the then-branch's k2; the then-branch has its own k (another
    # value): read from that branch as "k", the main graph's copy would resolve to the wrong one.
    proto = _branches_with_loop(
        then_inits=[tensor("c", ROW * 5), tensor("k2", ROW)],
        else_inits=[tensor("c", ROW * 6)],
        step_inits=[tensor("k", ROW * 7)],
        main_inits=[tensor("m", ROW)],
    )
    proto.graph.initializer[1].name = "k"  # the main graph's m, renamed k
    proto.graph.node[0].input[1] = "k"
    then = _bodies_of(proto)["then"]
    then.initializer[0].name = "k"  # the then-branch's c, renamed k: it shadows the main graph's
    then.node[0].input[1] = "k"
    result, after = _dedup(proto)
    assert result.modified
    main = {i.name: onnx.numpy_helper.to_array(i) for i in after.graph.initializer}
    assert "k" not in main and any(np.array_equal(a, ROW) for a in main.values())
    assert [i.name for i in _bodies_of(after)["then"].initializer] == ["k"]
    _check_both_branches_and_loop(proto, after)


def test_dedup_does_not_hoist_in_an_ir3_model():
    proto = _branches_with_loop(then_inits=[tensor("c", ROW), tensor("k2", ROW * 2)], else_inits=[tensor("c", ROW)],
                                step_inits=[tensor("k", ROW)], main_inits=[tensor("m", ROW * 3)])
    model = ir.from_proto(proto)
    model.ir_version = 3
    result = registry.get_pass("dedup-initializers").create()(model)
    assert not result.modified
    assert sum(len(g.initializers) for g in model.graphs()) == 6


def test_remove_unused_opsets():
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="r")], [vinfo("x")], [vinfo("y")],
        extra_opsets=[helper.make_opsetid("com.example", 1)],
    )
    result, after = run_pass("remove-unused-opsets", proto)
    assert result.modified
    assert {o.domain for o in after.opset_import} == {""}
    assert_same_outputs(proto, after, FEEDS, rtol=0, atol=0)


def test_topological_sort():
    nodes = [
        helper.make_node("Add", ["a", "x"], ["y"], name="add"),
        helper.make_node("Relu", ["x"], ["a"], name="r"),
    ]
    graph = helper.make_graph(nodes, "g", [vinfo("x")], [vinfo("y")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    result, after = run_pass("topological-sort", proto)
    assert result.modified and ops(after) == ["Relu", "Add"]
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(after, after, FEEDS)


def test_validate_rejects_invalid_model():
    from gcomp.errors import GcompError

    model = ir.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vinfo("x")], [vinfo("y")]))
    model.graph.node(0).op_type = "NoSuchOp"
    with pytest.raises(GcompError, match="fails the ONNX checker"):
        registry.get_pass("validate").create()(model)


@pytest.mark.parametrize("builder", ["cnn", "transformer", "mlp"])
def test_o1_on_zoo_models_is_verified(builder):
    import gcomp
    import models

    model = models.build(builder)
    before = ir.to_proto(model)
    result = gcomp.optimize(model, "O1")
    assert result.verification.passed, result.verification.summary()
    assert result.after.nodes <= result.before.nodes
    after = ir.to_proto(result.model)
    onnx.checker.check_model(after, full_check=True)
    assert_same_outputs(before, after, dict(result_feeds(result)), rtol=1e-5, atol=1e-6)


def result_feeds(result):
    """Feeds equal to what verification used: regenerate them from the same seed."""
    from gcomp.inputs import generate_inputs

    feeds, _ = generate_inputs(result.model, seed=0)
    return feeds


def test_identity_between_two_outputs_keeps_both_names():
    nodes = [helper.make_node("Add", ["x", "x"], ["y"], name="add"), helper.make_node("Identity", ["y"], ["z"], name="id")]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y"), vinfo("z")])
    result, after = run_pass("eliminate-identity", proto)
    assert not result.modified
    assert [o.name for o in after.graph.output] == ["y", "z"]
    assert_same_outputs(proto, after, FEEDS, rtol=0, atol=0)


def test_identity_to_output_renames_the_producer():
    nodes = [helper.make_node("Add", ["x", "x"], ["t"], name="add"), helper.make_node("Identity", ["t"], ["y"], name="id")]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y")])
    result, after = run_pass("eliminate-identity", proto)
    assert result.modified and ops(after) == ["Add"]
    assert [o.name for o in after.graph.output] == ["y"]
    assert_same_outputs(proto, after, FEEDS, rtol=0, atol=0)


def test_identity_returning_outer_value_from_subgraph_is_kept():
    then = helper.make_graph([helper.make_node("Identity", ["s"], ["t"], name="tid")], "then", [], [vinfo("t")])
    other = helper.make_graph([helper.make_node("Sub", ["x", "x"], ["e"], name="sub")], "else", [], [vinfo("e")])
    nodes = [
        helper.make_node("Add", ["x", "x"], ["s"], name="add"),
        helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0, name="rs"),
        helper.make_node("Greater", ["sum", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["r"], then_branch=then, else_branch=other, name="if"),
    ]
    proto = make_model(nodes, [vinfo("x")], [vinfo("s"), vinfo("r")], [tensor("zero", np.float32(0))])
    model = ir.from_proto(proto)
    import gcomp

    result = gcomp.optimize(model, "O1", inputs={"x": np.abs(FEEDS["x"])})
    assert result.verification.passed, result.verification.summary()
    after = ir.to_proto(result.model)
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == ["s", "r"]


def test_dedup_never_reads_weights_of_unique_shape(tmp_path):
    """Grouping by (dtype, shape) first: a weight no other could equal is never read."""
    from gcomp import io

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    b = np.ones((4,), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x8", "W"], ["a"], name="mm"),
        helper.make_node("Add", ["a", "B1"], ["c"], name="add1"),
        helper.make_node("Add", ["c", "B2"], ["y"], name="add2"),
    ]
    proto = make_model(nodes, [vinfo("x8", shape=("batch", 8))], [vinfo("y")], [tensor("W", w), tensor("B1", b), tensor("B2", b.copy())])
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="w.bin", size_threshold=64)  # only W is external
    model = io.load(path)
    (tmp_path / "w.bin").unlink()  # reading W now would fail
    result = registry.get_pass("dedup-initializers").create()(model)
    assert result.modified
    assert sorted(model.graph.initializers) == ["B1", "W"]


def test_cse_and_identity_inside_model_functions():
    fn = helper.make_function(
        "local", "Twice", ["a"], ["out"],
        [
            helper.make_node("Identity", ["a"], ["ai"], name="fid"),
            helper.make_node("Relu", ["ai"], ["r1"], name="fr1"),
            helper.make_node("Relu", ["ai"], ["r2"], name="fr2"),
            helper.make_node("Add", ["r1", "r2"], ["out"], name="fadd"),
        ],
        [helper.make_opsetid("", 17)],
    )
    proto = make_model(
        [helper.make_node("Twice", ["x"], ["y"], domain="local", name="call")],
        [vinfo("x")], [vinfo("y")], functions=[fn], extra_opsets=[helper.make_opsetid("local", 1)],
    )
    import gcomp

    result = gcomp.optimize(ir.from_proto(proto), "O1", inputs=FEEDS)
    assert result.verification.passed, result.verification.summary()
    body = ir.to_proto(result.model).functions[0].node
    assert [n.op_type for n in body] == ["Relu", "Add"]


def test_dedup_merges_equal_external_weights_and_keeps_different_ones(tmp_path):
    """Fingerprints from 16 spread blocks split groups, then whole-tensor digests decide."""
    from gcomp import io

    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 256)).astype(np.float32)  # 256 KiB: sampled, then hashed whole
    b = a.copy()
    c = a.copy()
    c[100, 3] += 1.0  # differs between the sampled blocks: same fingerprint, different digest
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["p"], name="ma"),
        helper.make_node("MatMul", ["x", "B"], ["q"], name="mb"),
        helper.make_node("MatMul", ["x", "C"], ["r"], name="mc"),
        helper.make_node("Sum", ["p", "q", "r"], ["y"], name="sum"),
    ]
    proto = make_model(nodes, [vinfo("x", shape=(2, 256))], [vinfo("y", shape=(2, 256))], [tensor("A", a), tensor("B", b), tensor("C", c)])
    path = tmp_path / "m.onnx"
    reference = onnx.ModelProto()
    reference.CopyFrom(proto)  # onnx.save rewrites its argument to point at the data file
    onnx.save(proto, path, save_as_external_data=True, location="m.bin", size_threshold=0)
    model = io.load(path)
    result = registry.get_pass("dedup-initializers").create()(model)
    assert result.modified
    assert sorted(model.graph.initializers) == ["A", "C"]
    proto = reference
    feeds = {"x": rng.standard_normal((2, 256)).astype(np.float32)}
    assert_same_outputs(proto, model, feeds, rtol=1e-6, atol=1e-5)


def test_infer_shapes_annotates_and_forget_restores():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["y"], name="n")]
    proto = make_model(nodes, [vinfo("x", shape=(3, 4))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.from_proto(proto)
    inferred = registry.get_pass("infer-shapes").create()(model)
    assert inferred.modified
    a = model.graph.node(0).outputs[0]
    assert a.shape == ir.Shape([3, 4]) and a.dtype == ir.DataType.FLOAT
    assert not registry.get_pass("infer-shapes").create()(model).modified  # nothing new the second time
    restored = registry.get_pass("forget-inferred-shapes").create()(model)
    assert restored.modified and a.shape is None and model.graph.outputs[0].shape is None
    assert_same_outputs(proto, ir.to_proto(model), FEEDS, rtol=0, atol=0)
    again = registry.get_pass("forget-inferred-shapes").create()(model)
    assert not again.modified


def test_call_without_weights_restores_the_model_exactly():
    from gcomp.io import call_without_weights

    w = np.ones((64, 64), np.float32)
    nodes = [helper.make_node("MatMul", ["x64", "W"], ["a"], name="mm"), helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    proto = make_model(nodes, [vinfo("x64", shape=(2, 64))], [vinfo("y", shape=(2, 64))], [tensor("W", w), tensor("b", np.zeros(64, np.float32))])
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    seen = call_without_weights(lambda p: ([i.name for i in p.graph.input], [t.name for t in p.graph.initializer]), model)
    assert seen == (["x64", "W"], ["b"])  # the 16 KiB weight became a typed input; the bias stayed
    assert ir.to_proto(model).SerializeToString() == before
    with pytest.raises(RuntimeError):
        call_without_weights(lambda p: (_ for _ in ()).throw(RuntimeError("boom")), model)
    assert ir.to_proto(model).SerializeToString() == before


def test_call_without_weights_reads_in_small_external_weights(tmp_path, monkeypatch):
    """Every weight in a .data file (as the dynamo exporter writes them): the small ones are
    given to func in memory, so ONNX's checker, run from another folder, does not look for
    the data file in the working directory."""
    from gcomp.io import call_without_weights, load

    nodes = [helper.make_node("MatMul", ["x64", "W"], ["a"], name="mm"), helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    proto = make_model(nodes, [vinfo("x64", shape=(2, 64))], [vinfo("y", shape=(2, 64))],
                       [tensor("W", np.ones((64, 64), np.float32)), tensor("b", np.arange(64, dtype=np.float32))])
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = load(tmp_path / "m.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    bias = call_without_weights(lambda p: (onnx.checker.check_model(p), onnx.numpy_helper.to_array(p.graph.initializer[0]))[1],
                                model)
    np.testing.assert_array_equal(bias, np.arange(64, dtype=np.float32))
    assert isinstance(model.graph.initializers["b"].const_value, ir.ExternalTensor)  # restored


def test_o1_drops_a_branch_initializer_a_fold_left_unread():
    """y = If(c) of x @ Transpose(Wt): the Transpose folds into a new branch initializer and
    Wt, read by nothing, goes (it stayed in the file: 256 KiB twice)."""
    import gcomp

    wt = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("Transpose", ["Wt"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["y_t"])],
                               "then", [], [vinfo("y_t", shape=(1, 64))], [tensor("Wt", wt)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["y_e"])], "else", [], [vinfo("y_e", shape=(1, 64))])
    proto = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [vinfo("x", shape=(1, 64)), vinfo("c", TensorProto.BOOL, ())], [vinfo("y", shape=(1, 64))])
    feeds = {"x": np.ones((1, 64), np.float32), "c": np.array(True)}
    after = ir.to_proto(gcomp.optimize(proto, "O1", inputs=feeds).model)
    branch = after.graph.node[0].attribute[0].g
    assert "Wt" not in [t.name for t in branch.initializer]
    assert after.ByteSize() < 64 * 64 * 4 * 1.1  # the folded weight alone
    assert_same_outputs(proto, after, feeds, rtol=1e-6, atol=1e-6)
