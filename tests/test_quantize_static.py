"""The ``quantize-static`` pass (int8 QDQ with calibrated activation ranges) proven on ONNX Runtime.

Accuracy runs the float and the quantized model on ORT with its optimizations off
(:func:`gcomp.runtime.reference`) on held-out seeded inputs (not the calibration samples)
and bounds the cosine (>= 0.99) and the relative L2 error ``||a - e|| / ||e||``. Its bound
comes from the two roundings per layer: a weight's (uniform in ``±s_w/2``, ``s_w = max|w| /
127`` per channel, rms ~0.7 % of the weights' rms, as in tests/test_quantize_passes.py) and
an activation's (uniform in ``±s/2`` with ``s`` = its calibrated range / 255; a range of
~7 standard deviations gives rms 7 / 255 / sqrt(12) ~ 0.8 % of the tensor's spread). The
CNN below has 5 quantized layers and 7 calibrated tensors: independent errors add to
~sqrt(5 * 0.7^2 + 7 * 0.8^2) ~ 2.6 %, so the bound is 5e-2 (measured: 1.3 to 2.3 %).

Numbers are printed in the assertion messages (``pytest -s`` shows them all).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from gcomp import registry, runtime
from gcomp.backends.ort import OrtBackend
from gcomp.errors import GcompError, OptionError
from gcomp.passes.quant import _calibration, static
from tests.conftest import make_model, tensor, vinfo
from tests.test_quantize_passes import _errors, _mlp, _mlp_feeds

COSINE = 0.99
CNN_REL = 5e-2
MLP_REL = 3e-2  # three layers, three calibrated tensors: ~sqrt(3 * 0.7^2 + 3 * 0.8^2) ~ 1.8 %
SAMPLES = 16
CNN_CONVS = ["conv1", "conv2", "conv3", "conv4"]


# ------------------------------------------------------------------------------ models and helpers


def _he(rng, shape):
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _cnn(opset=17):
    """Conv+Relu, Conv+Relu, Conv (no Relu) + residual Add + Relu, MaxPool, Conv + Clip(0, 6),
    GlobalAveragePool, Flatten, Gemm (transB, bias): BN already folded, He-initialised."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (8, 8, 3, 3)), ("w4", (16, 8, 3, 3))):
        bias = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)
        inits += [tensor(name, _he(rng, shape)), tensor(f"b{name[1]}", bias)]
    inits += [tensor("wfc", _he(rng, (10, 16))), tensor("bfc", (0.1 * rng.standard_normal(10)).astype(np.float32)),
              tensor("zero", np.array(0.0, np.float32)), tensor("six", np.array(6.0, np.float32))]
    pad = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    nodes += [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **pad),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **pad),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", **pad),
        helper.make_node("Add", ["c3", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r3"], name="relu3"),
        helper.make_node("MaxPool", ["r3"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w4", "b4"], ["c4"], name="conv4", **pad),
        helper.make_node("Clip", ["c4", "zero", "six"], ["r4"], name="relu6"),
        helper.make_node("GlobalAveragePool", ["r4"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [vinfo("x", shape=("batch", 3, 16, 16))], [vinfo("logits", shape=("batch", 10))],
                      inits, opset=opset)


def _cnn_feeds(seed, batch=2):
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)}


def _context(samples):
    return dataclasses.replace(runtime.pass_context(), calibration=tuple(samples))


@pytest.fixture(scope="module")
def cnn_context():
    return _context([_cnn_feeds(seed) for seed in range(SAMPLES)])


def _ir(model) -> ir.Model:
    """A fresh ir.Model of a ModelProto or a copy of an ir.Model."""
    return ir.serde.deserialize_model(model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model))


def _quantize(proto, context, **options):
    model = _ir(proto)
    result = registry.get_pass("quantize-static").create(context=context, **options)(model)
    return result.model, result.details, result.modified


def _assert_close(float_model, quant_model, feeds, rel_bound, what):
    expected = runtime.reference(_ir(float_model)).run(feeds)
    actual = runtime.reference(quant_model).run(feeds)
    for name in expected:
        cosine, rel = _errors(expected[name], actual[name])
        print(f"{what} [{name}]: cosine {cosine:.5f}, rel-L2 {rel:.4g}")
        assert cosine >= COSINE, f"{what} [{name}]: cosine {cosine:.5f} < {COSINE} (rel-L2 {rel:.4g})"
        assert rel < rel_bound, f"{what} [{name}]: rel-L2 {rel:.4g} >= {rel_bound} (cosine {cosine:.5f})"


def _ops(model) -> collections.Counter:
    nodes = model.graph if isinstance(model, ir.Model) else model.graph.node
    return collections.Counter(n.op_type for n in nodes)


def _ort_optimized(model: ir.Model, tmp_path) -> onnx.ModelProto:
    """ONNX Runtime's own optimized graph (ORT_ENABLE_ALL, CPU), as it writes it out."""
    exe = OrtBackend().compile(model, "cpu")
    return onnx.load(str(exe.export(tmp_path / "ort_optimized.onnx")))


def _initializer(model: ir.Model, node_name: str, index: int) -> np.ndarray:
    """The initializer behind input ``index`` of ``node_name``, through its DequantizeLinear."""
    node = next(n for n in model.graph if n.name == node_name)
    dq = node.inputs[index].producer()
    assert dq is not None and dq.op_type == "DequantizeLinear", f"{node_name} input {index} is not dequantized"
    return dq.inputs[0].const_value.numpy()


# ------------------------------------------------------------------------------ the CNN


def test_cnn_accuracy_on_held_out_inputs(cnn_context):
    model, details, modified = _quantize(_cnn(), cnn_context, target="ort-cpu")
    assert modified
    assert [q["node"] for q in details["quantized"]] == [*CNN_CONVS, "fc"]
    for seed in (100, 101, 102):
        _assert_close(_cnn(), model, _cnn_feeds(seed, batch=4), CNN_REL, f"int8 CNN seed {seed}")


def test_cnn_structure_int8_weights_int32_biases_and_no_float_copies(cnn_context):
    model, details, _ = _quantize(_cnn(), cnn_context, target="ort-cpu")
    ops = _ops(model)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"], ops
    for name in [*CNN_CONVS, "fc"]:
        assert _initializer(model, name, 1).dtype == np.int8, name
        assert _initializer(model, name, 2).dtype == np.int32, name
    floats = [n for n, v in model.graph.initializers.items()
              if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size > 1 and not n.endswith("_scale")]
    assert floats == [], f"float copies left: {floats}"
    assert {"w1", "w2", "w3", "w4", "wfc", "b1", "bfc"}.isdisjoint(model.graph.initializers)
    # graph inputs and outputs keep their names and stay float
    assert [(v.name, v.dtype) for v in model.graph.inputs] == [("x", ir.DataType.FLOAT)]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [("logits", ir.DataType.FLOAT)]
    # r1 feeds conv2 and the residual Add: one pair, both read its DequantizeLinear
    r1_pairs = [n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "r1"]
    assert len(r1_pairs) == 1
    (dq,) = r1_pairs[0].outputs[0].consumers()
    readers = {node.name for node in dq.outputs[0].consumers()}
    assert readers == {"conv2", "residual"}
    assert {o["node"] for o in details["int8_ops"]} == {"residual", "pool", "gap", "flatten"}
    before, after = details["weight_bytes_before"], details["weight_bytes_after"]
    print(f"int8 static CNN: weights and biases {before} -> {after} bytes ({after / before:.3f}x)")
    assert after < 0.4 * before


def test_relu_and_clip_outputs_carry_the_pair_with_zero_point_0(cnn_context):
    """Where a Relu or Clip(0, 6) follows a quantized op, the pair follows the activation
    (zero point 0, the uint8 minimum), and no pair sits between the op and it."""
    model, _, _ = _quantize(_cnn(), cnn_context, target="ort-cpu")
    quantized = {n.inputs[0].name: n for n in model.graph if n.op_type == "QuantizeLinear"}
    for act in ("r1", "r2", "r3", "r4"):
        assert act in quantized, act
        zero = quantized[act].inputs[2].const_value.numpy()
        assert zero.dtype == np.uint8 and zero == 0, (act, zero)
    assert not {"c1", "c2", "c4", "s"} & set(quantized)
    assert "c3" in quantized  # no activation after conv3: its own output is quantized


def _assert_fused_agrees(model, feeds, bound, what):
    """ORT's fused integer kernels compute what the QDQ model says (up to float rounding in
    requantization, which may flip a code): their output against the reference's."""
    reference = runtime.reference(model).run(feeds)
    fused = OrtBackend().compile(model, "cpu").run(feeds)
    for name in reference:
        _, rel = _errors(reference[name], fused[name])
        print(f"{what} [{name}], ORT fused vs QDQ reference: rel-L2 {rel:.3g}")
        assert rel < bound, f"{what} [{name}]: fused vs reference rel-L2 {rel:.3g} >= {bound}"


def test_ort_fuses_the_qdq_form_into_integer_kernels(cnn_context, tmp_path):
    """Every Conv becomes QLinearConv, Relu/Clip fold into it, Add/GlobalAveragePool/Gemm
    run as integer ops and MaxPool/Flatten on int8: no DequantizeLinear is left."""
    model, _, _ = _quantize(_cnn(), cnn_context, target="ort-cpu")
    ops = _ops(_ort_optimized(model, tmp_path))
    print(f"ORT optimized graph: {dict(ops)}")
    assert ops["QLinearConv"] == 4 and not ops["Conv"], ops
    assert ops["QLinearAdd"] == 1 and ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert not ops["DequantizeLinear"] and not ops["Relu"] and not ops["Clip"], ops
    _assert_fused_agrees(model, _cnn_feeds(100, batch=4), 1e-3, "int8 CNN")  # measured ~1e-7


@pytest.mark.parametrize("method", _calibration.METHODS)
def test_every_calibration_method_gives_a_valid_model(method, cnn_context):
    model, details, _ = _quantize(_cnn(), cnn_context, target="ort-cpu", calibration_method=method)
    assert details["calibration"] == {"method": method, "samples": SAMPLES, "tensors": 7}
    _assert_close(_cnn(), model, _cnn_feeds(100, batch=4), CNN_REL, f"int8 CNN {method}")


def test_minmax_ranges_contain_percentile_and_entropy_ranges(cnn_context):
    model = _ir(_cnn())
    values = [v for n in model.graph if n.op_type in ("Relu", "Clip", "Conv") for v in n.outputs]
    samples = cnn_context.calibration
    ranges = {m: _calibration.collect(model, cnn_context.runtime, samples, values, method=m)
              for m in _calibration.METHODS}
    for v in values:
        lo, hi = ranges["minmax"][v.name]
        for m in ("percentile", "entropy"):
            plo, phi = ranges[m][v.name]
            assert lo <= plo <= phi <= hi, (v.name, m, (lo, hi), (plo, phi))
    # entropy leaves out the zeros a Relu makes: with them its Relu ranges fell to 0.25-0.5
    # of min/max (measured), without them 0.88-1.0
    for v in values:
        if v.producer().op_type in ("Relu", "Clip"):
            ratio = ranges["entropy"][v.name][1] / ranges["minmax"][v.name][1]
            assert ratio > 0.7, (v.name, ratio)
    # the symmetric percentile range is (-t, t) with t <= max |x|
    sym = _calibration.collect(model, cnn_context.runtime, samples, values[:1], method="percentile", symmetric=True)
    t = sym[values[0].name][1]
    lo, hi = ranges["minmax"][values[0].name]
    assert sym[values[0].name][0] == -t and 0 < t <= max(-lo, hi)


def test_kl_threshold_clips_a_gaussian_tail_but_not_a_uniform():
    rng = np.random.default_rng(0)
    gauss = np.abs(rng.standard_normal(200_000))
    hist, edges = np.histogram(gauss, bins=_calibration.BINS, range=(0, gauss.max()))
    t = _calibration.kl_threshold(hist, edges[1], 128)
    print(f"KL threshold of |N(0, 1)| (max {gauss.max():.2f}): {t:.2f}")
    assert 2.0 < t < gauss.max()
    uniform = rng.uniform(0, 1, 200_000)
    hist, edges = np.histogram(uniform, bins=_calibration.BINS, range=(0, 1))
    assert _calibration.kl_threshold(hist, edges[1], 128) > 0.95


def test_exclude_nodes_keeps_a_conv_float(cnn_context):
    model, details, _ = _quantize(_cnn(), cnn_context, target="ort-cpu", exclude_nodes=("conv2",))
    assert [q["node"] for q in details["quantized"]] == ["conv1", "conv3", "conv4", "fc"]
    assert {"node": "conv2", "op_type": "Conv", "reason": "in exclude_nodes"} in details["skipped"]
    conv2 = next(n for n in model.graph if n.name == "conv2")
    assert conv2.inputs[1].name == "w2" and conv2.inputs[1].const_value.dtype == ir.DataType.FLOAT
    assert "w2" in model.graph.initializers
    _assert_close(_cnn(), model, _cnn_feeds(100), CNN_REL, "int8 CNN without conv2")


def test_without_calibration_samples_the_pass_says_so():
    with pytest.raises(GcompError) as e:
        _quantize(_cnn(), runtime.pass_context(), target="ort-cpu")
    assert str(e.value) == "quantize-static needs calibration samples (--calibration)"


def test_per_axis_needs_opset_13(cnn_context):
    with pytest.raises(OptionError, match="opset >= 13.*model has 12: add --target-opset 13"):
        _quantize(_cnn(opset=12), cnn_context, target="ort-cpu")
    model, details, _ = _quantize(_cnn(opset=12), cnn_context, target="ort-cpu", per_channel=False)
    assert len(details["quantized"]) == 5
    assert _initializer(model, "conv1", 1).dtype == np.int8
    _assert_close(_cnn(opset=12), model, _cnn_feeds(100), CNN_REL, "int8 CNN per tensor")


def test_symmetric_activations_are_int8_with_zero_point_0(cnn_context, tmp_path):
    model, _, _ = _quantize(_cnn(), cnn_context, target="ort-cpu", symmetric_activations=True)
    zeros = [n.inputs[2].const_value.numpy() for n in model.graph if n.op_type == "QuantizeLinear"]
    assert zeros and all(z.dtype == np.int8 and z == 0 for z in zeros)
    _assert_close(_cnn(), model, _cnn_feeds(100), CNN_REL, "int8 CNN symmetric")
    # ORT's x86 kernels take uint8 activations: it converts the int8 pairs and fuses less
    # (no Relu folds into a zero point that is not the type's minimum), but what it runs agrees
    ops = _ops(_ort_optimized(model, tmp_path))
    print(f"ORT optimized graph, symmetric activations: {dict(ops)}")
    assert ops["QLinearConv"] >= 1, ops
    _assert_fused_agrees(model, _cnn_feeds(100, batch=4), 1e-3, "int8 CNN symmetric")


def test_a_quantized_graph_output_keeps_its_name():
    """conv -> Relu as the graph output: the pair ends in a DequantizeLinear named 'y'."""
    rng = np.random.default_rng(1)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")],
                       [vinfo("x", shape=(1, 4, 5, 5))], [vinfo("y", shape=(1, 6, 5, 5))],
                       [tensor("w", _he(rng, (6, 4, 1, 1)))])
    samples = [{"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)} for _ in range(8)]
    model, _, _ = _quantize(proto, _context(samples), target="portable")
    out = model.graph.outputs[0]
    assert out.name == "y" and out.producer().op_type == "DequantizeLinear"
    _assert_close(proto, model, samples[0], CNN_REL, "Conv+Relu graph output")


# ------------------------------------------------------------------------------ MatMul / Gemm


def test_mlp_matmul_and_gemm(tmp_path):
    """MatMul+Add -> Relu -> Gemm -> Relu -> MatMul: the Gemm's Relu output and the MatMul
    inputs are quantized; the outputs no int8 op reads stay float."""
    samples = [{"x": np.random.default_rng(seed).standard_normal((16, 64)).astype(np.float32)}
               for seed in range(SAMPLES)]
    model, details, _ = _quantize(_mlp(), _context(samples), target="ort-cpu")
    assert [q["node"] for q in details["quantized"]] == ["fc1", "fc2", "fc3"]
    assert _initializer(model, "fc1", 1).shape == (64, 128)  # [K, N], per column: axis 1
    assert next(n for n in model.graph if n.name == "fc1").inputs[1].producer().attributes["axis"].value == 1
    assert _initializer(model, "fc2", 2).dtype == np.int32
    _assert_close(_mlp(), model, _mlp_feeds(), MLP_REL, "int8 static MLP")
    ops = _ops(_ort_optimized(model, tmp_path))
    print(f"ORT optimized MLP: {dict(ops)}")
    # ORT turns fc1's MatMul+Add into a Gemm itself: QGemm x2 and a MatMulIntegerToFloat
    assert ops["QGemm"] + ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 3, ops
    assert not ops["MatMul"] and not ops["Gemm"], ops
    _assert_fused_agrees(model, _mlp_feeds(), 1e-2, "int8 static MLP")  # measured 2.3e-3


def test_matmul_chain_runs_as_qlinearmatmul_per_column(tmp_path):
    """MatMul -> Relu -> MatMul -> Relu -> MatMul: the inner outputs are quantized after their
    Relu, so ORT runs QLinearMatMul with one weight scale per column (axis 1)."""
    rng = np.random.default_rng(2)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(tensor(f"W{i}", _he(rng, (64, 64)).T.copy()))
        out = "y" if i == 2 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out], name=f"layer{i}"))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            prev = f"h{i}"
    proto = make_model(nodes, [vinfo("x", shape=("batch", 64))], [vinfo("y", shape=("batch", 64))], inits)
    samples = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(SAMPLES)]
    model, _, _ = _quantize(proto, _context(samples), target="ort-cpu")
    feeds = {"x": np.random.default_rng(99).standard_normal((8, 64)).astype(np.float32)}
    _assert_close(proto, model, feeds, MLP_REL, "int8 static MatMul chain")
    ops = _ops(_ort_optimized(model, tmp_path))
    print(f"ORT optimized MatMul chain: {dict(ops)}")
    assert ops["QLinearMatMul"] == 2 and ops["MatMulIntegerToFloat"] == 1 and not ops["MatMul"], ops
    _assert_fused_agrees(model, feeds, 1e-3, "int8 static MatMul chain")  # measured ~1e-7


