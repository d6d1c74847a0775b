"""Verification: inputs, tolerances, mismatch detection with bisection, and honest 'unverified'."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import gcomp
from gcomp.errors import OptionError
from gcomp.inputs import generate_inputs, load_inputs, parse_input_shapes
from gcomp.verify import TOLERANCES, compare_outputs, verify
from tests.conftest import make_model, tensor, vinfo


class BreakRelu(ir.passes.InPlacePass):
    """Deliberately wrong: turns every Relu into a Sigmoid."""

    def call(self, model):
        changed = False
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
                changed = True
        return ir.passes.PassResult(model, changed)


def test_broken_pass_is_caught_and_named(small_model, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model, path)
    result = gcomp.optimize(path, ["eliminate-identity", BreakRelu(), "cse"])
    v = result.verification
    assert v.status == "failed"
    assert "output 'y'" in v.reason and "beyond rtol" in v.reason
    assert v.first_bad_pass.startswith("BreakRelu")
    assert v.outputs[0].max_abs_error > 0.01


def test_bisect_on_in_memory_model(small_model):
    result = gcomp.optimize(ir.from_proto(small_model), [BreakRelu()])
    assert result.verification.first_bad_pass.startswith("BreakRelu")


def test_unverified_when_ort_lacks_a_kernel():
    proto = make_model(
        [helper.make_node("Frobnicate", ["x"], ["y"], name="f", domain="com.example")],
        [vinfo("x")], [vinfo("y")], extra_opsets=[helper.make_opsetid("com.example", 1)],
    )
    v = verify(ir.from_proto(proto), ir.from_proto(proto))
    assert v.status == "unverified"
    assert "does not load in ONNX Runtime" in v.reason and "Frobnicate" in v.reason


def test_unverified_when_generated_inputs_cannot_work():
    # The integer input is a Reshape target: random values cannot satisfy it.
    proto = make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")],
        [vinfo("x", shape=(2, 4)), vinfo("shape", TensorProto.INT64, shape=(2,))],
        [vinfo("y", shape=(None, None))],
    )
    v = verify(ir.from_proto(proto), ir.from_proto(proto))
    assert v.status == "unverified"
    assert "--inputs" in v.reason
    # With real inputs it verifies.
    feeds = {"x": np.ones((2, 4), np.float32), "shape": np.array([4, 2], np.int64)}
    assert verify(ir.from_proto(proto), ir.from_proto(proto), inputs=feeds).passed


def test_compare_tolerances_nan_inf_and_exact_ints():
    tol = TOLERANCES
    exp = {"f": np.array([1.0, np.nan, np.inf, 0.0], np.float32), "i": np.array([1, 2, 3])}
    same = compare_outputs(exp, {"f": np.array([1.0 + 1e-7, np.nan, np.inf, 1e-6], np.float32), "i": np.array([1, 2, 3])}, tol)
    assert all(c.ok for c in same)
    checks = compare_outputs(exp, {"f": np.array([1.0, 0.0, np.inf, 0.0], np.float32), "i": np.array([1, 2, 4])}, tol)
    assert [c.ok for c in checks] == [False, False]
    assert "1 of 4" in checks[0].detail
    assert checks[1].mismatched == 1
    off = compare_outputs(exp, {"f": np.array([1.01, np.nan, np.inf, 0.0], np.float32), "i": exp["i"]}, tol)
    assert not off[0].ok and off[0].max_abs_error == pytest.approx(0.01, rel=1e-3)
    shape = compare_outputs({"a": np.zeros((2, 2))}, {"a": np.zeros(4)}, tol)
    assert not shape[0].ok and "shape" in shape[0].detail


def test_generated_inputs_respect_gather_tables_and_names():
    proto = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], name="g"),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="c"),
            helper.make_node("Unsqueeze", ["m", "axis"], ["m3"], name="u"),
            helper.make_node("Mul", ["emb", "m3"], ["y"], name="mul"),
        ],
        [vinfo("ids", TensorProto.INT64, ("batch", "seq")), vinfo("attention_mask", TensorProto.INT64, ("batch", "seq"))],
        [vinfo("y", shape=("batch", "seq", 8))],
        [tensor("table", np.ones((7, 8), np.float32)), tensor("axis", np.array([-1], np.int64))],
    )
    model = ir.from_proto(proto)
    feeds, notes = generate_inputs(model, shapes=parse_input_shapes(["ids=2,5"]))
    assert feeds["ids"].shape == (2, 5) and feeds["ids"].max() < 7 and feeds["ids"].min() >= 0
    assert feeds["attention_mask"].shape == (2, 5)  # 'seq' and 'batch' bound by ids
    assert (feeds["attention_mask"] == 1).all()
    again, _ = generate_inputs(model, shapes={"ids": (2, 5)})
    np.testing.assert_array_equal(again["ids"], feeds["ids"])  # seeded


def test_generated_symbolic_dims_defaults():
    model = ir.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", shape=("N", 3, "H", "W"))], [vinfo("y", shape=("N", 3, "H", "W"))]))
    feeds, _ = generate_inputs(model)
    assert feeds["x"].shape == (1, 3, 32, 32)
    assert feeds["x"].dtype == np.float32 and 0 <= feeds["x"].min() and feeds["x"].max() < 1


def test_input_shape_errors():
    with pytest.raises(OptionError, match="NAME=D1"):
        parse_input_shapes(["x"])
    with pytest.raises(OptionError, match="integers"):
        parse_input_shapes(["x=a,b"])
    model = ir.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x")], [vinfo("y")]))
    with pytest.raises(OptionError, match="no input 'z'"):
        generate_inputs(model, shapes={"z": (1,)})


def test_load_inputs_npz_and_test_data_set(tmp_path, small_model):
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    np.testing.assert_array_equal(load_inputs(tmp_path / "in.npz")["x"], x)
    folder = tmp_path / "test_data_set_0"
    folder.mkdir()
    (folder / "input_0.pb").write_bytes(onnx.numpy_helper.from_array(x, "").SerializeToString())
    loaded = load_inputs(folder, ir.from_proto(small_model))
    np.testing.assert_array_equal(loaded["x"], x)  # unnamed tensor mapped by input order
    with pytest.raises(OptionError, match="no such file"):
        load_inputs(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(OptionError, match="not a readable .npz"):
        load_inputs(tmp_path / "junk.npz")


def test_absolute_tolerance_follows_the_outputs_scale():
    # Logits of typical size 27: an element near zero may carry 6e-5 of rounding from
    # terms of that size (ResNet-18, two correct runtimes) and still pass; 1e-3 may not.
    rng = np.random.default_rng(0)
    exp = (rng.normal(size=1000) * 27).astype(np.float32)
    exp[0] = 0.14
    near = exp.copy()
    near[0] += 6e-5
    assert compare_outputs({"y": exp}, {"y": near}, TOLERANCES)[0].ok
    far = exp.copy()
    far[0] += 1e-3
    check = compare_outputs({"y": exp}, {"y": far}, TOLERANCES)[0]
    assert not check.ok and "rms" in check.detail
    # Outputs of order one keep the plain check: 6e-5 on 0.14 fails there.
    small = exp / 27
    small[0] = 0.14
    bumped = small.copy()
    bumped[0] += 6e-5
    assert not compare_outputs({"y": small}, {"y": bumped}, TOLERANCES)[0].ok
