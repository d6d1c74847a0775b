"""pad-conv: a zero Pad on the spatial axes folded into the following Conv's pads."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

X = (2, 3, 7, 7)


def _pad_conv(rng, pads, *, value=None, mode=None, conv_pads=(1, 0, 0, 1), axes=None, extra_use=False, opset=18):
    inits = [tensor("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             tensor("p", np.asarray(pads, np.int64))]
    pad_in = ["x", "p"]
    if value is not None or axes is not None:
        inits.append(tensor("v", np.float32(value or 0)))
        pad_in.append("v")
    if axes is not None:
        inits.append(tensor("ax", np.asarray(axes, np.int64)))
        pad_in.append("ax")
    attrs = {"mode": mode} if mode else {}
    nodes = [helper.make_node("Pad", pad_in, ["xp"], **attrs),
             helper.make_node("Conv", ["xp", "W"], ["y"], pads=list(conv_pads))]
    outputs = [vinfo("y", shape=("n", 4, "h", "w"))] + ([vinfo("xp", shape=("n", 3, "h", "w"))] if extra_use else [])
    return make_model(nodes, [vinfo("x", shape=X)], outputs, inits, opset=opset)


@pytest.mark.parametrize("pads,axes", [
    ((0, 0, 1, 2, 0, 0, 2, 1), None),
    ((1, 2, 2, 1), (2, 3)),
    ((1, 0, 1, 0), (-2, -1)),
])
def test_pad_folds_into_conv(rng, pads, axes):
    model, result = fuse(_pad_conv(rng, pads, axes=axes), feeds_for(rng, x=X))
    assert result.details["fired"] == {"pad-conv": 1}
    assert op_counts(model) == {"Conv": 1}


@pytest.mark.parametrize("kwargs", [
    {"pads": (0, 0, 1, 1, 0, 0, 1, 1), "value": 1.0},  # non-zero pad value
    {"pads": (0, 0, 1, 1, 0, 0, 1, 1), "mode": "reflect"},
    {"pads": (0, 1, 1, 1, 0, 0, 1, 1)},  # pads the channel axis
    {"pads": (0, 0, -1, 1, 0, 0, 1, 1)},  # crops
    {"pads": (0, 0, 1, 1, 0, 0, 1, 1), "extra_use": True},
])
def test_pad_does_not_fold(rng, kwargs):
    pads = kwargs.pop("pads")
    proto = _pad_conv(rng, pads, conv_pads=(1, 1, 1, 1), **kwargs)
    if pads[1]:  # a padded channel: give the Conv the channels it then sees
        proto.graph.initializer[0].CopyFrom(tensor("W", rng.standard_normal((4, 4, 3, 3)).astype(np.float32)))
    model, result = fuse(proto, feeds_for(rng, x=X))
    assert not result.modified and op_counts(model) == {"Pad": 1, "Conv": 1}


def test_pad_folds_into_ort_fused_conv(rng):
    proto = _pad_conv(rng, (0, 0, 1, 1, 0, 0, 1, 1))
    conv = proto.graph.node[1]
    conv.domain, conv.op_type = "com.microsoft", "FusedConv"
    conv.attribute.append(helper.make_attribute("activation", "Relu"))
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model, result = fuse(proto, feeds_for(rng, x=X), target="ort-cpu", family="ort")
    assert result.details["fired"] == {"ort-pad-fused-conv": 1}
    assert op_counts(model) == {"com.microsoft::FusedConv": 1}
