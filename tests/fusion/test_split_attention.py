"""GPT-2's attention: one projection split into Q, K, V + causal/padding-masked attention
-> com.microsoft.Attention with the projection's weight packed as it is (+ Reshape to heads)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import fuse, op_counts

B, S, H, D = 2, 6, 4, 8
HID = H * D
ATTENTION = "com.microsoft::Attention"


def _const(name, values):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, 7, [len(values)], values))


def _block(*, projection="gemm", alpha=1.0, sizes_from_k=True, reuse_q=False, weight_input=False):
    """GPT-2's block as the exporters write it: ``projection`` "gemm" (TorchScript: flatten, Gemm,
    reshape back with x's [B, S]) or "matmul" (MatMul + Add on 3-D); V reshaped with sizes read
    from K (TorchScript) when ``sizes_from_k``; the output is the [B, S, heads, D] head transpose,
    read twice (the merge reshape and a shape read), like GPT-2's."""
    rng = np.random.default_rng(5)
    inits = [tensor("W", (rng.standard_normal((HID, 3 * HID)) / np.sqrt(HID)).astype(np.float32)),
             tensor("b", (0.1 * rng.standard_normal(3 * HID)).astype(np.float32)),
             tensor("split", np.array([HID] * 3, np.int64)), tensor("heads", np.array([0, 0, -1, D], np.int64)),
             tensor("c", np.float32(1 / np.sqrt(D))), tensor("flat", np.array([-1, HID], np.int64)),
             tensor("merge", np.array([0, 0, HID], np.int64))]
    nodes = []
    if projection == "gemm":
        nodes += [helper.make_node("Shape", ["x"], ["xs"]), _const("i0", [0]), _const("i1", [1]), _const("last", [3 * HID]),
                  helper.make_node("Gather", ["xs", "i0"], ["xb"], axis=0),
                  helper.make_node("Gather", ["xs", "i1"], ["xq"], axis=0),
                  helper.make_node("Concat", ["xb", "xq", "last"], ["unflat"], axis=0),
                  helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                  helper.make_node("Gemm", ["x2", "W", "b"], ["p"], alpha=alpha),
                  helper.make_node("Reshape", ["p", "unflat"], ["qkv"])]
    else:
        nodes += [helper.make_node("MatMul", ["x", "W"], ["xm"]), helper.make_node("Add", ["xm", "b"], ["qkv"])]
    nodes.append(helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=2))
    if sizes_from_k:
        nodes += [helper.make_node("Shape", ["k"], ["ks"]), _const("j0", [0]), _const("j1", [1]),
                  _const("hd", [-1, D]), helper.make_node("Gather", ["ks", "j0"], ["kb"], axis=0),
                  helper.make_node("Gather", ["ks", "j1"], ["kq"], axis=0),
                  helper.make_node("Concat", ["kb", "kq", "hd"], ["vheads"], axis=0)]
    nodes += [
        helper.make_node("Reshape", ["q", "heads"], ["qr"]), helper.make_node("Transpose", ["qr"], ["q4"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "heads"], ["kr"]), helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v", "vheads" if sizes_from_k else "heads"], ["vr"]),
        helper.make_node("Transpose", ["vr"], ["v4"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q4", "kt"], ["scores"]), helper.make_node("Mul", ["scores", "c"], ["scaled"]),
        helper.make_node("Add", ["scaled", "m"], ["masked"]), helper.make_node("Softmax", ["masked"], ["pr"], axis=-1),
        helper.make_node("MatMul", ["pr", "v4"], ["o"]), helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "merge"], ["y"]), helper.make_node("Shape", ["ot"], ["yshape"]),
    ]
    outputs = [vinfo("y", shape=("batch", "seq", HID)), vinfo("yshape", 7, (4,))]
    if reuse_q:
        outputs.append(vinfo("q", shape=("batch", "seq", HID)))
    inputs = [vinfo("x", shape=("batch", "seq", HID)), vinfo("m", shape=("batch", 1, "seq", "seq"))]
    if weight_input:  # a weight the caller may override: not packable at compile time
        inputs.append(vinfo("W", shape=(HID, 3 * HID)))
        inits = [t for t in inits if t.name != "W"]
    return make_model(nodes, inputs, outputs, inits)


def _feeds(rng, batch=B, seq=S, weight=False):
    """GPT-2's additive mask: causal, and the first key of batch 0 padded."""
    m = np.triu(np.full((seq, seq), np.finfo(np.float32).min, np.float32), 1)
    m = np.broadcast_to(m, (batch, 1, seq, seq)).copy()
    m[0, :, :, 0] = np.finfo(np.float32).min
    feeds = {"x": rng.standard_normal((batch, seq, HID)).astype(np.float32), "m": m}
    if weight:
        feeds["W"] = (rng.standard_normal((HID, 3 * HID)) / np.sqrt(HID)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
@pytest.mark.parametrize("projection", ["gemm", "matmul"])
def test_split_attention(rng, projection, target):
    model, result = fuse(_block(projection=projection), _feeds(rng), target=target, family="ort")
    counts = op_counts(model)
    assert counts[ATTENTION] == 1, result.details
    assert not {"Softmax", "Split", "MultiHeadAttention"} & set(counts), counts
    node = next(n for n in model.graph if n.op_type == "Attention")
    assert node.attributes["num_heads"].as_int() == H
    assert node.inputs[1].name == "W"  # the projection's own weight: Q, K, V columns side by side
    assert len(node.inputs) == 6 and node.inputs[5] is not None  # the mask as attention_bias


def test_split_attention_at_other_sizes(rng):
    from tests.conftest import assert_same_outputs

    proto = _block()
    model, _ = fuse(proto, _feeds(rng), target="ort-cpu", family="ort")
    assert op_counts(model)[ATTENTION] == 1
    for batch, seq in ((1, 1), (3, 11)):
        assert_same_outputs(proto, model, _feeds(rng, batch, seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [
    {"weight_input": True},  # the projection weight is not a constant
    {"alpha": 0.5},  # a scaled projection
    {"reuse_q": True},  # Q read elsewhere
])
def test_split_attention_must_not_fire(rng, case):
    feeds = _feeds(rng, weight=case.get("weight_input", False))
    model, result = fuse(_block(**case), feeds, target="ort-cpu", family="ort", explain=True)
    assert ATTENTION not in op_counts(model), case
    assert result.details["rules"]["ort-attention-split"]["fired"] == 0


def test_portable_target_gets_no_contrib_attention(rng):
    model, result = fuse(_block(), _feeds(rng), target="portable", family="ort")
    assert ATTENTION not in op_counts(model) and not result.modified
