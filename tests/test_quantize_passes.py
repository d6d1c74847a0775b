"""The quantization passes (``quantize-dynamic``, ``quantize-weights``) proven on ONNX Runtime.

Every accuracy test runs the float and the quantized model on ORT with its optimizations off
(:func:`gcomp.runtime.reference`) on seeded inputs and bounds two measures that catch a lost
signal: the cosine of the flattened outputs (>= 0.99) and the relative L2 error
``||a - e|| / ||e||``, whose bound comes from the quantization step:

- int8 (dynamic or weight-only): a weight's rounding error is uniform in ``±s/2`` with
  ``s = max|w| / 127`` (per column, ~3 sigma over K >= 64 values), i.e. rms ~ 3/127/sqrt(12)
  ~ 0.7 % of the weights' rms; the activation's uint8 step over its whole range (~8 sigma)
  adds ~0.9 %, so ~1.1 % per layer: bound 2e-2.
- int4, blocks of 32, symmetric: ``s = |e| / 8`` with ``|e|`` ~ 2.1 sigma on 32 Gaussian
  values, rms ~ 0.26/sqrt(12) ~ 7.6 % (8.6 % measured in numpy, the maximum varies per
  block) per layer; two or three stacked layers compound to ~12 %: bound 0.15.

Numbers are printed in the assertion messages.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gcomp import registry, runtime
from gcomp.errors import OptionError
from gcomp.passes.quant import dynamic, weights
from gcomp.passes.quant._blockwise import pack, quantize_blocks
from gcomp.passes.quant._gptq import gptq_blocks
from tests.conftest import make_model, tensor, vinfo

INT8_REL = 2e-2
INT4_REL = 0.15
COSINE = 0.99


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def context():
    return runtime.pass_context()


def _quantize(proto_or_model, pass_name, context, **options):
    model = proto_or_model if isinstance(proto_or_model, ir.Model) else ir.serde.deserialize_model(proto_or_model)
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))  # a copy
    result = registry.get_pass(pass_name).create(context=context, **options)(model)
    return result.model, result.details, result.modified


def _run(model, feeds):
    if not isinstance(model, ir.Model):
        model = ir.serde.deserialize_model(model)
    return runtime.reference(model).run(feeds)


def _errors(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    e, a = expected.ravel().astype(np.float64), actual.ravel().astype(np.float64)
    cosine = float(e @ a / (np.linalg.norm(e) * np.linalg.norm(a)))
    return cosine, float(np.linalg.norm(a - e) / np.linalg.norm(e))


def _assert_close(float_model, quant_model, feeds, rel_bound, what):
    expected, actual = _run(float_model, feeds), _run(quant_model, feeds)
    for name in expected:
        cosine, rel = _errors(expected[name], actual[name])
        print(f"{what} [{name}]: cosine {cosine:.5f}, rel-L2 {rel:.4g}")
        assert cosine >= COSINE, f"{what} [{name}]: cosine {cosine:.5f} < {COSINE} (rel-L2 {rel:.4g})"
        assert rel < rel_bound, f"{what} [{name}]: rel-L2 {rel:.4g} >= {rel_bound} (cosine {cosine:.5f})"
    return expected, actual


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in model.graph)


def _float_matrices(model: ir.Model) -> list[str]:
    """Initializers holding float matrices other than scales (a float copy of a weight left behind)."""
    return [name for name, v in model.graph.initializers.items()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and len(v.shape) >= 2
            and not name.endswith(("_scale", "_scales"))]


def _rng():
    return np.random.default_rng(0)


def _mlp(opset=17, k=64, hidden=128, out=32, layers=3):
    """MatMul+Add -> Relu -> Gemm(transB, bias) [-> Relu -> MatMul]: weights ~ N(0, 1/fan_in).

    int4 tests use two layers: each int4 layer adds ~8.6 % independent error, so three
    stacked random layers reach ~15 % (cosine ~0.989), past the 0.99 budget."""
    rng = _rng()
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)  # [N, K]: transB
    b2 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    w3 = (rng.standard_normal((hidden, out)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Relu", ["h1b"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W3"], ["y"], name="fc3"),
    ]
    inits = [tensor("W1", w1), tensor("b1", b1), tensor("W2", w2), tensor("b2", b2), tensor("W3", w3)]
    if layers == 2:
        nodes, inits, out = nodes[:3] + [helper.make_node("Gemm", ["r1", "W2", "b2"], ["y"], name="fc2", transB=1)], \
            inits[:4], hidden
    return make_model(nodes, [vinfo("x", shape=("batch", k))], [vinfo("y", shape=("batch", out))], inits,
                      opset=opset)


def _mlp_feeds(k=64, batch=16):
    return {"x": _rng().standard_normal((batch, k)).astype(np.float32)}


# ------------------------------------------------------------------------------ ONNX Runtime's schemas


def test_installed_onnxruntime_schemas_have_the_inputs_the_passes_emit():
    """MatMulNBits' bias is input 5 (ORT >= 1.19), DynamicQuantizeMatMul takes (A, B, b_scale,
    b_zero_point, bias), GatherBlockQuantized (data, indices, scales, zero_points)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    inputs = {s.name: [i.name for i in s.inputs] for s in get_all_operator_schema() if s.domain == "com.microsoft"}
    assert inputs["MatMulNBits"][:6] == ["A", "B", "scales", "zero_points", "g_idx", "bias"], inputs["MatMulNBits"]
    assert inputs["DynamicQuantizeMatMul"] == ["A", "B", "b_scale", "b_zero_point", "bias"]
    assert inputs["GatherBlockQuantized"] == ["data", "indices", "scales", "zero_points"]