# ------------------------------------------------------------------------------ refusals and listing


def test_an_already_quantized_model_is_left_unchanged(cnn_context):
    model, _, _ = _quantize(_cnn(), cnn_context, target="ort-cpu")
    _, details, modified = _quantize(model, cnn_context, target="ort-cpu")
    assert not modified and details["note"].startswith("already quantized (DequantizeLinear x")


def test_candidates_list_names_and_refusals():
    proto = _cnn()
    model = _ir(proto)
    assert static.candidates(model) == [(n, "Conv") for n in CNN_CONVS] + [("fc", "Gemm")]
    assert static.candidates(model, ("Gemm",)) == [("fc", "Gemm")]
    # a Conv whose weight is an activation stays float, with its reason
    proto.graph.node.append(helper.make_node("Conv", ["x", "x2"], ["c9"], name="conv9"))
    proto.graph.input.append(vinfo("x2", shape=(8, 3, 3, 3)))
    proto.graph.output.append(vinfo("c9", shape=("batch", 8, 14, 14)))
    samples = [dict(_cnn_feeds(s), x2=np.ones((8, 3, 3, 3), np.float32)) for s in range(8)]
    _, details, _ = _quantize(proto, _context(samples), target="ort-cpu")
    assert {"node": "conv9", "op_type": "Conv", "reason": "the weight is not a constant"} in details["skipped"]


