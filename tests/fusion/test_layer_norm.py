"""LayerNorm fusion: the decomposed forms exporters emit -> LayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

SHAPE = (2, 5, 16)


def _ln(opset=17, *, square="pow", divide="div", affine="full", axes=(-1,), eps_place="inside",
        gamma_shape=(16,), keepdims=1, extra_use=None, shape=SHAPE):
    rng = np.random.default_rng(1)
    inits = [tensor("eps", np.float32(1e-5)), tensor("two", np.float32(2))]
    if opset >= 18:
        inits.append(tensor("axes", np.array(axes, np.int64)))
        rm = lambda i, o, n: helper.make_node("ReduceMean", [i, "axes"], [o], name=n, keepdims=keepdims)  # noqa: E731
    else:
        rm = lambda i, o, n: helper.make_node("ReduceMean", [i], [o], name=n, axes=list(axes), keepdims=keepdims)  # noqa: E731
    nodes = [rm("x", "mean", "rm1"), helper.make_node("Sub", ["x", "mean"], ["d"], name="sub")]
    if square == "pow":
        nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"], name="pow"))
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["sq"], name="sq"))
    nodes.append(rm("sq", "var", "rm2"))
    if eps_place == "inside":
        nodes += [helper.make_node("Add", ["var", "eps"], ["ve"], name="addeps"),
                  helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt")]
    else:  # d / (sqrt(var) + eps): not layer norm
        nodes += [helper.make_node("Sqrt", ["var"], ["s0"], name="sqrt"),
                  helper.make_node("Add", ["s0", "eps"], ["std"], name="addeps")]
    if divide == "div":
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"], name="div"))
    else:
        nodes += [helper.make_node("Reciprocal", ["std"], ["r"], name="rec"),
                  helper.make_node("Mul", ["r", "d"], ["n"], name="mulr")]
    out = "n"
    if affine in ("full", "scale"):
        inits.append(tensor("gamma", (1 + rng.standard_normal(gamma_shape) * 0.1).astype(np.float32)))
        nodes.append(helper.make_node("Mul", ["gamma", "n"], ["g"], name="gamma"))
        out = "g"
    if affine == "full":
        inits.append(tensor("beta", rng.standard_normal(gamma_shape).astype(np.float32) * 0.1))
        nodes.append(helper.make_node("Add", ["g", "beta"], ["b"], name="beta"))
        out = "b"
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    outputs = [vinfo("y", shape=shape)]
    if extra_use:
        outputs.append(helper.make_tensor_value_info(extra_use, 1, None))
    return make_model(nodes, [vinfo("x", shape=shape)], outputs, inits, opset=opset)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square,divide", [("pow", "div"), ("mul", "reciprocal")])
@pytest.mark.parametrize("affine", ["full", "scale", "none"])
def test_layer_norm_variants(rng, opset, square, divide, affine):
    model, result = fuse(_ln(opset, square=square, divide=divide, affine=affine), feeds_for(rng, x=SHAPE))
    counts = op_counts(model)
    assert counts["LayerNormalization"] == 1 and "ReduceMean" not in counts, counts
    assert sum(counts.values()) == 2  # LayerNormalization + the output Identity


def test_layer_norm_over_two_trailing_axes(rng):
    model, _ = fuse(_ln(axes=(-2, -1), gamma_shape=(5, 16)), feeds_for(rng, x=SHAPE))
    (ln,) = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert ln.attributes["axis"].as_int() == 1


def test_layer_norm_broadcast_gamma_is_reshaped(rng):
    model, _ = fuse(_ln(gamma_shape=(1, 1, 16)), feeds_for(rng, x=SHAPE))
    assert op_counts(model)["LayerNormalization"] == 1


@pytest.mark.parametrize("case", [
    {"eps_place": "outside"},                   # epsilon in the wrong place: a different function
    {"axes": (1,)},                             # not the trailing axis
    {"keepdims": 0, "shape": (16, 16, 16)},     # mean broadcasts along the wrong axis
    {"extra_use": "mean"},                      # an intermediate is used elsewhere
])
def test_layer_norm_must_not_fire(rng, case):
    model, _ = fuse(_ln(**case), feeds_for(rng, x=case.get("shape", SHAPE)))
    assert "LayerNormalization" not in op_counts(model), case


def test_gamma_over_a_non_normalised_axis_stays_outside(rng):
    model, _ = fuse(_ln(gamma_shape=(5, 1)), feeds_for(rng, x=SHAPE))
    counts = op_counts(model)
    assert counts["LayerNormalization"] == 1 and counts["Mul"] == 1 and counts["Add"] == 1, counts


def test_tf2onnx_scale_shift_form(rng):
    """Keras LayerNormalization through tf2onnx: y = x*s + (beta - mean*s), s = gamma*rsqrt(var+eps)."""
    g = (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)
    b = (0.1 * rng.standard_normal(16)).astype(np.float32)
    inits = [tensor("eps", np.float32(1e-3)), tensor("gamma", g), tensor("beta", b)]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["rstd"]),
        helper.make_node("Mul", ["rstd", "gamma"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("Mul", ["mean", "s"], ["ms"]),
        helper.make_node("Sub", ["beta", "ms"], ["shift"]),
        helper.make_node("Add", ["xs", "shift"], ["y"]),
    ]
    proto = make_model(nodes, [vinfo("x", shape=SHAPE)], [vinfo("y", shape=SHAPE)], inits)
    model, result = fuse(proto, feeds_for(rng, x=SHAPE))
    assert op_counts(model) == {"LayerNormalization": 1}, result.details