# ------------------------------------------------------------------------------ quantize-dynamic


@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
def test_dynamic_mlp_accuracy_structure_and_size(target, context):
    proto = _mlp()
    model, details, modified = _quantize(proto, "quantize-dynamic", context, target=target)
    assert modified
    _assert_close(proto, model, _mlp_feeds(), INT8_REL, f"int8 dynamic MLP ({target})")
    ops = _ops(model)
    if target == "ort-cpu":
        assert ops["com.microsoft::DynamicQuantizeMatMul"] == 3, ops
        assert {n.name for n in model.graph if n.op_type == "DynamicQuantizeMatMul"} == {"fc1", "fc2", "fc3"}
    else:
        assert ops["DynamicQuantizeLinear"] == ops["MatMulInteger"] == 3 and not ops["MatMul"] and not ops["Gemm"], ops
        names = {n.name for n in model.graph}
        assert {"fc1", "fc2", "fc3"} <= names  # the replacing nodes keep the ONNX names
    assert _float_matrices(model) == [], "a float weight was left behind"
    assert [q["node"] for q in details["quantized"]] == ["fc1", "fc2", "fc3"]
    before, after = details["weight_bytes_before"], details["weight_bytes_after"]
    print(f"int8 dynamic ({target}) weights {before} -> {after} bytes ({after / before:.3f}x)")
    assert before == (64 * 128 + 128 * 128 + 128 * 32) * 4 and after <= 0.27 * before


def test_dynamic_per_channel_beats_per_tensor_on_a_weight_with_one_large_column(context):
    rng = _rng()
    w = (rng.standard_normal((64, 16)) / 8).astype(np.float32)
    w[:, 3] *= 100  # one column 100x larger: a per-tensor scale crushes the other 15
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")]
    proto = make_model(nodes, [vinfo("x", shape=("batch", 64))], [vinfo("y", shape=("batch", 16))], [tensor("W", w)])
    feeds = {"x": rng.standard_normal((32, 64)).astype(np.float32)}
    expected = _run(proto, feeds)["y"]
    small = [c for c in range(16) if c != 3]
    rel = {}
    for per_channel in (True, False):
        model, _, _ = _quantize(proto, "quantize-dynamic", context, target="ort-cpu", per_channel=per_channel)
        actual = _run(model, feeds)["y"]
        rel[per_channel] = _errors(expected[:, small], actual[:, small])[1]
        shape = model.graph.initializers["W_scale"].shape
        assert list(shape) == ([16] if per_channel else []), shape
    print(f"small columns' rel-L2: per-channel {rel[True]:.4g}, per-tensor {rel[False]:.4g}")
    assert rel[True] < INT8_REL and rel[True] * 5 < rel[False], rel


def test_dynamic_ort_takes_the_bias_add_of_a_matmul_as_its_bias_input(context):
    """MatMul -> Add(constant [N]) becomes one DynamicQuantizeMatMul with that bias (ONNX
    Runtime does not fuse the Add after it); a MatMul whose output has other readers keeps
    its Add, and portable keeps the graph's Add."""
    model, _, _ = _quantize(_mlp(), "quantize-dynamic", context, target="ort-cpu")
    fc1 = next(n for n in model.graph if n.name == "fc1")
    assert [v.name for v in fc1.inputs][-1] == "b1" and "fc1_bias" not in {n.name for n in model.graph}
    assert "Add" not in _ops(model), _ops(model)
    _assert_close(_mlp(), model, _mlp_feeds(), INT8_REL, "int8 dynamic MLP, bias taken in")
    model, _, _ = _quantize(_mlp(opset=17), "quantize-dynamic", context, target="portable")
    assert "fc1_bias" in {n.name for n in model.graph}
    rng = _rng()
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="bias"),
             helper.make_node("Relu", ["h"], ["z"], name="other_reader")]
    proto = make_model(nodes, [vinfo("x", shape=("batch", 32))],
                       [vinfo("y", shape=("batch", 8)), vinfo("z", shape=("batch", 8))],
                       [tensor("W", (rng.standard_normal((32, 8)) / 6).astype(np.float32)),
                        tensor("b", rng.standard_normal(8).astype(np.float32))])
    model, _, _ = _quantize(proto, "quantize-dynamic", context, target="ort-cpu")
    assert _ops(model)["Add"] == 1 and len(next(n for n in model.graph if n.name == "mm").inputs) == 4


