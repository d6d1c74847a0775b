"""RMSNorm fusion -> RMSNormalization (opset 23), never above the model's opset."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

SHAPE = (2, 5, 16)


def _rms(opset=23, *, square="pow", divide="div", scaled=True, eps_outside=False, expose=False):
    inits = [tensor("eps", np.float32(1e-6)), tensor("two", np.float32(2)), tensor("axes", np.array([-1], np.int64)),
             tensor("g", np.linspace(0.5, 1.5, 16).astype(np.float32))]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]) if square == "pow" else helper.make_node("Mul", ["x", "x"], ["sq"])]
    if opset >= 18:
        nodes.append(helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1))
    if eps_outside:
        nodes += [helper.make_node("Sqrt", ["ms"], ["r0"]), helper.make_node("Add", ["r0", "eps"], ["r"])]
    else:
        nodes += [helper.make_node("Add", ["eps", "ms"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["r"])]
    if divide == "div":
        nodes.append(helper.make_node("Div", ["x", "r"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["r"], ["ir"]), helper.make_node("Mul", ["x", "ir"], ["n"])]
    nodes.append(helper.make_node("Mul", ["g", "n"], ["y"]) if scaled else helper.make_node("Identity", ["n"], ["y"]))
    outputs = [vinfo("y", shape=SHAPE)]
    if expose:
        outputs.append(helper.make_tensor_value_info("ms", TensorProto.FLOAT, None))
    return make_model(nodes, [vinfo("x", shape=SHAPE)], outputs, inits, opset=opset)


@pytest.mark.parametrize("square,divide", [("pow", "div"), ("mul", "reciprocal")])
@pytest.mark.parametrize("scaled", [True, False])
def test_rms_norm(rng, square, divide, scaled):
    model, result = fuse(_rms(square=square, divide=divide, scaled=scaled), feeds_for(rng, x=SHAPE))
    counts = op_counts(model)
    assert counts["RMSNormalization"] == 1 and "ReduceMean" not in counts, (counts, result.details)


@pytest.mark.parametrize("case", [{"eps_outside": True}, {"expose": True}, {"opset": 18}, {"opset": 17}])
def test_rms_norm_must_not_fire(rng, case):
    model, _ = fuse(_rms(**case), feeds_for(rng, x=SHAPE))
    assert "RMSNormalization" not in op_counts(model), case


def test_target_opset_upgrade_lets_rms_norm_fire():
    """--target-opset 23 upgrades the model properly (checker-valid), then RMSNormalization fires."""
    import onnx_ir as ir

    from gcomp import optimize

    model = ir.serde.deserialize_model(_rms(opset=18))
    result = optimize(model, "O2", target_opset=23)
    assert result.verification.passed, result.verification.summary()
    assert result.model.opset_imports[""] == 23
    assert result.after.op_types.get("RMSNormalization") == 1, result.after.op_types
