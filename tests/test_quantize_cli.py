"""``--quantize`` end to end: budget, sensitivity, speed gate decisions, and refusals.

Timings are never asserted (tests check behaviour): runs that would depend on this
machine's speed use ``speed_gate=False`` / ``--no-speed-gate``, and the gate's decision
is tested on given figures.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import gcomp
import gcomp.pipeline
import gcomp.runtime
import models
from gcomp import quantize as q
from gcomp.runtime import reference
from gcomp.verify.metrics import Budget, measure
from tests.conftest import make_model, tensor, vinfo
from tests.test_cli import DEFAULT, assert_one_line_error, gcomp as run_gcomp


def _layers_model(scales=(1.0, 1.0, 1.0), k=64, seed=0):
    """x -> MatMul(W0) -> Relu -> MatMul(W1) -> Relu -> MatMul(W2): one weight per scale.

    A weight whose columns mix one huge value with small ones loses the small ones to
    per-tensor int8 rounding; ``scales`` puts such outliers in chosen layers."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, s in enumerate(scales):
        w = (rng.standard_normal((k, k)) * 0.1).astype(np.float32)
        if s != 1.0:
            w[0, :] *= s  # one row of outliers: the other rows lose their bits per tensor
        inits.append(tensor(f"W{i}", w))
        out = f"h{i}" if i < len(scales) - 1 else "y"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}" if out != "y" else "y"], name=f"layer{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
        prev = out
    return ir.from_proto(make_model(nodes, [vinfo("x", shape=("batch", k))], [vinfo("y", shape=("batch", k))], inits))


def test_int8_dynamic_keeps_cosine_within_the_default_budget_and_verifies():
    model = models.build("transformer")
    float_copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    result = gcomp.optimize(model, "O2", quantize="int8-dynamic", target="ort-cpu", speed_gate=False)
    report = result.quantization
    assert report is not None and report.quantized, report
    assert result.verification.passed, result.verification.summary()
    assert "accuracy budget cosine >= 0.99" in " ".join(result.verification.notes)
    ops = {n.op_type for n in result.model.graph}
    assert "DynamicQuantizeMatMul" in ops, ops
    # independently of gcomp's own measure: the cosine on fresh inputs
    rng = np.random.default_rng(7)
    feeds = {"input_ids": rng.integers(0, 100, (1, 16)).astype(np.int64)}
    feeds = {v.name: feeds.get(v.name, np.ones((1, 16), np.int64)) for v in float_copy.graph.inputs}
    e = reference(float_copy).run(feeds)
    a = reference(result.model).run(feeds)
    cos = measure([e], [a], Budget())[0]
    assert cos.within, f"cosine {cos.cosine}"
    assert report.weight_bytes_after < 0.3 * report.weight_bytes_before


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weights"])
def test_weights_in_an_external_data_file_quantize(tmp_path, mode):
    """torch.onnx.export(dynamo=True) writes every weight to a .data file: reading it into
    memory for a runtime must not close the file's map that the passes still read from."""
    import onnx

    proto = ir.to_proto(_layers_model())
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    result = gcomp.optimize(str(tmp_path / "m.onnx"), "O2", quantize=mode, target="ort-cpu", speed_gate=False)
    assert result.quantization is not None and result.quantization.quantized
    assert result.verification.passed, result.verification.summary()
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)}
    cos = measure([reference(_layers_model()).run(feeds)], [reference(result.model).run(feeds)], Budget())[0]
    assert cos.within, f"cosine {cos.cosine}"


def test_a_budget_not_met_returns_the_most_sensitive_node_to_float_by_name():
    """Per-tensor int8 on a layer with an outlier row breaks max-abs; the other layers
    are harmless: exactly that layer goes back to float, with its measured contribution."""
    model = _layers_model(scales=(1.0, 400.0, 1.0))
    result = gcomp.optimize(model, "O1", quantize="int8-dynamic", per_channel=False, metric="rel-l2",
                            tolerance=0.02, speed_gate=False, verify=True)
    back = [r["node"] for r in result.quantization.returned_to_float]
    assert back == ["layer1"], result.quantization
    assert result.quantization.returned_to_float[0]["contribution"] > 0.02
    kept = {n.name: n.op_type for n in result.model.graph}
    assert kept["layer1"] == "MatMul", kept
    assert all(r["within"] for r in result.quantization.accuracy), result.quantization.accuracy
    assert result.verification.passed


