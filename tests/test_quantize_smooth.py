"""SmoothQuant-style smoothing in ``quantize-dynamic`` (``passes/quant/_smooth.py``), on ONNX Runtime
with its optimizations off.

The outlier test is the reason smoothing exists: an activation with a few channels 50x larger
than the rest, quantized per tensor, leaves the other channels a handful of uint8 levels;
smoothing divides those channels by ``s`` and multiplies the weight's rows by it (exact in
float), so the activation's step shrinks and the product keeps its signal. Numbers are printed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from gcomp import backends, registry, runtime
from gcomp.errors import OptionError
from gcomp.passes.quant import _smooth, dynamic
from gcomp.registry import PassContext
from tests.conftest import make_model, tensor, vinfo

ORT = "com.microsoft"
K, FFN, N = 64, 128, 48
OUTLIERS = (3, 17, 40, 58)  # channels 50x larger


def _DEQUANTIZE(w):  # per-column int8, as quantize-dynamic stores its weights
    return np.multiply(*dynamic.quantize_int8(w, True))


def _rng():
    return np.random.default_rng(0)


def _errors(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    e, a = expected.ravel().astype(np.float64), actual.ravel().astype(np.float64)
    return float(e @ a / (np.linalg.norm(e) * np.linalg.norm(a))), float(np.linalg.norm(a - e) / np.linalg.norm(e))


def _run(model, feeds):
    model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    return runtime.reference(model).run(feeds)


def _context(*samples):
    """The pipeline's context, calibrating on ``samples``."""
    return dataclasses.replace(runtime.pass_context(), calibration=tuple(samples))


def _quantize(proto, context, **options):
    model = ir.serde.deserialize_model(proto) if not isinstance(proto, ir.Model) else proto.clone()
    result = registry.get_pass("quantize-dynamic").create(context=context, target="ort-cpu", **options)(model)
    return result.model, result.details


def _outlier_activation(shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., list(OUTLIERS)] *= 50
    return x


def _weight(k, n, rng):
    return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


# ------------------------------------------------------------------------------ the formula


def test_smoothing_scale_follows_the_formula_floored_at_its_median():
    m = np.array([1.0, 1.0, 4.0, 0.0, 100.0, 1.0], np.float32)
    w = np.array([1.0, 1.0, 1.0, 2.0, 1.0, 0.0], np.float32)
    s = _smooth.smoothing_scale(m, w, 0.5)
    raw = np.array([1.0, 1.0, 2.0, 1.0, 10.0, 1.0])  # m^0.5 / w^0.5; 1 where m or w is 0
    np.testing.assert_allclose(s, np.maximum(raw / np.median(raw), 1.0), rtol=1e-6)
    assert s.dtype == np.float32 and s.min() == 1.0 and s[4] == 10.0
    # alpha = 1: s = m (all of the range to the weights), clipped
    np.testing.assert_allclose(_smooth.smoothing_scale(np.array([1e-9, 1.0, 1e9]), np.ones(3), 1.0),
                               [1.0, 1.0, 1e5], rtol=1e-6)


# ------------------------------------------------------------------------------ accuracy: outlier channels


def test_smoothing_recovers_the_signal_an_outlier_activation_loses():
    rng = _rng()
    w = _weight(K, N, rng)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
                       [vinfo("x", shape=("batch", K))], [vinfo("y", shape=("batch", N))], [tensor("W", w)])
    calibration = {"x": _outlier_activation((64, K), rng)}
    feeds = {"x": _outlier_activation((64, K), rng)}
    expected = _run(proto, feeds)["y"]
    result = {}
    for alpha in (0.0, 0.65):
        model, details = _quantize(proto, _context(calibration), smooth=alpha)
        result[alpha] = _errors(expected, _run(model, feeds)["y"])
        print(f"outlier channels, smooth={alpha}: cosine {result[alpha][0]:.5f}, rel-L2 {result[alpha][1]:.4g}")
    (cos_plain, rel_plain), (cos_smooth, rel_smooth) = result[0.0], result[0.65]
    assert details["quantized"][0]["smoothed"] and details["quantized"][0]["smoothing"] == "Mul 'x/smooth' inserted"
    assert rel_smooth * 2.5 < rel_plain, result
    assert (1 - cos_smooth) * 5 < 1 - cos_plain, result
    assert cos_smooth >= 0.999 and rel_smooth < 0.03, result


