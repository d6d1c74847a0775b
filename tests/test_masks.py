"""gcomp.passes.masks: what a decoder's additive attention mask is computed from, and the probes
that prove it is exactly causal + padding (what lets GroupQueryAttention take its own causal
masking and a padding-only bias). Each mask here is built from ``attention_mask`` the way
exporters do (index comparisons over Range, the padding ANDed in, Where to 0 / a fill)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from gcomp import io
from gcomp.passes.masks import Dims, causal_padding, mask_source
from gcomp.runtime import pass_context

from tests.conftest import make_model, tensor, vinfo

DIMS = Dims(batch="batch", total="total", seq="seq", past="past")


def _mask_model(*, causal=True, window=None, fill=np.finfo(np.float32).min, padding=True, extra_input=False,
                fill_input=False, sliced=None):
    """M [batch, 1, seq, total] from attention_mask [batch, total], input_ids [batch, seq] (its
    shape) and a cache past_key [batch, 2, past, 16] (beside it, as in an export). The key
    length is the mask's, or (``sliced``) past + seq, the mask cut to its "first" or "last"
    positions. ``fill_input``: the fill is also a graph input, a default a caller may override."""
    n = helper.make_node
    nodes = [n("Shape", ["input_ids"], ["ids_shape"]), n("Gather", ["ids_shape", "one"], ["s"], axis=0)]
    if sliced:
        nodes += [n("Shape", ["past_key"], ["pk_shape"]), n("Gather", ["pk_shape", "two"], ["p"], axis=0),
                  n("Add", ["p", "s"], ["t"]), n("Unsqueeze", ["t", "ax0"], ["t1"]), n("Neg", ["t1"], ["minus_t1"])]
        cut = ["zero1", "t1", "ax1"] if sliced == "first" else ["minus_t1", "big1", "ax1"]
        nodes.append(n("Slice", ["attention_mask", *cut], ["mask_t"]))
    else:
        nodes += [n("Shape", ["attention_mask"], ["m_shape"]), n("Gather", ["m_shape", "one"], ["t"], axis=0),
                  n("Sub", ["t", "s"], ["p"]), n("Identity", ["attention_mask"], ["mask_t"])]
    nodes += [
        n("Range", ["zero", "s", "one"], ["i"]), n("Range", ["zero", "t", "one"], ["j"]),
        n("Add", ["i", "p"], ["pos"]), n("Unsqueeze", ["pos", "ax1"], ["pos_col"]),  # [S, 1]
        n("LessOrEqual", ["j", "pos_col"], ["before"]),  # [S, T]: key j not after the query
        n("Cast", ["mask_t"], ["keep"], to=TensorProto.BOOL),
        n("Unsqueeze", ["keep", "ax12"], ["keep4"]),  # [B, 1, 1, T]
    ]
    allowed = "keep4" if padding else None
    if causal:
        nodes.append(n("Unsqueeze", ["before", "ax01"], ["before4"]))
        if allowed:
            nodes.append(n("And", ["before4", allowed], ["allowed"]))
            allowed = "allowed"
        else:
            nodes.append(n("Expand", ["before4", "ones4"], ["allowed"]))
            allowed = "allowed"
    if window is not None:
        nodes += [n("Sub", ["pos_col", "w"], ["start"]), n("Greater", ["j", "start"], ["inside"]),
                  n("Unsqueeze", ["inside", "ax01"], ["inside4"]), n("And", [allowed, "inside4"], ["windowed"])]
        allowed = "windowed"
    if extra_input:  # the mask also reads position_ids' values
        nodes += [n("Cast", ["position_ids"], ["pf"], to=TensorProto.FLOAT),
                  n("Unsqueeze", ["pf", "ax12"], ["pf4"]), n("Where", [allowed, "zero_f", "fill"], ["m0"]),
                  n("Mul", ["m0", "pf4"], ["mask"])]
    else:
        nodes.append(n("Where", [allowed, "zero_f", "fill"], ["mask"]))
    inits = [tensor("one", np.array(1, np.int64)), tensor("zero", np.array(0, np.int64)),
             tensor("ax1", np.array([1], np.int64)), tensor("ax12", np.array([1, 2], np.int64)),
             tensor("ax01", np.array([0, 1], np.int64)), tensor("zero_f", np.array(0, np.float32)),
             tensor("fill", np.array(fill, np.float32)), tensor("w", np.array(window or 0, np.int64)),
             tensor("ones4", np.array([1, 1, 1, 1], np.int64)), tensor("two", np.array(2, np.int64)),
             tensor("ax0", np.array([0], np.int64)), tensor("zero1", np.array([0], np.int64)),
             tensor("big1", np.array([2**62], np.int64))]
    inputs = [vinfo("input_ids", TensorProto.INT64, ("batch", "seq")),
              vinfo("attention_mask", TensorProto.INT64, ("batch", "total")),
              vinfo("position_ids", TensorProto.INT64, ("batch", "seq")),
              vinfo("past_key", TensorProto.FLOAT, ("batch", 2, "past", 16))]
    if fill_input:
        inputs.append(vinfo("fill", TensorProto.FLOAT, ()))
    outputs = [vinfo("mask", TensorProto.FLOAT, ("batch", 1, "seq", "total")),
               vinfo("past_key", TensorProto.FLOAT, ("batch", 2, "past", 16))]
    model = io.from_proto(make_model(nodes, inputs, outputs, inits, opset=17))
    mask = next(v for node in model.graph for v in node.outputs if v.name == "mask")
    return model, mask


def _probe(model, mask):
    source = mask_source(model, mask)
    if isinstance(source, str):
        return source
    assert source.name == "attention_mask"
    return causal_padding(model, mask, source, DIMS, pass_context().runtime)


@pytest.mark.parametrize("fill", [np.finfo(np.float32).min, -np.inf, -1e4])
def test_causal_and_padding_mask_is_proven(fill):
    assert _probe(*_mask_model(fill=fill)) is None


@pytest.mark.parametrize("kwargs,why", [
    ({"window": 100}, "past 5000"),  # a sliding window of 100 masks keys only a long past shows
    ({"causal": False}, "after the query"),  # padding only: keys after the query attended
    ({"padding": False}, "not computed from one mask input"),  # causal only: no padding input
    ({"fill": -100.0}, "not -10000 or below"),  # too weak to be a mask
])
def test_other_masks_are_refused_with_the_reason(kwargs, why):
    assert why in _probe(*_mask_model(**kwargs))


def test_a_mask_reading_another_input_s_values_is_refused():
    assert "not computed from one mask input" in _probe(*_mask_model(extra_input=True))


def test_without_a_runtime_nothing_is_proven():
    model, mask = _mask_model()
    assert "no runtime" in causal_padding(model, mask, model.graph.inputs[1], DIMS, None)


def test_a_fill_a_caller_may_override_is_another_input():
    """IR >= 4: an initializer that is also a graph input is a default; the mask then reads
    two inputs' values. In IR 3 every initializer is listed and none can be fed."""
    model, mask = _mask_model(fill_input=True)
    assert "reads attention_mask, fill" in _probe(model, mask)
    model.ir_version = 3
    assert _probe(model, mask) is None


def test_a_mask_longer_than_the_keys_must_be_read_from_its_first_positions():
    """Exports cut attention_mask to past + new tokens, so they take a longer one: the fused
    graph reads its first positions, which the probes check (a cut from the end is refused)."""
    assert _probe(*_mask_model(sliced="first")) is None
    assert "longer than the keys" in _probe(*_mask_model(sliced="last"))