def test_a_budget_no_quantization_meets_is_declined():
    model = _layers_model(scales=(400.0, 400.0, 400.0))
    with pytest.raises(q.QuantizationDeclined, match="cannot be met with any node quantized"):
        gcomp.optimize(model, "O1", quantize="int8-dynamic", per_channel=False, metric="max-abs",
                       tolerance=1e-9, speed_gate=False)


@pytest.mark.parametrize(
    ("mode", "speed", "declined"),
    [
        ("int8-dynamic", 1.4, False),
        ("int8-dynamic", 1.0, True),  # not faster: declined
        ("int4", 0.95, False),  # weight-only: 5 % slower is accepted (chosen for size)
        ("int4", 0.85, True),  # more than 10 % slower: declined
    ],
)
def test_the_speed_gate_decides_on_the_median_ratio(mode, speed, declined):
    figures = {"speedup_median": speed, "float_ms_median": 2.0, "quantized_ms_median": 2.0 / speed,
               "rounds": 30, "speedup_p10": speed - 0.1, "speedup_p90": speed + 0.1}
    if declined:
        with pytest.raises(q.QuantizationDeclined, match="nothing written"):
            q._gate(mode, figures)
    else:
        q._gate(mode, figures)


def test_int4_shrinks_matmul_weights_below_016x(tmp_path):
    model = models.build("mlp")
    result = gcomp.optimize(model, "O1", quantize="int4", target="ort-cpu", speed_gate=False)
    report = result.quantization
    assert report.weight_bytes_after <= 0.16 * report.weight_bytes_before, report
    assert "MatMulNBits" in {n.op_type for n in result.model.graph}
    assert result.verification.passed, result.verification.summary()


def test_cli_quantize_writes_the_model_and_reports_it(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    proc = run_gcomp("optimize", DEFAULT, "-o", out, "--quantize", "int8-dynamic", "--no-speed-gate",
                     "--report", rep)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    doc = json.loads(rep.read_text())
    assert doc["quantization"]["mode"] == "int8-dynamic"
    assert doc["options"]["quantize"] == "int8-dynamic" and doc["pipeline"] == "O2"
    assert doc["verification"]["status"] == "passed"
    from gcomp.report import render_html, render_markdown

    assert "## Quantization (int8-dynamic, ort-cpu)" in render_markdown(doc)
    # the decisions: int8-dynamic on ort-cpu fuses attention first and quantizes it as QAttention
    assert "| Attention → QAttention |" in render_markdown(doc)
    assert 'quant-nodes' in render_html(doc)
    assert "quantized (int8-dynamic" in proc.stdout
    shown = run_gcomp("inspect", out)
    assert "DynamicQuantizeMatMul x6, QAttention x2 found" in shown.stdout, shown.stdout
    assert "by gcomp --quantize int8-dynamic" in shown.stdout
    assert "quantization: none (float)" in run_gcomp("inspect", DEFAULT).stdout


def test_cli_declines_a_model_with_nothing_to_quantize_and_writes_nothing(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    src = tmp_path / "relu.onnx"
    src.write_bytes(make_model(nodes, [vinfo("x")], [vinfo("y")]).SerializeToString())
    out = tmp_path / "out.onnx"
    proc = run_gcomp("optimize", src, "-o", out, "--quantize", "int4", "--no-speed-gate")
    assert_one_line_error(proc, code=1, contains="no MatMul/Gemm")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["--metric", "cosine"], "--metric needs --quantize"),
        (["--calibration", "nowhere"], "--calibration needs --quantize"),
        (["--quantize", "int8-dynamic", "--calibration", "nowhere"], "no such file or folder"),
        (["--quantize", "int8-dynamic", "--target", "tvm-llvm"], "TVM targets"),
        # combinations --quantize cannot honour: refused before any work
        (["--no-speed-gate"], "--no-speed-gate needs --quantize"),
        (["--quantize", "int8-dynamic", "--precision", "fp16"], "cannot be combined"),
        (["--quantize", "int4", "--set", "bits=8"], "sets bits itself"),
    ],
)
def test_cli_quantize_option_errors_are_one_line(tmp_path, args, contains):
    out = tmp_path / "out.onnx"
    proc = run_gcomp("optimize", DEFAULT, "-o", out, *args)
    assert_one_line_error(proc, code=2, contains=contains)
    assert not out.exists()