# ------------------------------------------------------------------------------ a transformer-like block


def _block(decomposed_ffn_scale: bool = False):
    """LayerNorm (outlier channels in its scale) read by Q, K, V only (fold); a second LayerNorm
    read by the up projection and the residual (a Mul is inserted); the up projection's
    activation scaled per channel by a constant Mul (fold), or by Mul then Add
    (``decomposed_ffn_scale``: the fold follows the Add to the Mul)."""
    rng = _rng()
    g1 = np.ones(K, np.float32)
    g1[list(OUTLIERS)] = 30.0
    g2 = g1.copy()
    scale = np.ones(FFN, np.float32)
    scale[[5, 77]] = 40.0
    inits = [tensor("g1", g1), tensor("b1", (0.1 * rng.standard_normal(K)).astype(np.float32)),
             tensor("g2", g2), tensor("b2", (0.1 * rng.standard_normal(K)).astype(np.float32)),
             tensor("Wq", _weight(K, K, rng)), tensor("Wk", _weight(K, K, rng)), tensor("Wv", _weight(K, K, rng)),
             tensor("Wup", _weight(K, FFN, rng)), tensor("bup", (0.1 * rng.standard_normal(FFN)).astype(np.float32)),
             tensor("c", scale), tensor("Wdown", _weight(FFN, K, rng)),
             tensor("shift", (0.1 * rng.standard_normal(FFN)).astype(np.float32))]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["ln1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["ln1", "Wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["ln1", "Wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["ln1", "Wv"], ["v"], name="v"),
        helper.make_node("Mul", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "v"], ["att"], name="att"),
        helper.make_node("Add", ["att", "x"], ["res1"], name="res1"),
        helper.make_node("LayerNormalization", ["res1", "g2", "b2"], ["ln2"], name="ln2", axis=-1),
        helper.make_node("MatMul", ["ln2", "Wup"], ["up"], name="up"),
        helper.make_node("Add", ["up", "bup"], ["upb"], name="up_bias"),
        helper.make_node("Relu", ["upb"], ["act"], name="relu"),
        helper.make_node("Mul", ["act", "c"], ["scaled"], name="channel_scale"),
    ]
    hidden = "scaled"
    if decomposed_ffn_scale:
        nodes.append(helper.make_node("Add", ["scaled", "shift"], ["shifted"], name="channel_shift"))
        hidden = "shifted"
    nodes += [helper.make_node("MatMul", [hidden, "Wdown"], ["down"], name="down"),
              helper.make_node("Add", ["down", "ln2"], ["y"], name="res2")]
    return make_model(nodes, [vinfo("x", shape=(2, 16, K))], [vinfo("y", shape=(2, 16, K))], inits)


def _block_feeds(seed):
    return {"x": np.random.default_rng(seed).standard_normal((2, 16, K)).astype(np.float32)}


