"""O1's folds into Conv/ConvTranspose/Gemm weights (pass ``fold-into-weights``), end to end.

The rules themselves are tested one by one in ``tests/fusion`` (conv-bn, scale, bias,
pad-conv); here: the default pipeline runs them (a zero Pad, BatchNormalization and a
per-channel Mul/Add leave no node behind a Conv and a Gemm), the result equals the
original on ONNX Runtime with its optimizations off, and an IR-3 model (every
initializer listed as a graph input) comes out as a valid IR-3 model no bigger than it
went in: the folded weights' originals are dropped, the new ones listed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

import gcomp
from gcomp import io

from tests.conftest import assert_same_outputs, make_model, tensor, vinfo


def _cnn(rng, *, ir_version=10, opset=17):
    """Pad -> Conv -> BatchNormalization -> Relu -> Mul/Add per channel -> Flatten -> Gemm -> BatchNormalization."""
    c, k, n = 3, 8, 5
    inits = [
        tensor("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        tensor("W", rng.standard_normal((k, c, 3, 3)).astype(np.float32)),
        tensor("bn_g", rng.uniform(0.5, 1.5, k).astype(np.float32)),
        tensor("bn_b", rng.standard_normal(k).astype(np.float32)),
        tensor("bn_m", rng.standard_normal(k).astype(np.float32)),
        tensor("bn_v", rng.uniform(0.5, 2.0, k).astype(np.float32)),
        tensor("s", rng.uniform(0.5, 1.5, (k, 1, 1)).astype(np.float32)),
        tensor("t", rng.standard_normal((k, 1, 1)).astype(np.float32)),
        tensor("G", rng.standard_normal((k * 6 * 6, n)).astype(np.float32)),
        tensor("g_b", rng.standard_normal(n).astype(np.float32)),
        tensor("bn2_g", rng.uniform(0.5, 1.5, n).astype(np.float32)),
        tensor("bn2_b", rng.standard_normal(n).astype(np.float32)),
        tensor("bn2_m", rng.standard_normal(n).astype(np.float32)),
        tensor("bn2_v", rng.uniform(0.5, 2.0, n).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
        helper.make_node("Conv", ["xp", "W"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c2", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "t"], ["a"], name="add"),
        helper.make_node("Flatten", ["a"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G", "g_b"], ["g"], name="gemm"),
        helper.make_node("BatchNormalization", ["g", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["y"], name="bn2"),
    ]
    inits.append(tensor("W2", rng.standard_normal((k, k, 3, 3)).astype(np.float32) / 5))
    proto = make_model(nodes, [vinfo("x", shape=(2, c, 6, 6))], [vinfo("y", shape=(2, n))], inits, opset=opset)
    if ir_version < 4:  # IR 3: every initializer is also a graph input
        proto.ir_version = ir_version
        proto.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in proto.graph.initializer
        )
    return proto, {"x": rng.standard_normal((2, c, 6, 6)).astype(np.float32)}


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_o1_folds_pad_batchnorm_and_per_channel_affine_into_weights(rng):
    proto, feeds = _cnn(rng)
    result = gcomp.optimize(proto, "O1", inputs=feeds)
    assert result.verification.passed, result.verification
    assert _ops(result.model) == ["Conv", "Relu", "Conv", "Flatten", "Gemm"]
    conv = next(iter(result.model.graph))
    assert list(conv.attributes["pads"].as_ints()) == [1, 1, 1, 1]
    assert_same_outputs(proto, ir.to_proto(result.model), feeds, rtol=1e-4, atol=1e-5)


def test_ir3_model_stays_valid_ir3_without_the_folded_weights(rng, tmp_path):
    proto, feeds = _cnn(rng, ir_version=3, opset=9)  # Pad-2 takes its pads as an attribute from opset 11
    del proto.graph.node[0]
    proto.graph.node[0].input[0] = "x"
    proto.graph.node[0].attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    src = tmp_path / "ir3.onnx"
    onnx.save(proto, src)
    result = gcomp.optimize(str(src), "O1", inputs=feeds)
    assert result.verification.passed, result.verification
    out = tmp_path / "out.onnx"
    io.save(result.model, out, source=src)
    saved = onnx.load(out)
    onnx.checker.check_model(saved)  # IR 3: every initializer listed as an input
    assert saved.ir_version == 3
    assert [n.op_type for n in saved.graph.node] == ["Conv", "Relu", "Conv", "Flatten", "Gemm"]
    weights = {t.name for t in saved.graph.initializer}
    assert {i.name for i in saved.graph.input} == {"x"} | weights
    assert saved.graph.input[0].name == "x"
    assert not {"W", "bn_g", "G", "bn2_v", "s"} & weights  # the originals of folded weights are gone
    assert out.stat().st_size <= src.stat().st_size * 1.05
    assert_same_outputs(proto, saved, feeds, rtol=1e-4, atol=1e-5)


def _ir3_branches(rng):
    """IR 3, opset 9: y = If(cond) of Conv -> BatchNormalization in both branches, every
    weight a listed initializer of the main graph read only inside the branches; plus a
    listed initializer nothing reads."""
    k = 6
    inits = [tensor("W", rng.standard_normal((k, 4, 3, 3)).astype(np.float32)), tensor("unread", np.ones(3, np.float32))]
    inits += [tensor(n, rng.uniform(0.5, 1.5, k).astype(np.float32)) for n in ("g", "b", "mu", "var")]

    def branch(name):
        nodes = [helper.make_node("Conv", ["x", "W"], [f"{name}_c"]),
                 helper.make_node("BatchNormalization", [f"{name}_c", "g", "b", "mu", "var"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [vinfo(f"{name}_y", shape=(2, k, 3, 3))])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "g",
        [vinfo("x", shape=(2, 4, 5, 5)), vinfo("cond", onnx.TensorProto.BOOL, ())]
        + [vinfo(t.name, shape=tuple(t.dims)) for t in inits],
        [vinfo("y", shape=(2, k, 3, 3))], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    proto.ir_version = 3
    onnx.checker.check_model(proto)
    return proto


def test_ir3_weights_folded_inside_a_branch_become_constants_of_the_branch(rng):
    """A body cannot list inputs, so IR 3 allows it no initializers: the weights folded in
    an If branch are Constant nodes there, and the main-graph originals are dropped."""
    proto = _ir3_branches(rng)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    for cond in (True, False):
        result = gcomp.optimize(proto, "O1", inputs={"x": x, "cond": np.array(cond)})
        assert result.verification.passed, result.verification
        saved = ir.to_proto(result.model)
        onnx.checker.check_model(saved)
        assert saved.ir_version == 3
        branch = saved.graph.node[0].attribute[0].g
        assert [n.op_type for n in branch.node] == ["Constant", "Constant", "Conv"] and not branch.initializer
        assert [i.name for i in saved.graph.input] == ["x", "cond", "unread"]  # as written: O1 read nothing new
        assert_same_outputs(proto, saved, {"x": x, "cond": np.array(cond)}, rtol=1e-4, atol=1e-5)


def test_ir3_o0_is_a_faithful_round_trip(rng):
    proto = _ir3_branches(rng)
    saved = ir.to_proto(gcomp.optimize(proto, "O0", verify=False).model)
    assert [i.name for i in saved.graph.input] == [i.name for i in proto.graph.input]
    assert [t.name for t in saved.graph.initializer] == [t.name for t in proto.graph.initializer]