def test_calibration_samples_are_what_accuracy_is_measured_on(tmp_path):
    model = _layers_model()
    folder = tmp_path / "cal"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(8):
        np.savez(folder / f"{i}.npz", x=rng.standard_normal((2, 64)).astype(np.float32))
    result = gcomp.optimize(model, "O1", quantize="int8-dynamic", calibration=folder, speed_gate=False)
    assert result.quantization.samples == 8
    assert "calibration data" in result.quantization.sample_source


def test_a_node_slower_quantized_returns_to_float_with_its_times(monkeypatch):
    """The per-node gate (gcomp.quantize_regions) on given timings: only the slower node
    goes back to float, and the report gives both times."""
    from gcomp import quantize_regions

    def fake_time(name, floaty, quantized, feeds, target):
        assert {n.op_type for n in quantized.graph} != {n.op_type for n in floaty.graph}  # really quantized
        slow = name == "layer2"
        return quantize_regions.NodeTiming(name, 10.0, 12.0 if slow else 5.0)

    monkeypatch.setattr(quantize_regions, "_time", fake_time)
    monkeypatch.setattr(q, "_speed", lambda *a: {"speedup_median": 1.5, "float_ms_median": 1.0,
                                                 "quantized_ms_median": 0.7, "rounds": 1,
                                                 "speedup_p10": 1.4, "speedup_p90": 1.6})
    result = gcomp.optimize(_layers_model(), "O1", quantize="int8-dynamic")
    report = result.quantization
    assert [r["node"] for r in report.returned_to_float] == ["layer2"]
    assert "slower quantized: 12.0 us vs 10.0 us float" in report.returned_to_float[0]["reason"]
    assert {r["node"]: r["decision"] for r in report.regions} == {
        "layer0": "quantized", "layer1": "quantized", "layer2": "float (slower quantized)"}
    assert {n.name: n.op_type for n in result.model.graph}["layer2"] == "MatMul"


def test_one_node_models_run_for_every_quantized_node():
    """Real timings (values not asserted): every quantized node gets a float and a
    quantized one-node model that run on its real activation."""
    from gcomp import quantize_regions

    model = _layers_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    timings = quantize_regions.slower_nodes(model, ["layer0", "layer1", "layer2"], feeds,
                                            pass_name="quantize-dynamic", options={}, target="ort-cpu")
    assert [t.node for t in timings] == ["layer0", "layer1", "layer2"]
    assert all(t.float_us > 0 and t.quantized_us > 0 for t in timings)


def test_a_verification_miss_names_the_first_node_over_the_budget():
    """Quantize layer1 alone per tensor against its outlier row, then check under a budget
    it misses: the walk through the intermediate values names layer1, not a later node."""
    from gcomp.verify.divergence import first_divergent_node

    float_model = _layers_model(scales=(1.0, 400.0, 1.0))
    quantized = float_model.clone()
    step = gcomp.pipeline.registry.get_pass("quantize-dynamic").create(
        context=gcomp.runtime.pass_context(), per_channel=False, exclude_nodes=("layer0", "layer2"))
    assert step(quantized).details["quantized"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    found = first_divergent_node(float_model, quantized, feeds, Budget("rel-l2", 0.02))
    assert found is not None and found.node == "layer1", found
    assert found.error > 0.02
    assert first_divergent_node(float_model, float_model.clone(), feeds, Budget("rel-l2", 0.02)) is None


@pytest.mark.parametrize("endless", ["static", "computed"])
def test_quantization_runs_are_bounded_like_verification(endless):
    """A model that never ends (found by the fuzz campaign with --quantize): a Loop whose
    condition stays true is refused before any run; one whose condition is computed is
    stopped by the run deadline. Either way one clean QuantizationDeclined, no hang."""
    import time

    from onnx import TensorProto

    cond = (helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going") if endless == "static"
            else helper.make_node("Less", ["i", "big"], ["cond_out"], name="less"))
    body = helper.make_graph(
        [cond, helper.make_node("Add", ["acc_in", "x"], ["acc_out"], name="add")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         vinfo("acc_in", shape=(3,))],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vinfo("acc_out", shape=(3,))],
    )
    nodes = [helper.make_node("Loop", ["", "keep", "x"], ["final"], body=body, name="loop"),
             helper.make_node("MatMul", ["v", "W"], ["y"], name="proj")]
    proto = make_model(nodes, [vinfo("x", shape=(3,)), vinfo("v", shape=(2, 16))],
                       [vinfo("final", shape=(3,)), vinfo("y", shape=(2, 16))],
                       [tensor("keep", np.bool_(True)), tensor("big", np.int64(2**62)),
                        tensor("W", np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32))])
    start = time.perf_counter()
    with pytest.raises(q.QuantizationDeclined, match="never ends" if endless == "static" else "stopped after 2 s"):
        gcomp.optimize(ir.from_proto(proto), "O0", quantize="int8-dynamic", speed_gate=False, verify_timeout=2)
    assert time.perf_counter() - start < 30


