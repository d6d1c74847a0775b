"""Embedding Gathers + Adds + LayerNormalization -> com.microsoft.EmbedLayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import fuse, op_counts

V, P, H = 40, 32, 16
EMBED = "com.microsoft::EmbedLayerNormalization"


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, TensorProto.INT64, np.shape(value), np.asarray(value, dtype=np.int64).reshape(-1).tolist()))


def _model(*, style="bert", ids_type=TensorProto.INT64, top="Add", beta=True, gamma_shape=(H,),
           position_start=0, leak_inner_sum=False, ln_axis=-1, seg_dims=("batch", "seq"), keep_sum=None,
           buffer=P):
    """An embedding layer as the torch exporters write it.

    style: "bert" (word + segment, then + position from Slice(arange buffer, 0, S)),
    "dynamo" (the same with S from Shape(segment ids, start=1, end=2)), "gpt2" (word +
    position from Range(0, Shape(word lookup)[1], 1), the sum also read by the residual),
    "position-input" (word + position ids given as a [1, S] graph input).
    """
    rng = np.random.default_rng(3)
    np_ids = np.int64 if ids_type == TensorProto.INT64 else np.int32
    inits = [tensor("W", rng.standard_normal((V, H)).astype(np.float32)),
             tensor("P", rng.standard_normal((P, H)).astype(np.float32)),
             tensor("T", rng.standard_normal((2, H)).astype(np.float32)),
             tensor("g", (1 + 0.1 * rng.standard_normal(gamma_shape)).astype(np.float32)),
             tensor("b", (0.1 * rng.standard_normal(H)).astype(np.float32)),
             tensor("pbuf", np.arange(buffer, dtype=np_ids)[None])]
    inputs = [vinfo("ids", ids_type, ("batch", "seq"))]
    nodes = [helper.make_node("Gather", ["W", "ids"], ["ew"])]
    parts = ["ew"]
    if style in ("bert", "dynamo"):
        inputs.append(vinfo("seg", ids_type, seg_dims))
        nodes.append(helper.make_node("Gather", ["T", "seg"], ["es"]))
        if style == "bert":
            nodes += [helper.make_node("Shape", ["ids"], ["sh"]), _const("one", 1),
                      helper.make_node("Gather", ["sh", "one"], ["s0"], axis=0), _const("ax0", [0]),
                      helper.make_node("Unsqueeze", ["s0", "ax0"], ["end0"])]
        else:
            nodes.append(helper.make_node("Shape", ["seg"], ["end0"], start=1, end=2))
        nodes += [_const("offset", [position_start]), helper.make_node("Add", ["end0", "offset"], ["end"])] \
            if position_start else [helper.make_node("Identity", ["end0"], ["end"])]
        nodes += [_const("start", [position_start]), _const("axis1", [1]),
                  helper.make_node("Slice", ["pbuf", "start", "end", "axis1", "axis1"], ["pids"])]
        nodes.append(helper.make_node("Add", ["ew", "es"], ["inner"]))
        parts = ["inner"]
    elif style == "gpt2":
        nodes += [helper.make_node("Shape", ["ew"], ["sh"]), _const("one", 1), _const("zero", 0),
                  helper.make_node("Gather", ["sh", "one"], ["s0"], axis=0),
                  helper.make_node("Range", ["zero", "s0", "one"], ["r"]), _const("ax0", [0]),
                  helper.make_node("Unsqueeze", ["r", "ax0"], ["pids"])]
    elif style == "position-input":
        inputs.append(vinfo("pids", ids_type, (1, "seq")))
    nodes.append(helper.make_node("Gather", ["P", "pids"], ["ep"]))
    nodes.append(helper.make_node(top, [parts[0], "ep"], ["s"]))
    nodes.append(helper.make_node("LayerNormalization", ["s", "g", "b"] if beta else ["s", "g"], ["y0"],
                                  axis=ln_axis, epsilon=1e-12))
    outputs = [vinfo("y", shape=("batch", "seq", H))]
    keep_sum = style == "gpt2" if keep_sum is None else keep_sum
    if keep_sum:  # the residual stream continues from the sum
        nodes.append(helper.make_node("Add", ["y0", "s"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    if leak_inner_sum:
        outputs.append(vinfo("inner", shape=("batch", "seq", H)))
    return make_model(nodes, inputs, outputs, inits)


def _feeds(rng, style="bert", dtype=np.int64, batch=2, seq=7):
    feeds = {"ids": rng.integers(0, V, (batch, seq)).astype(dtype)}
    if style in ("bert", "dynamo"):
        feeds["seg"] = rng.integers(0, 2, (batch, seq)).astype(dtype)
    if style == "position-input":
        feeds["pids"] = rng.permutation(P)[:seq][None].astype(dtype)
    return feeds


def _fused(model, feeds, target="ort-cuda", **kw):
    return fuse(model, feeds, target=target, family="ort", **kw)


@pytest.mark.parametrize("style", ["bert", "dynamo", "gpt2", "position-input"])
def test_embed_layer_norm(rng, style):
    model, result = _fused(_model(style=style), _feeds(rng, style))
    counts = op_counts(model)
    assert counts[EMBED] == 1, result.details
    assert "LayerNormalization" not in counts, counts
    readers = {n.op_type for n in model.graph for v in n.inputs if v is not None and v.name in ("W", "P", "T")}
    assert readers == {"EmbedLayerNormalization"}, readers  # every lookup went in
    node = next(n for n in model.graph if n.op_type == "EmbedLayerNormalization")
    assert (node.inputs[1] is not None) == (style in ("bert", "dynamo"))  # segment ids
    # the position input only when the positions are not the op's own 0..S-1
    assert (len(node.inputs) > 8 and node.inputs[8] is not None) == (style == "position-input")
    assert (len(node.outputs) == 3 and bool(node.outputs[2].uses())) == (style == "gpt2")  # embedding_sum


@pytest.mark.parametrize("variant", [{"ids_type": TensorProto.INT32}, {"top": "Sum"}, {"beta": False}])
def test_embed_layer_norm_variants(rng, variant):
    dtype = np.int32 if variant.get("ids_type") == TensorProto.INT32 else np.int64
    model, result = _fused(_model(**variant), _feeds(rng, dtype=dtype))
    counts = op_counts(model)
    assert counts[EMBED] == 1, result.details
    assert ("Cast" in counts) == (dtype == np.int64)  # int32 ids go in as they are


def test_other_sequence_lengths_and_batches(rng):
    """The range is proven symbolically: the fused model is right at any [B, S]."""
    from tests.conftest import assert_same_outputs

    proto = _model()
    model, _ = _fused(proto, _feeds(rng))
    assert op_counts(model)[EMBED] == 1
    for batch, seq in ((1, 1), (3, P)):
        assert_same_outputs(proto, model, _feeds(rng, batch=batch, seq=seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [
    {"gamma_shape": (1,)},  # gamma broadcast over H: not the op's 1-D [H]
    {"leak_inner_sum": True},  # an intermediate Add read elsewhere
    {"position_start": 2},  # positions 2..S+1 (RoBERTa-like): not the op's 0..S-1
    {"ln_axis": 1},
    {"seg_dims": ("segments", "seq")},  # word and segment ids' shapes not provably equal
    {"buffer": 1},  # arange(1)[0:S] is [0], broadcast over the sequence: every token at position 0
])
def test_embed_layer_norm_must_not_fire(rng, case):
    # SkipLayerNormalization would take the last Add where this refuses; its kernel fails on a
    # [1, 1, H] skip it cannot see (an error, not a number), which is not under test here
    model, result = _fused(_model(**case), _feeds(rng), explain=True, without=("ort-skip-layer-norm",))
    assert EMBED not in op_counts(model), case
    assert result.details["rules"]["ort-embed-layer-norm"]["fired"] == 0


def test_explain_names_the_reason(rng):
    _, result = _fused(_model(gamma_shape=(1,)), _feeds(rng), explain=True)
    misses = result.details["rules"]["ort-embed-layer-norm"].get("near_misses", [])
    assert any("gamma is not 1-D" in m for m in misses), misses


@pytest.mark.parametrize("target", ["portable", "tvm-llvm"])
def test_targets_without_the_op_never_get_it(rng, target):
    model, result = _fused(_model(), _feeds(rng), target=target, explain=True)
    assert EMBED not in op_counts(model) and not result.modified


def test_stays_off_for_ort_cpu_with_the_measured_reason(rng):
    model, result = _fused(_model(style="gpt2"), _feeds(rng, "gpt2"), target="ort-cpu", explain=True)
    counts = op_counts(model)
    assert EMBED not in counts and counts["Shape"] == 1, counts  # the shape rewrite is off too
    for name in ("ort-embed-layer-norm", "ort-embed-shape"):
        assert "slower" in result.details["rules"][name]["not_run"]
