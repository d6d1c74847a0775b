"""Attention as transformers' default (sdpa) attention is exported: the scale split over Q and
K^T as ``(Q * a) @ (K^T * b)`` (rule ``attention-scores-scale``, ORT's ``ort-attention-scores-scale``, makes it ``(Q @ K^T) * ab``)
and the softmax read through ``Where(IsNaN(P), 0, P)`` (the attention rules' guarded
variants; the fused kernel gets the mask clamped to the lowest finite value, so no row is NaN).
Proven on ORT against the original (``fuse`` compares outputs), then structure."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, ort_run, tensor, vinfo
from tests.fusion._util import fuse, op_counts

B, S, H, D = 2, 5, 4, 8
HID = H * D
ATTENTION = "com.microsoft::Attention"


def _sdpa_block(*, guard_value=0.0, masked=True):
    """Q/K/V projections of x, heads by Reshape + Transpose, Q * sqrt(c) @ (K^T * sqrt(c)),
    + mask [B, 1, 1, S], softmax, the NaN guard writing ``guard_value``, @ V, heads merged."""
    rng = np.random.default_rng(3)
    n = helper.make_node
    inits = [tensor("split", np.array([0, 0, H, D], np.int64)), tensor("merge", np.array([0, 0, HID], np.int64)),
             tensor("sc", np.array(D ** -0.25, np.float32)), tensor("guard", np.array([guard_value], np.float32))]
    nodes = []
    for name in "qkv":
        inits += [tensor(f"w{name}", (rng.standard_normal((HID, HID)) / np.sqrt(HID)).astype(np.float32)),
                  tensor(f"b{name}", (0.1 * rng.standard_normal(HID)).astype(np.float32))]
        nodes += [n("MatMul", ["x", f"w{name}"], [f"{name}m"]), n("Add", [f"{name}m", f"b{name}"], [f"{name}a"]),
                  n("Reshape", [f"{name}a", "split"], [f"{name}r"])]
    nodes += [n("Transpose", ["qr"], ["q4"], perm=[0, 2, 1, 3]), n("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
              n("Transpose", ["vr"], ["v4"], perm=[0, 2, 1, 3]),
              n("Mul", ["q4", "sc"], ["qs"]), n("Mul", ["kt", "sc"], ["ks"]), n("MatMul", ["qs", "ks"], ["scores"])]
    if masked:
        nodes.append(n("Add", ["scores", "mask"], ["masked"]))
    nodes += [n("Softmax", ["masked" if masked else "scores"], ["p"], axis=-1), n("IsNaN", ["p"], ["nan"]),
              n("Where", ["nan", "guard", "p"], ["pg"]), n("MatMul", ["pg", "v4"], ["o4"]),
              n("Transpose", ["o4"], ["o"], perm=[0, 2, 1, 3]), n("Reshape", ["o", "merge"], ["y"])]
    inputs = [vinfo("x", shape=(B, S, HID))] + ([vinfo("mask", shape=(B, 1, 1, S))] if masked else [])
    return make_model(nodes, inputs, [vinfo("y", shape=(B, S, HID))], inits)


def _feeds(masked=True, rng=None):
    rng = rng or np.random.default_rng(4)
    feeds = {"x": rng.standard_normal((B, S, HID)).astype(np.float32)}
    if masked:
        mask = np.zeros((B, 1, 1, S), np.float32)
        mask[1, ..., -2:] = -np.inf  # the second row's last two keys are padding
        feeds["mask"] = mask
    return feeds


@pytest.mark.parametrize("masked", [True, False])
def test_split_scale_and_nan_guard_fuse_to_ort_attention(masked):
    proto = _sdpa_block(masked=masked)
    model, result = fuse(proto, _feeds(masked), target="ort-cpu", family="ort")
    counts = op_counts(model)
    assert counts[ATTENTION] == 1 and counts["Softmax"] == 0 and counts["IsNaN"] == 0, counts
    assert result.details["fired"]["ort-attention-scores-scale"] == 1


def test_a_row_with_every_key_masked_stays_finite():
    """The export's guard makes such a row 0; the fused kernel has none, so the mask is
    clamped and the row is finite (the mean of V, projected); every other row is equal."""
    proto = _sdpa_block()
    feeds = _feeds()
    model, _ = fuse(proto, feeds, target="ort-cpu", family="ort")
    from tests.fusion.test_ort_group_query_attention import ir_proto

    feeds["mask"][0] = -np.inf  # batch row 0 attends nothing
    fused, original = ort_run(ir_proto(model), feeds)["y"], ort_run(proto, feeds)["y"]
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused[1], original[1], rtol=1e-5, atol=1e-5)


def test_a_guard_that_writes_another_value_is_a_near_miss():
    proto = _sdpa_block(guard_value=1.0)
    model, result = fuse(proto, _feeds(), target="ort-cpu", family="ort", explain=True)
    assert op_counts(model)[ATTENTION] == 0
    misses = [m for rule in ("ort-attention", "ort-mha") for m in result.details["rules"][rule].get("near_misses", [])]
    assert any("NaN guard does not write 0" in m for m in misses), misses
