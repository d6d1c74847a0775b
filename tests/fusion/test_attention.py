"""Attention fusion: head split + scaled scores + mask + softmax + PV + merge.

ORT target -> com.microsoft.MultiHeadAttention on the 3-D projections; portable ->
Attention-23 on the 4-D heads (only for opset >= 23 and targets that import it).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import fuse, op_counts

B, S, H, D = 2, 6, 4, 8
HID = H * D


def _block(opset=17, *, scale_op="Div", softmax_axis=-1, mask=True, mask_shape=("batch", 1, 1, "seq"),
           k_heads=None, dynamic=True, expose_scores=False, heads=H, dim=D, bias=False):
    rng = np.random.default_rng(3)
    H, D, HID = heads, dim, heads * dim  # noqa: N806  (the module's names, per call)
    k_heads = H if k_heads is None else k_heads
    bs = ("batch", "seq") if dynamic else (B, S)
    inits = [tensor(f"W{n}", (rng.standard_normal((HID, HID)) / np.sqrt(HID)).astype(np.float32)) for n in "qkv"]
    inits += [tensor("split", np.array([0, 0, H, D], np.int64)), tensor("ksplit", np.array([0, 0, k_heads, D], np.int64)),
              tensor("merge", np.array([0, 0, HID], np.int64)),
              tensor("c", np.float32(np.sqrt(D)) if scale_op == "Div" else np.float32(1 / np.sqrt(D)))]
    if bias:  # x @ W + b, the bias first as torch exports it
        inits += [tensor(f"b{n}", rng.standard_normal(HID).astype(np.float32) * 0.1) for n in "qkv"]
        nodes = [helper.make_node("MatMul", ["x", f"W{n}"], [f"{n}m"]) for n in "qkv"]
        nodes += [helper.make_node("Add", [f"b{n}", f"{n}m"], [f"{n}3"]) for n in "qkv"]
    else:
        nodes = [helper.make_node("MatMul", ["x", f"W{n}"], [f"{n}3"]) for n in "qkv"]
    nodes += [
        helper.make_node("Reshape", ["q3", "split"], ["qr"]),
        helper.make_node("Transpose", ["qr"], ["q4"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k3", "ksplit"], ["kr"]),
        helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v3", "split"], ["vr"]),
        helper.make_node("Transpose", ["vr"], ["v4"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q4", "kt"], ["scores"]),
        helper.make_node(scale_op, ["scores", "c"], ["scaled"]),
    ]
    last = "scaled"
    inputs = [vinfo("x", shape=(*bs, HID))]
    if mask:
        inputs.append(vinfo("m", shape=mask_shape))
        nodes.append(helper.make_node("Add", ["scaled", "m"], ["masked"]))
        last = "masked"
    nodes += [
        helper.make_node("Softmax", [last], ["p"], axis=softmax_axis),
        helper.make_node("MatMul", ["p", "v4"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "merge"], ["y"]),
    ]
    outputs = [vinfo("y", shape=(*bs, HID))]
    if expose_scores:
        outputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def _feeds(rng, mask_shape=(B, 1, 1, S)):
    m = np.zeros(mask_shape, np.float32)
    m[..., -2:] = np.finfo(np.float32).min  # the last two keys masked, like a padding mask
    return {"x": rng.standard_normal((B, S, HID)).astype(np.float32), "m": m}


@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
@pytest.mark.parametrize("mask_shape", [("batch", 1, 1, "seq"), ("batch", 1, "seq", "seq")])
def test_mha_fuses_the_whole_block(rng, scale_op, mask_shape):
    concrete = tuple(B if d == "batch" else S if d == "seq" else d for d in mask_shape)
    model, result = fuse(_block(scale_op=scale_op, mask_shape=mask_shape), _feeds(rng, concrete),
                         target="ort-cuda", family="ort")
    counts = op_counts(model)
    assert counts["com.microsoft::MultiHeadAttention"] == 1, result.details
    assert not {"Softmax", "Transpose", "Reshape"} & set(counts), counts


def test_mha_without_mask(rng):
    feeds = {"x": rng.standard_normal((B, S, HID)).astype(np.float32)}
    model, _ = fuse(_block(mask=False), feeds, target="ort-cuda", family="ort")
    assert op_counts(model)["com.microsoft::MultiHeadAttention"] == 1


@pytest.mark.parametrize("case", [{"softmax_axis": 2}, {"expose_scores": True}])
def test_mha_must_not_fire(rng, case):
    model, _ = fuse(_block(**case), _feeds(rng), target="ort-cuda", family="ort")
    assert "com.microsoft::MultiHeadAttention" not in op_counts(model)


def test_attention_23_when_the_target_accepts_it(rng):
    """Portable means TVM too, which cannot import Attention-23: the O2 rule fires for ORT."""
    model, result = fuse(_block(opset=23), _feeds(rng), target="ort-cpu")
    counts = op_counts(model)
    assert counts["Attention"] == 1 and "Softmax" not in counts, result.details


@pytest.mark.parametrize("opset,target", [(18, "portable"), (23, "tvm-llvm"), (23, "portable")])
def test_portable_attention_respects_opset_and_target(rng, opset, target):
    model, result = fuse(_block(opset=opset), _feeds(rng), target=target, explain=True)
    assert "Attention" not in op_counts(model)
    assert result.details["rules"]["attention"]["not_run"]


def test_attention_fusions_on_the_default_model():
    """models/default.onnx (a transformer encoder) end to end: verified, every layer fused."""
    from gcomp import optimize

    result = optimize("models/default.onnx", "O3", target="ort-cuda")
    assert result.verification.passed, result.verification.summary()
    ops = result.after.op_types
    assert ops.get("com.microsoft::Attention", 0) + ops.get("com.microsoft::MultiHeadAttention", 0) == 2, ops
    assert ops.get("com.microsoft::SkipLayerNormalization", 0) >= 2, ops
    assert "Softmax" not in ops and "ReduceMean" not in ops, ops


def test_mha_for_ort_cpu_only_from_eight_heads(rng):
    model, result = fuse(_block(), _feeds(rng), target="ort-cpu", family="ort", explain=True)
    assert "com.microsoft::MultiHeadAttention" not in op_counts(model)
    assert any("below 8 heads" in r for r in result.details["rules"]["ort-mha"]["near_misses"])


def test_mha_for_ort_cpu_from_eight_heads(rng):
    heads, dim = 8, 4
    feeds = {"x": rng.standard_normal((B, S, heads * dim)).astype(np.float32),
             "m": np.zeros((B, 1, 1, S), np.float32)}
    model, result = fuse(_block(heads=heads, dim=dim), feeds, target="ort-cpu", family="ort")
    assert op_counts(model)["com.microsoft::MultiHeadAttention"] == 1, result.details


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
@pytest.mark.parametrize("mask_shape", [("batch", 1, 1, "seq"), ("batch", 1, "seq", "seq")])
def test_packed_qkv_attention(rng, target, mask_shape):
    """Q/K/V projections of one input with biases -> com.microsoft.Attention, packed weights."""
    concrete = tuple(B if d == "batch" else S if d == "seq" else d for d in mask_shape)
    model, result = fuse(_block(bias=True, mask_shape=mask_shape), _feeds(rng, concrete), target=target, family="ort")
    counts = op_counts(model)
    assert counts["com.microsoft::Attention"] == 1, result.details
    assert not {"MatMul", "Softmax", "Transpose"} & set(counts), counts
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.inputs[1].const_value.shape == (HID, 3 * HID)


def test_packed_attention_needs_constant_weights(rng):
    proto = _block(bias=True)
    proto.graph.input.append(helper.make_tensor_value_info("Wk", TensorProto.FLOAT, [HID, HID]))
    feeds = {**_feeds(rng), "Wk": rng.standard_normal((HID, HID)).astype(np.float32)}
    model, _ = fuse(proto, feeds, target="ort-cuda", family="ort")
    assert "com.microsoft::Attention" not in op_counts(model)