def test_transformer_block_folds_into_layer_norm_and_constant_mul_and_inserts_one_mul():
    proto = _block()
    calibration, feeds = _block_feeds(1), _block_feeds(2)
    expected = _run(proto, feeds)["y"]
    plain, _ = _quantize(proto, _context(calibration), smooth=0.0)
    model, details = _quantize(proto, _context(calibration))
    how = {q["node"]: q["smoothing"] for q in details["quantized"]}
    assert all(q["smoothed"] for q in details["quantized"]), how
    assert how["q"] == how["k"] == how["v"] == "folded into LayerNormalization 'ln1'"
    assert how["up"] == "Mul 'ln2/smooth' inserted"  # ln2 also feeds the residual: no fold
    assert how["down"] == "folded into Mul 'channel_scale'"
    assert details["smoothing"] == {"alpha": 0.65, "samples": 1, "note": None, "groups": 3, "folded": 2,
                                    "muls_inserted": 1}
    ops = [n.op_type for n in model.graph]
    assert ops.count("Mul") == 3 and ops.count("DynamicQuantizeMatMul") == 5, ops  # qk, channel_scale, smooth
    ln1 = next(n for n in model.graph if n.name == "ln1")
    assert ln1.inputs[1].name != "g1" and "g1" not in model.graph.initializers  # a new scale, the old one gone
    assert ln1.outputs[0].name == "ln1/smoothed"  # new contents, new name (no false match with the float model)
    assert "g2" in model.graph.initializers  # ln2 untouched
    errors = {name: _errors(expected, _run(m, feeds)["y"]) for name, m in (("plain", plain), ("smoothed", model))}
    print(f"transformer block: plain cosine {errors['plain'][0]:.5f} rel-L2 {errors['plain'][1]:.4g}; "
          f"smoothed cosine {errors['smoothed'][0]:.5f} rel-L2 {errors['smoothed'][1]:.4g}")
    assert errors["smoothed"][1] * 2 < errors["plain"][1] and errors["smoothed"][0] >= 0.999, errors


@pytest.mark.parametrize("decomposed", [False, True])
def test_smoothing_alone_changes_outputs_only_by_float_rounding(decomposed):
    proto = _block(decomposed_ffn_scale=decomposed)
    model = ir.serde.deserialize_model(proto)
    report = _smooth.smooth_float(model, 0.65, _context(_block_feeds(1)), _DEQUANTIZE)
    expected_fold = "folded into Add 'channel_shift', Mul 'channel_scale'" if decomposed else \
        "folded into Mul 'channel_scale'"
    assert report["nodes"]["down"]["smoothed"] and report["nodes"]["down"]["smoothing"] == expected_fold
    assert report["nodes"]["q"]["smoothing"] == "folded into LayerNormalization 'ln1'"
    weights = {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "MatMul"
               and n.inputs[1].const_value is not None}
    original = {name: ir.serde.deserialize_model(proto).graph.initializers[w].const_value.numpy()
                for name, w in (("q", "Wq"), ("down", "Wdown"))}
    assert not np.allclose(weights["q"], original["q"]) and not np.allclose(weights["down"], original["down"])
    for seed in (2, 3):
        feeds = _block_feeds(seed)
        e, a = _run(proto, feeds)["y"], _run(model, feeds)["y"]
        rel = float(np.linalg.norm(a - e) / np.linalg.norm(e))
        print(f"smoothing alone (decomposed={decomposed}, seed {seed}): rel-L2 {rel:.3g}")
        assert rel < 1e-5 and np.allclose(a, e, rtol=1e-4, atol=1e-4), rel