def _linear_chain():
    """MatMul -> Add(bias) -> MatMul -> MatMul: each layer reads the one before it directly
    (ALBERT's embedding projection into Q/K/V), so a rewrite replaces what the next reads."""
    rng = _rng()
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("MatMul", ["a1", "W2"], ["m2"], name="mm2"),
             helper.make_node("MatMul", ["m2", "W3"], ["y"], name="mm3")]
    inits = [tensor("W1", (rng.standard_normal((64, 64)) / 8).astype(np.float32)),
             tensor("b1", (0.1 * rng.standard_normal(64)).astype(np.float32)),
             tensor("W2", (rng.standard_normal((64, 64)) / 8).astype(np.float32)),
             tensor("W3", (rng.standard_normal((64, 32)) / 8).astype(np.float32))]
    return make_model(nodes, [vinfo("x", shape=("batch", 64))], [vinfo("y", shape=("batch", 32))], inits)


@pytest.mark.parametrize("pass_name, target, bound", [
    ("quantize-dynamic", "ort-cpu", INT8_REL), ("quantize-dynamic", "portable", INT8_REL),
    ("quantize-weights", "ort-cpu", INT4_REL)])
def test_linear_layers_in_a_row_each_read_the_rewritten_one_before(pass_name, target, bound, context):
    proto = _linear_chain()
    model, details, _ = _quantize(proto, pass_name, context, target=target)
    assert len(details["quantized"]) == 3
    assert "MatMul" not in _ops(model), _ops(model)
    _assert_close(proto, model, _mlp_feeds(), bound, f"{pass_name} {target}, three layers in a row")


def test_dynamic_n_d_activations_and_exclude_nodes(context):
    rng = _rng()
    w1 = (rng.standard_normal((32, 48)) / np.sqrt(32)).astype(np.float32)
    w2 = (rng.standard_normal((48, 24)) / np.sqrt(48)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="down")]
    proto = make_model(nodes, [vinfo("x", shape=(2, 8, 32))], [vinfo("y", shape=(2, 8, 24))],
                       [tensor("W1", w1), tensor("W2", w2)])
    feeds = {"x": rng.standard_normal((2, 8, 32)).astype(np.float32)}
    for target in ("ort-cpu", "portable"):
        model, details, _ = _quantize(proto, "quantize-dynamic", context, target=target)
        _assert_close(proto, model, feeds, INT8_REL, f"int8 dynamic [2, 8, K] @ [K, N] ({target})")
    model, details, _ = _quantize(proto, "quantize-dynamic", context, target="ort-cpu", exclude_nodes=("down",))
    down = next(n for n in model.graph if n.name == "down")
    assert down.op_type == "MatMul" and down.inputs[1].name == "W2" and "W1" not in model.graph.initializers
    assert details["skipped"] == [{"node": "down", "op_type": "MatMul", "reason": "in exclude_nodes"}]
    assert [q["node"] for q in details["quantized"]] == ["up"]
    assert details["weight_bytes_before"] == w1.nbytes


def test_gemm_trans_b_bias_and_refusals(context):
    rng = _rng()
    b = (rng.standard_normal((24, 64)) / 8).astype(np.float32)  # [N, K]
    c = rng.standard_normal(24).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", transB=1),
             helper.make_node("Gemm", ["x", "B", "C"], ["z"], name="scaled", transB=1, alpha=0.5),
             helper.make_node("Gemm", ["xt", "B", "C"], ["t"], name="transposed", transA=1, transB=1)]
    proto = make_model(nodes, [vinfo("x", shape=(8, 64)), vinfo("xt", shape=(64, 8))],
                       [vinfo("y", shape=(8, 24)), vinfo("z", shape=(8, 24)), vinfo("t", shape=(8, 24))],
                       [tensor("B", b), tensor("C", c)], opset=21)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    feeds = {"x": x, "xt": np.ascontiguousarray(x.T)}
    for pass_name, bound in (("quantize-dynamic", INT8_REL), ("quantize-weights", INT4_REL)):
        model, details, _ = _quantize(proto, pass_name, context, target="ort-cpu")
        expected, actual = _run(proto, feeds), _run(model, feeds)
        for out in ("y", "z"):  # alpha is folded into a scaled copy of B, so "scaled" is quantized too
            cosine, rel = _errors(expected[out], actual[out])
            print(f"{pass_name} Gemm transB + bias ({out}): cosine {cosine:.5f}, rel-L2 {rel:.4g}")
            assert cosine >= COSINE and rel < bound, (out, cosine, rel)
        np.testing.assert_array_equal(actual["t"], expected["t"])
        assert details["skipped"] == [{"node": "transposed", "op_type": "Gemm",
                                       "reason": "transA=1 (the activation is transposed)"}]
        assert "B" in model.graph.initializers  # still read by the float Gemm
        assert details["weight_bytes_after"] >= b.nbytes
    # portable weight-only keeps the Gemm (it reads the dequantized B), so transA is no obstacle
    model, details, _ = _quantize(proto, "quantize-weights", context, target="portable")
    assert details["skipped"] == [] and "B" not in model.graph.initializers
    _assert_close(proto, model, feeds, INT4_REL, "int4 portable Gemm transB + bias")