def test_tvm_targets_accept_qdq(cnn_context):
    _, details, modified = _quantize(_cnn(), cnn_context, target="tvm-llvm")
    assert modified and len(details["quantized"]) == 5


@pytest.mark.slow
def test_tvm_imports_and_runs_the_per_axis_qdq_model(cnn_context):
    """TVM 0.27's ONNX frontend takes per-axis QuantizeLinear/DequantizeLinear (~5 s to compile)."""
    pytest.importorskip("tvm")
    from gcomp.backends.tvm import TvmBackend

    model, _, _ = _quantize(_cnn(), cnn_context, target="tvm-llvm")
    feeds = _cnn_feeds(100)
    expected = runtime.reference(model).run(feeds)["logits"]
    actual = TvmBackend().compile(model, "llvm").run(feeds)["logits"]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_options_are_checked_and_listed():
    info = registry.get_pass("quantize-static")
    assert [o.name for o in info.options] == ["target", "per_channel", "symmetric_activations",
                                              "calibration_method", "percentile", "op_types", "exclude_nodes"]
    assert info.takes_context
    for bad in ({"calibration_method": "mse"}, {"percentile": 20.0}, {"op_types": ("Softmax",)}):
        with pytest.raises(OptionError):
            info.create(**bad)


def test_activation_params_match_the_documented_math():
    scale, zero = static.activation_params(-1.0, 3.0, symmetric=False)
    assert scale == np.float32(4.0 / 255) and zero == round(1.0 / float(scale)) and zero.dtype == np.uint8
    scale, zero = static.activation_params(0.5, 2.0, symmetric=False)  # 0 always in range
    assert scale == np.float32(2.0 / 255) and zero == 0
    scale, zero = static.activation_params(-2.0, 1.0, symmetric=True)
    assert scale == np.float32(2.0 / 127) and zero == 0 and zero.dtype == np.int8
    assert static.activation_params(0.0, 0.0, symmetric=False)[0] == 1.0
    w = np.array([[[[0.5]]], [[[-2.0]]], [[[0.0]]]], np.float32)  # 3 output channels
    q, s = static.weight_int8(w, 0)
    assert q.dtype == np.int8 and q.ravel().tolist() == [127, -127, 0]
    np.testing.assert_allclose(s, [0.5 / 127, 2.0 / 127, 1.0], rtol=1e-6)