def test_skip_layer_normalization_fold_is_exact():
    rng = _rng()
    gamma = np.ones(K, np.float32)
    gamma[list(OUTLIERS)] = 30.0
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["n"], name="skip_ln",
                              domain=ORT, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "W"], ["y"], name="proj")]
    proto = make_model(nodes, [vinfo("x", shape=(2, 8, K)), vinfo("skip", shape=(2, 8, K))],
                       [vinfo("y", shape=(2, 8, N))],
                       [tensor("gamma", gamma), tensor("beta", (0.1 * rng.standard_normal(K)).astype(np.float32)),
                        tensor("W", _weight(K, N, rng))], extra_opsets=[helper.make_opsetid(ORT, 1)])
    feeds = {"x": rng.standard_normal((2, 8, K)).astype(np.float32),
             "skip": rng.standard_normal((2, 8, K)).astype(np.float32)}
    model = ir.serde.deserialize_model(proto)
    report = _smooth.smooth_float(model, 0.65, _context(feeds), _DEQUANTIZE)
    assert report["nodes"]["proj"]["smoothing"] == "folded into SkipLayerNormalization 'skip_ln'"
    np.testing.assert_allclose(_run(model, feeds)["y"], _run(proto, feeds)["y"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ groups, calibration, options


def test_nodes_sharing_a_weight_share_s_and_one_int8_copy():
    rng = _rng()
    nodes = [helper.make_node("MatMul", ["a", "W"], ["ya"], name="left"),
             helper.make_node("MatMul", ["b", "W"], ["yb"], name="right")]
    proto = make_model(nodes, [vinfo("a", shape=("batch", K)), vinfo("b", shape=("batch", K))],
                       [vinfo("ya", shape=("batch", N)), vinfo("yb", shape=("batch", N))],
                       [tensor("W", _weight(K, N, rng))])
    feeds = {"a": _outlier_activation((32, K), rng), "b": _outlier_activation((32, K), rng)}
    model, details = _quantize(proto, _context(feeds))
    assert [q["smoothing"] for q in details["quantized"]] == ["Mul 'a/smooth' inserted", "Mul 'b/smooth' inserted"]
    assert details["smoothing"]["groups"] == 1
    int8 = [name for name, v in model.graph.initializers.items() if v.const_value.dtype == ir.DataType.INT8
            and len(v.shape) == 2]
    inverse = [name for name in model.graph.initializers if "smooth_inverse" in name]
    assert len(int8) == 1 and len(inverse) == 1, list(model.graph.initializers)
    expected, actual = _run(proto, feeds), _run(model, feeds)
    for name in ("ya", "yb"):
        cosine, rel = _errors(expected[name], actual[name])
        assert cosine >= 0.999 and rel < 0.03, (name, cosine, rel)


def test_no_smoothing_without_runtime_or_samples():
    proto = _block()
    no_samples = PassContext(runtime=runtime.ReferenceRuntime(), capabilities=backends.capabilities)
    _, details = _quantize(proto, no_samples)
    assert details["smoothing"]["note"] == ("off: no calibration samples (the context has neither calibration "
                                            "nor inputs)")
    assert {(q["smoothed"], q["smoothing"]) for q in details["quantized"]} == {(False, details["smoothing"]["note"])}
    assert details["smoothing"]["groups"] == 0 and len(details["quantized"]) == 5
    model = ir.serde.deserialize_model(proto)  # portable needs no context; smoothing then has no runtime
    details = registry.get_pass("quantize-dynamic").create()(model).details
    assert details["smoothing"]["note"].startswith("off: no runtime to calibrate on")
    assert not any(q["smoothed"] for q in details["quantized"])


def test_a_group_smoothing_would_not_help_is_left_alone():
    """No outlier channels: the simulated error on the calibration rows does not drop by a
    fifth, so no Mul is spent on it."""
    rng = _rng()
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
                       [vinfo("x", shape=("batch", K))], [vinfo("y", shape=("batch", N))],
                       [tensor("W", _weight(K, N, rng))])
    calibration = {"x": rng.standard_normal((256, K)).astype(np.float32)}
    model, details = _quantize(proto, _context(calibration))
    entry = details["quantized"][0]
    assert not entry["smoothed"] and entry["smoothing"].startswith("off: no gain on the calibration data"), entry
    assert entry["simulated_error"]["smoothed"] > 0.8 * entry["simulated_error"]["plain"], entry
    assert "Mul" not in [n.op_type for n in model.graph]


def test_smooth_option_is_checked():
    with pytest.raises(OptionError, match=r"smooth must lie in \[0, 1\]"):
        registry.get_pass("quantize-dynamic").create(smooth=1.5)
    option = next(o for o in registry.get_pass("quantize-dynamic").options if o.name == "smooth")
    assert option.type is float and option.default == 0.65 and option.parse("0") == 0.0