def test_activation_times_activation_is_skipped_with_its_reason(context):
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="scores")]
    proto = make_model(nodes, [vinfo("a", shape=(2, 4, 8)), vinfo("b", shape=(2, 8, 4))], [vinfo("y", shape=(2, 4, 4))])
    for pass_name in ("quantize-dynamic", "quantize-weights"):
        _, details, modified = _quantize(proto, pass_name, context, target="ort-cpu")
        assert not modified and details["quantized"] == []
        assert details["skipped"] == [{"node": "scores", "op_type": "MatMul", "reason": "both inputs are activations"}]
    assert dynamic.candidates(ir.serde.deserialize_model(proto)) == []


def test_constant_node_weights_are_quantized_and_graph_input_weights_are_not(context):
    w = (_rng().standard_normal((32, 8)) / 6).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], name="const", value=tensor("W", w)),
             helper.make_node("MatMul", ["x", "W"], ["a"], name="from_constant"),
             helper.make_node("MatMul", ["x", "V"], ["b"], name="from_input")]
    proto = make_model(nodes, [vinfo("x", shape=(3, 32)), vinfo("V", shape=(32, 8))],
                       [vinfo("a", shape=(3, 8)), vinfo("b", shape=(3, 8))], [tensor("V", w)])
    model, details, _ = _quantize(proto, "quantize-dynamic", context, target="ort-cpu")
    assert [q["node"] for q in details["quantized"]] == ["from_constant"]
    assert details["skipped"] == [{"node": "from_input", "op_type": "MatMul",
                                   "reason": "the weight is an initializer that is also a graph input "
                                             "(a caller may override it)"}]
    assert "Constant" not in _ops(model)  # the float Constant went with its last reader
    feeds = {"x": _rng().standard_normal((3, 32)).astype(np.float32), "V": w}
    cosine, rel = _errors(_run(proto, feeds)["a"], _run(model, feeds)["a"])
    assert cosine >= COSINE and rel < INT8_REL, (cosine, rel)


def test_a_model_without_matmul_or_gemm_is_not_modified(context):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    proto = make_model(nodes, [vinfo("x")], [vinfo("y")])
    for pass_name, target in (("quantize-dynamic", "ort-cpu"), ("quantize-weights", "ort-cpu"),
                              ("quantize-weights", "portable")):  # portable: no opset refusal with nothing to do
        _, details, modified = _quantize(proto, pass_name, context, target=target)
        assert not modified and details["quantized"] == [] and details["skipped"] == []
        assert details["weight_bytes_before"] == details["weight_bytes_after"] == 0


