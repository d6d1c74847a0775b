"""Residual Add (+ bias) + LayerNormalization -> com.microsoft.SkipLayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import fuse, op_counts

SHAPE = ("batch", "seq", 16)


def _model(*, bias=True, reuse_sum=True, rank=3, expose_mean=False, axis=-1):
    rng = np.random.default_rng(2)
    shape = SHAPE if rank == 3 else ("n", 16)
    inits = [tensor("g", (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)),
             tensor("b", (0.1 * rng.standard_normal(16)).astype(np.float32)),
             tensor("bias", (0.1 * rng.standard_normal(16)).astype(np.float32))]
    nodes = []
    x = "x"
    if bias:
        nodes.append(helper.make_node("Add", ["bias", "x"], ["xb"], name="bias_add"))
        x = "xb"
    nodes.append(helper.make_node("Add", [x, "skip"], ["s"], name="residual"))
    ln_out = ["y0", "mean"] if expose_mean else ["y0"]
    nodes.append(helper.make_node("LayerNormalization", ["s", "g", "b"], ln_out, name="ln", axis=axis, epsilon=1e-6))
    outputs = [vinfo("y", shape=shape)]
    if reuse_sum:  # the residual stream continues from the sum, like every transformer layer
        nodes.append(helper.make_node("Add", ["y0", "s"], ["y"], name="next"))
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    if expose_mean:
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    return make_model(nodes, [vinfo("x", shape=shape), vinfo("skip", shape=shape)], outputs, inits)


def _feeds(rng, rank=3):
    shape = (2, 5, 16) if rank == 3 else (10, 16)
    return {"x": rng.standard_normal(shape).astype(np.float32), "skip": rng.standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reuse_sum", [True, False])
def test_skip_layer_norm(rng, bias, reuse_sum):
    model, result = fuse(_model(bias=bias, reuse_sum=reuse_sum), _feeds(rng), target="ort-cuda", family="ort")
    counts = op_counts(model)
    assert counts["com.microsoft::SkipLayerNormalization"] == 1, result.details
    assert "LayerNormalization" not in counts
    assert counts.get("Add", 0) == (1 if reuse_sum else 0), counts


@pytest.mark.parametrize("case", [{"rank": 2}, {"expose_mean": True}])
def test_skip_layer_norm_must_not_fire(rng, case):
    model, _ = fuse(_model(**case), _feeds(rng, case.get("rank", 3)), target="ort-cuda", family="ort")
    assert "com.microsoft::SkipLayerNormalization" not in op_counts(model)


def test_portable_target_never_emits_contrib_ops(rng):
    model, result = fuse(_model(), _feeds(rng), target="portable", family="ort")
    assert not result.modified and not any("com.microsoft" in k for k in op_counts(model))


def test_skip_layer_norm_stays_off_for_ort_cpu_with_the_measured_reason(rng):
    model, result = fuse(_model(), _feeds(rng), target="ort-cpu", family="ort", explain=True)
    assert "com.microsoft::SkipLayerNormalization" not in op_counts(model)
    assert "slower" in result.details["rules"]["ort-skip-layer-norm"]["not_run"]


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_residual_add_before_layer_norm_becomes_sum(rng, target):
    """So ORT's own SkipLayerNormFusion (a slower CPU kernel) does not fire at session time."""
    model, result = fuse(_model(bias=False, reuse_sum=False), _feeds(rng), target=target)
    counts = op_counts(model)
    assert counts["Sum"] == 1 and counts["LayerNormalization"] == 1 and "Add" not in counts, counts
    model, cuda = fuse(_model(bias=False, reuse_sum=False), _feeds(rng), target="ort-cuda", explain=True)
    assert "Sum" not in op_counts(model) and "not applied" in cuda.details["rules"]["residual-sum"]["not_run"]


def test_residual_sum_must_not_fire_when_the_sum_is_read_elsewhere(rng):
    model, _ = fuse(_model(bias=False, reuse_sum=True), _feeds(rng))
    assert "Sum" not in op_counts(model)


def test_skip_layer_norm_refuses_a_skip_broadcast_over_the_sequence(rng):
    """x [B, S, H] + skip [1, 1, H] broadcasts in the Add; ORT's kernel needs the last two dims
    equal and would fail at run time."""
    model = _model(bias=False, reuse_sum=False)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 1
    feeds = _feeds(rng)
    feeds["skip"] = feeds["skip"][:1, :1]
    fused, _ = fuse(model, feeds, target="ort-cuda", family="ort")
    assert "com.microsoft::SkipLayerNormalization" not in op_counts(fused)