def test_int8_static_calibrates_on_the_given_samples_and_verifies(tmp_path):
    """--quantize int8 end to end: the core hands the --calibration samples to quantize-static,
    the QDQ model meets the default budget on them, and verification passes."""
    folder = tmp_path / "cal"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(8):
        np.savez(folder / f"{i}.npz", input=rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    result = gcomp.optimize(models.build("cnn", batch=1), "O2", quantize="int8", calibration=folder,
                            target="ort-cpu", speed_gate=False)
    report = result.quantization
    assert report.mode == "int8" and report.samples == 8 and len(report.quantized) == 6, report
    assert all(a["cosine"] >= 0.99 for a in report.accuracy), report.accuracy
    assert result.verification.passed, result.verification.summary()
    ops = {n.op_type for n in result.model.graph}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops, ops


def test_cli_int8_without_calibration_says_how_to_give_it(tmp_path):
    out = tmp_path / "out.onnx"
    proc = run_gcomp("optimize", DEFAULT, "-o", out, "--quantize", "int8")
    assert_one_line_error(proc, code=2, contains="needs real data: give --calibration PATH")
    assert not out.exists()


def test_generated_samples_are_bounded_like_verification_inputs():
    """Found by the fuzz campaign with --quantize: an input declared with a dim of 10^12
    made the sample generator allocate terabytes; it is one clean refusal now."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")]
    proto = make_model(nodes, [vinfo("x", shape=(10**12, 16))], [vinfo("y", shape=(10**12, 16))],
                       [tensor("W", np.ones((16, 16), np.float32))])
    with pytest.raises(q.QuantizationDeclined, match="generated inputs would take"):
        gcomp.optimize(ir.from_proto(proto), "O0", quantize="int8-dynamic", speed_gate=False, verify=False)


def test_calibration_errors_name_the_calibration_option(tmp_path):
    from gcomp.errors import OptionError
    from gcomp.inputs import load_calibration

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(OptionError, match="^--calibration .*not a readable .npz file"):
        load_calibration(bad, _layers_model())


def test_top1_on_an_empty_class_axis_and_an_infinite_tolerance():
    e = np.zeros((3, 0), np.float32)
    assert measure([{"y": e}], [{"y": e}], Budget("top1", 0.01))[0].within
    from gcomp.errors import OptionError

    with pytest.raises(OptionError, match="positive and finite"):
        Budget("cosine", float("inf"))


def test_cli_declines_when_every_output_is_empty(tmp_path):
    """Found by the fuzz campaign: the default model with its batch dim declared 0 gives empty
    outputs; quantized with QAttention, ONNX Runtime died of SIGFPE (a batch of 0). gcomp now
    declines in one line before running a quantized model."""
    import onnx

    proto = onnx.load(DEFAULT)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    src, out = tmp_path / "empty.onnx", tmp_path / "out.onnx"
    onnx.save(proto, src)
    proc = run_gcomp("optimize", src, "-o", out, "--quantize", "int8-dynamic", "--no-speed-gate")
    assert_one_line_error(proc, code=1, contains="every float output is empty on sample 1")
    assert not out.exists()