def test_an_already_quantized_model_is_left_unchanged(context):
    once, _, _ = _quantize(_mlp(), "quantize-dynamic", context, target="ort-cpu")
    frozen = ir.serde.serialize_model(once).SerializeToString()
    for pass_name in ("quantize-dynamic", "quantize-weights"):
        model, details, modified = _quantize(once, pass_name, context, target="ort-cpu")
        assert not modified and details["quantized"] == []
        assert details["note"] == "already quantized (DynamicQuantizeMatMul x3 found)"
        assert ir.serde.serialize_model(model).SerializeToString() == frozen
    q = np.arange(8, dtype=np.int8).reshape(2, 4)
    nodes = [helper.make_node("DequantizeLinear", ["Q", "s"], ["W"], name="dq"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    proto = make_model(nodes, [vinfo("x", shape=(3, 2))], [vinfo("y", shape=(3, 4))],
                       [tensor("Q", q), tensor("s", np.float32(0.1))])
    _, details, modified = _quantize(proto, "quantize-weights", context, target="ort-cpu")
    assert not modified and details["note"] == "already quantized (DequantizeLinear x1 found)"


def test_candidates_list_names_without_changing_the_model():
    model = ir.serde.deserialize_model(_mlp())
    frozen = ir.serde.serialize_model(model).SerializeToString()
    assert dynamic.candidates(model) == [("fc1", "MatMul"), ("fc2", "Gemm"), ("fc3", "MatMul")]
    assert dynamic.candidates(model, ("Gemm",)) == [("fc2", "Gemm")]
    assert weights.candidates(model) == [("fc1", "MatMul"), ("fc2", "Gemm"), ("fc3", "MatMul")]
    assert ir.serde.serialize_model(model).SerializeToString() == frozen


# ------------------------------------------------------------------------------ quantize-weights


@pytest.mark.parametrize(("target", "opset"), [("ort-cpu", 17), ("portable", 21)])
def test_weights_int4_mlp_accuracy_structure_and_size(target, opset, context):
    proto = _mlp(opset=opset, layers=2)
    model, details, modified = _quantize(proto, "quantize-weights", context, target=target)
    assert modified
    _assert_close(proto, model, _mlp_feeds(), INT4_REL, f"int4 block 32 MLP ({target})")
    ops = _ops(model)
    if target == "ort-cpu":
        assert ops["com.microsoft::MatMulNBits"] == 2 and not ops["MatMul"] and not ops["Gemm"], ops
        assert {n.name for n in model.graph if n.op_type == "MatMulNBits"} == {"fc1", "fc2"}
    else:
        assert ops["DequantizeLinear"] == 2 and ops["MatMul"] == 1 and ops["Gemm"] == 1, ops
        types = {v.const_value.dtype for v in model.graph.initializers.values()}
        assert ir.DataType.INT4 in types
    assert _float_matrices(model) == [], "a float weight was left behind"
    before, after = details["weight_bytes_before"], details["weight_bytes_after"]
    print(f"int4 block 32 ({target}) weights {before} -> {after} bytes ({after / before:.4f}x)")
    assert after <= 0.16 * before, (before, after)


@pytest.mark.parametrize(("bits", "symmetric", "bound"), [(8, True, INT8_REL), (8, False, INT8_REL),
                                                          (4, False, INT4_REL)])
def test_weights_other_widths_and_asymmetric(bits, symmetric, bound, context):
    proto = _mlp(layers=3 if bits == 8 else 2)
    model, _, _ = _quantize(proto, "quantize-weights", context, target="ort-cpu", bits=bits, symmetric=symmetric)
    _assert_close(proto, model, _mlp_feeds(), bound, f"int{bits} {'sym' if symmetric else 'asym'} MLP")
    has_zero = any("zero_points" in name for name in model.graph.initializers)
    assert has_zero == (not symmetric)


@pytest.mark.parametrize(("bits", "symmetric", "k", "block"), [
    (4, True, 64, 32), (4, False, 40, 32), (8, True, 70, 16), (8, False, 96, 64), (4, False, 112, 16)])
def test_matmul_nbits_packing_matches_float_dequantization(bits, symmetric, k, block, context):
    """accuracy_level 0 (fp32 compute): ORT's output equals x @ dequantized W (K padded when
    not a multiple of the block; odd block counts pad the packed zero points)."""
    rng = _rng()
    w = rng.standard_normal((k, 24)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")]
    proto = make_model(nodes, [vinfo("x", shape=(2, 5, k))], [vinfo("y", shape=(2, 5, 24))], [tensor("W", w)])
    model, _, _ = _quantize(proto, "quantize-weights", context, target="ort-cpu", bits=bits, block_size=block,
                            symmetric=symmetric, accuracy_level=0, method="rtn")
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    expected = x @ quantize_blocks(w, bits, block, symmetric).dequantize()
    np.testing.assert_allclose(_run(model, {"x": x})["y"], expected, rtol=1e-4, atol=1e-4)


def test_pack_puts_the_even_element_in_the_low_nibble():
    assert pack(np.array([[1, 2, 3, 4, 5]]), 4).tolist() == [[0x21, 0x43, 0x05]]
    assert pack(np.array([[7, 255]]), 8).tolist() == [[7, 255]]


def test_portable_dequantize_linear_matches_float_dequantization(context):
    rng = _rng()
    w = rng.standard_normal((40, 12)).astype(np.float32)  # K = 40: a partial last block
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")]
    proto = make_model(nodes, [vinfo("x", shape=(3, 40))], [vinfo("y", shape=(3, 12))], [tensor("W", w)], opset=21)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    for bits, symmetric in ((4, True), (4, False), (8, True), (8, False)):
        model, _, _ = _quantize(proto, "quantize-weights", context, target="portable", bits=bits,
                                symmetric=symmetric, method="rtn")
        expected = x @ quantize_blocks(w, bits, 32, symmetric).dequantize()
        np.testing.assert_allclose(_run(model, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
        assert _ops(model)["DequantizeLinear"] == 1


def _correlated_linear(k=96, n=48, tokens=64, seed=3):
    """A MatMul whose activation has a few strong directions (as real activations do): the
    case GPTQ is for. Returns the model and two disjoint sets of feeds."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((8, k)) + 0.05 * rng.standard_normal((8, k))
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)

    def feeds(s):
        r = np.random.default_rng(s)
        x = r.standard_normal((1, tokens, 8)) @ mix + 0.05 * r.standard_normal((1, tokens, k))
        return {"x": x.astype(np.float32)}

    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
                       [vinfo("x", shape=(1, tokens, k))], [vinfo("y", shape=(1, tokens, n))], [tensor("W", w)])
    return proto, [feeds(s) for s in range(8)], [feeds(100 + s) for s in range(4)]


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_round_to_nearest_on_held_out_inputs(symmetric):
    """GPTQ, fitted on 8 calibration samples, leaves a smaller output error than round to
    nearest on 4 other samples, and says so per node."""
    proto, calibration, held_out = _correlated_linear()
    context = dataclasses.replace(runtime.pass_context(), calibration=tuple(calibration))
    errors = {}
    for method in ("gptq", "rtn"):
        model, details, _ = _quantize(proto, "quantize-weights", context, target="ort-cpu", symmetric=symmetric,
                                      accuracy_level=1, method=method)
        (q,) = details["quantized"]
        assert q["method"] == method, q
        errors[method] = max(_errors(_run(proto, f)["y"], _run(model, f)["y"])[1] for f in held_out)
    print(f"held-out rel-L2 ({'sym' if symmetric else 'asym'}): gptq {errors['gptq']:.4f}, rtn {errors['rtn']:.4f}")
    assert errors["gptq"] < 0.6 * errors["rtn"], errors
    assert details["method"] == {"asked": "rtn", "gptq": 0, "rtn": 1, "note": None}


@pytest.mark.parametrize("pass_name", ["quantize-dynamic", "quantize-weights"])
def test_gemm_with_alpha_beta_and_a_broadcast_bias_is_quantized(pass_name, context):
    """Gemm(alpha=0.5, beta=2, C of shape [1, N]) is rewritten to A @ (0.5 B) + 2 C[0] and
    quantized as a unit (it was refused and left float), with the same outputs."""
    rng = _rng()
    w = rng.standard_normal((32, 16)).astype(np.float32)
    c = rng.standard_normal((1, 16)).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="g", alpha=0.5, beta=2.0)],
                       [vinfo("x", shape=(8, 32))], [vinfo("y", shape=(8, 16))], [tensor("W", w), tensor("C", c)])
    model, details, _ = _quantize(proto, pass_name, context, target="ort-cpu")
    assert [q["node"] for q in details["quantized"]] == ["g"], details
    assert not _ops(model)["Gemm"] and set(model.graph.initializers).isdisjoint({"W", "C"}), _ops(model)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    _, rel = _errors(_run(proto, {"x": x})["y"], _run(model, {"x": x})["y"])
    assert rel < (INT4_REL if pass_name == "quantize-weights" else 0.05), rel


def test_gptq_results_are_kept_in_the_context_memo(monkeypatch):
    """The accuracy budget quantizes copies of one float model again and again: with a memo in
    the context, each weight's GPTQ is computed once and reused (the model is not even run for
    its moments again), with the same result."""
    proto, calibration, _ = _correlated_linear()
    context = dataclasses.replace(runtime.pass_context(), calibration=tuple(calibration), memo={})
    first, _, _ = _quantize(proto, "quantize-weights", context, target="ort-cpu")
    assert [k[0] for k in context.memo] == ["gptq"], context.memo.keys()
    entries = dict(context.memo)

    def no_second_run(*args, **kwargs):
        raise AssertionError("moments measured again although the memo holds the weight's GPTQ")

    monkeypatch.setattr(weights, "grams", no_second_run)
    second, details, _ = _quantize(proto, "quantize-weights", context, target="ort-cpu")
    assert all(context.memo[k] is v for k, v in entries.items()) and len(context.memo) == len(entries)
    assert details["quantized"][0]["method"] == "gptq"
    for name, value in first.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), second.graph.initializers[name].const_value.numpy())


def test_a_weight_read_in_two_layouts_is_rounded_to_nearest(context):
    """A [32, 64] weight read by a MatMul (as [K=32, N=64]) and by a transB
    Gemm (as [K=64, N=32]): one set of codes serves both, so GPTQ (fitted for one layout) is not
    used; both outputs stay close (it used to crash, or hand the Gemm codes of the other layout)."""
    rng = _rng()
    w = (rng.standard_normal((32, 64)) / 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Gemm", ["z", "W"], ["t"], name="gemm", transB=1)]
    proto = make_model(nodes, [vinfo("x", shape=(8, 32)), vinfo("z", shape=(8, 64))],
                       [vinfo("y", shape=(8, 64)), vinfo("t", shape=(8, 32))], [tensor("W", w)])
    feeds = {"x": rng.standard_normal((8, 32)).astype(np.float32), "z": rng.standard_normal((8, 64)).astype(np.float32)}
    for target, opset in (("ort-cpu", 17), ("portable", 21)):
        proto.opset_import[0].version = opset
        model, details, _ = _quantize(proto, "quantize-weights", context, target=target)
        assert sorted(q["method"] for q in details["quantized"]) == ["rtn", "rtn"], details["quantized"]
        expected, actual = _run(proto, feeds), _run(model, feeds)
        for out in ("y", "t"):
            assert _errors(expected[out], actual[out])[1] < INT4_REL, (target, out)


def test_gptq_falls_back_to_round_to_nearest_when_it_does_not_validate():
    """Zero-mean isotropic activations with far fewer calibration rows than K: GPTQ overfits
    the rows it saw, loses on the held-out half, and the weight is rounded to nearest (exactly)."""
    rng = _rng()
    w = rng.standard_normal((128, 16)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
                       [vinfo("x", shape=(4, 128))], [vinfo("y", shape=(4, 16))], [tensor("W", w)])
    samples = tuple({"x": rng.standard_normal((4, 128)).astype(np.float32)} for _ in range(2))
    context = dataclasses.replace(runtime.pass_context(), calibration=samples)
    model, details, _ = _quantize(proto, "quantize-weights", context, target="ort-cpu", accuracy_level=0)
    (q,) = details["quantized"]
    assert q["method"] == "rtn" and q["held_out_error"]["gptq"] >= q["held_out_error"]["rtn"], q
    x = rng.standard_normal((4, 128)).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"x": x})["y"], x @ quantize_blocks(w, 4, 32, True).dequantize(),
                               rtol=1e-4, atol=1e-4)


def test_gptq_without_a_runtime_rounds_to_nearest_and_says_why():
    model = ir.serde.deserialize_model(_mlp(opset=21, layers=2))
    result = registry.get_pass("quantize-weights").create(target="portable")(model)
    assert result.details["method"]["rtn"] == 2 and result.details["method"]["note"].startswith("rtn: no runtime")


def test_gptq_blocks_match_the_round_to_nearest_layout():
    """Same code ranges and block layout as round to nearest; on an identity second moment
    (uncorrelated, equal channels) GPTQ has nothing to compensate and equals it."""
    rng = _rng()
    w = rng.standard_normal((70, 9)).astype(np.float32)  # K = 70: a partial last block
    for bits, symmetric in ((4, True), (4, False), (8, True)):
        got = gptq_blocks(w, np.eye(70), bits, 32, symmetric)
        want = quantize_blocks(w, bits, 32, symmetric)
        assert got.codes.shape == want.codes.shape and got.scale.shape == want.scale.shape
        np.testing.assert_array_equal(got.codes, want.codes)
        np.testing.assert_allclose(got.dequantize(), want.dequantize(), rtol=1e-6)


def _embedding(opset=17, vocab=100, width=64):
    rng = _rng()
    table = (0.02 * rng.standard_normal((vocab, width))).astype(np.float32)
    nodes = [helper.make_node("Identity", ["table"], ["table_tied"], name="tie"),
             helper.make_node("Gather", ["table_tied", "ids"], ["y"], name="lookup", axis=0)]
    proto = make_model(nodes, [vinfo("ids", TensorProto.INT64, (2, 7))], [vinfo("y", shape=(2, 7, width))],
                       [tensor("table", table)], opset=opset)
    return proto, table, {"ids": rng.integers(0, vocab, (2, 7)).astype(np.int64)}


@pytest.mark.parametrize(("target", "opset", "bits", "symmetric"), [
    ("ort-cpu", 17, 4, True), ("ort-cpu", 17, 4, False), ("ort-cpu", 17, 8, False), ("portable", 21, 4, True)])
def test_embedding_gather_matches_float_dequantization(target, opset, bits, symmetric, context):
    proto, table, feeds = _embedding(opset)
    model, details, _ = _quantize(proto, "quantize-weights", context, target=target, bits=bits, symmetric=symmetric)
    op = "com.microsoft::GatherBlockQuantized" if target == "ort-cpu" else "Gather"
    assert _ops(model)[op] == 1 and not _ops(model)["Identity"] and "table" not in model.graph.initializers
    dequantized = quantize_blocks(table.T, bits, 32, symmetric).dequantize().T
    np.testing.assert_allclose(_run(model, feeds)["y"], dequantized[feeds["ids"]], rtol=1e-6, atol=1e-7)
    _assert_close(proto, model, feeds, INT4_REL if bits == 4 else INT8_REL, f"int{bits} embedding ({target})")
    if bits == 4 and symmetric:
        ratio = details["weight_bytes_after"] / details["weight_bytes_before"]
        print(f"int4 embedding ({target}): {ratio:.4f}x")
        assert ratio <= 0.16
    _, details, modified = _quantize(proto, "quantize-weights", context, target=target, embeddings=False)
    assert not modified and details["skipped"] == []


def test_tiny_transformer_both_passes(context):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models import transformer

    model = transformer.build(layers=2, hidden=64, heads=4, ffn=256, vocab=500, max_positions=64)
    feeds = {"input_ids": _rng().integers(0, 500, (2, 16)).astype(np.int64)}
    scores = {"/encoder/layer.0/attention/self/MatMul", "/encoder/layer.0/attention/self/MatMul_1",
              "/encoder/layer.1/attention/self/MatMul", "/encoder/layer.1/attention/self/MatMul_1"}
    for pass_name, bound, quantized in (("quantize-dynamic", INT8_REL, 12), ("quantize-weights", INT4_REL, 14)):
        out, details, _ = _quantize(model, pass_name, context, target="ort-cpu")
        _assert_close(model, out, feeds, bound, f"tiny transformer {pass_name}")
        assert len(details["quantized"]) == quantized  # 6 linear layers per block (+ 2 embeddings)
        assert {s["node"] for s in details["skipped"]} == scores
        assert {s["reason"] for s in details["skipped"]} == {"both inputs are activations"}
        left = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"}
        assert set(_float_matrices(out)) == (left if pass_name == "quantize-dynamic" else set())
        ratio = details["weight_bytes_after"] / details["weight_bytes_before"]
        print(f"tiny transformer {pass_name}: weights {ratio:.4f}x")
        if pass_name == "quantize-weights":
            assert ratio <= 0.16


def test_shared_weight_is_quantized_once(context):
    w = (_rng().standard_normal((32, 16)) / 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="left"),
             helper.make_node("MatMul", ["x2", "W"], ["b"], name="right")]
    proto = make_model(nodes, [vinfo("x", shape=(3, 32)), vinfo("x2", shape=(3, 32))],
                       [vinfo("a", shape=(3, 16)), vinfo("b", shape=(3, 16))], [tensor("W", w)])
    for pass_name in ("quantize-dynamic", "quantize-weights"):
        model, details, _ = _quantize(proto, pass_name, context, target="ort-cpu")
        assert len(model.graph.initializers) in (2, 3), list(model.graph.initializers)  # one copy
        assert details["weight_bytes_before"] == w.nbytes


# ------------------------------------------------------------------------------ refusals and options


def test_weight_only_refuses_tvm_targets(context):
    with pytest.raises(OptionError) as e:
        _quantize(_mlp(), "quantize-weights", context, target="tvm-llvm")
    assert str(e.value) == weights.TVM_REFUSAL


def test_portable_weight_only_needs_opset_21(context):
    with pytest.raises(OptionError, match="opset >= 21.*model has 17: add --target-opset 21"):
        _quantize(_mlp(opset=17), "quantize-weights", context, target="portable")


def test_options_are_checked_and_listed():
    info = registry.get_pass("quantize-weights")
    assert [o.name for o in info.options] == ["target", "bits", "block_size", "symmetric", "accuracy_level",
                                              "embeddings", "method", "exclude_nodes"]
    assert info.takes_context
    assert [o.name for o in registry.get_pass("quantize-dynamic").options] == [
        "target", "per_channel", "smooth", "op_types", "exclude_nodes"]
    for bad in ({"bits": 3}, {"block_size": 48}, {"accuracy_level": 5}):
        with pytest.raises(OptionError):
            info.create(**bad)
    with pytest.raises(OptionError, match="Conv"):
        registry.get_pass("quantize-dynamic").create(op_types=("Conv",))


def test_portable_needs_no_context():
    """Portable quantization reads nothing from the targets: it runs without a context."""
    model = ir.serde.deserialize_model(_mlp(opset=21))
    result = registry.get_pass("quantize-weights").create()(model)
    assert result.modified and len(result.details["quantized"]) == 3


def test_gemm_rewrite_keeps_a_weight_that_is_a_graph_output_and_touches_only_its_own_candidates(context):
    """The alpha rewrite makes a scaled copy of B; a B that is also a graph output stays. A pass
    told to quantize MatMuls only (op_types) leaves a Gemm exactly as it was."""
    rng = _rng()
    w = rng.standard_normal((32, 16)).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="g", alpha=0.5)],
                       [vinfo("x", shape=(8, 32))], [vinfo("y", shape=(8, 16)), vinfo("W", shape=(32, 16))],
                       [tensor("W", w)])
    model, details, _ = _quantize(proto, "quantize-dynamic", context, target="ort-cpu")
    assert [q["node"] for q in details["quantized"]] == ["g"] and "W" in model.graph.initializers
    x = rng.standard_normal((8, 32)).astype(np.float32)
    out = _run(model, {"x": x})
    np.testing.assert_array_equal(out["W"], w)
    assert _errors(_run(proto, {"x": x})["y"], out["y"])[1] < INT8_REL
    untouched, details, modified = _quantize(proto, "quantize-dynamic", context, target="ort-cpu", op_types=("MatMul",))
    (gemm,) = [n for n in untouched.graph if n.op_type == "Gemm"]
    assert not modified and details["quantized"] == [] and gemm.attributes["alpha"].value == 0.5
    assert list(untouched.graph.initializers) == ["W"]
