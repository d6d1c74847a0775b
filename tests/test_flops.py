"""FLOP and byte counts against values computed by hand, and the roofline classification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gcomp.perf import TensorInfo, flops, graph_costs, op_cost, roofline
from tests.conftest import make_model, tensor, vinfo

REPO = Path(__file__).resolve().parents[1]


def t(*shape, itemsize=4):
    return TensorInfo(tuple(shape), itemsize)


def test_matmul_batched_by_hand():
    # [2, 3, 64, 128] @ [128, 32]: 2*3*64*32 outputs, each 128 multiply-adds.
    cost = op_cost("MatMul", [t(2, 3, 64, 128), t(128, 32)], [t(2, 3, 64, 32)])
    assert cost.macs == 2 * 3 * 64 * 32 * 128
    assert cost.flops == 2 * cost.macs
    assert cost.bytes == 4 * (2 * 3 * 64 * 128 + 128 * 32 + 2 * 3 * 64 * 32)


def test_gemm_transposed_with_bias():
    # A [K=256, M=8] (transA), B [N=16, K] (transB), C [16]: M*N*K MACs + one add per output.
    cost = op_cost("Gemm", [t(256, 8), t(16, 256), t(16)], [t(8, 16)], {"transA": 1, "transB": 1})
    assert cost.macs == 8 * 16 * 256
    assert cost.flops == 2 * 8 * 16 * 256 + 8 * 16


def test_conv_grouped_strided_by_hand():
    # x [1, 32, 56, 56], 64 filters of 3x3 over 32/4 = 8 channels (group 4), stride 2 -> [1, 64, 28, 28]
    cost = op_cost(
        "Conv",
        [t(1, 32, 56, 56), t(64, 8, 3, 3), t(64)],
        [t(1, 64, 28, 28)],
        {"group": 4, "strides": [2, 2]},
    )
    outputs = 64 * 28 * 28
    assert cost.macs == outputs * 8 * 9
    assert cost.flops == 2 * outputs * 72 + outputs  # bias: one add per output
    no_bias = op_cost("Conv", [t(1, 32, 56, 56), t(64, 8, 3, 3)], [t(1, 64, 28, 28)])
    assert no_bias.flops == 2 * outputs * 72


def test_conv_transpose_and_attention_by_hand():
    # ConvTranspose: every input element scatters to C_out/group * kh * kw outputs.
    ct = op_cost("ConvTranspose", [t(1, 16, 8, 8), t(16, 4, 2, 2)], [t(1, 4, 16, 16)])
    assert ct.macs == 16 * 8 * 8 * 4 * 2 * 2
    # ONNX Attention [B=2, H=4, S=10, D=8] x kv S=12: QK^T and PV products plus softmax.
    att = op_cost("Attention", [t(2, 4, 10, 8), t(2, 4, 12, 8), t(2, 4, 12, 8)], [t(2, 4, 10, 8)])
    assert att.macs == 2 * (2 * 4 * 10 * 12 * 8)
    assert att.flops == 2 * att.macs + 5 * 2 * 4 * 10 * 12


def test_norms_elementwise_data_movement_and_unknown():
    x = t(4, 128, 256)
    assert op_cost("LayerNormalization", [x, t(256), t(256)], [x]).flops == 8 * x.numel
    assert (
        op_cost("BatchNormalization", [t(1, 8, 4, 4)] + [t(8)] * 4, [t(1, 8, 4, 4)]).flops
        == 2 * 128
    )
    assert op_cost("Add", [x, t(256)], [x]).flops == x.numel  # broadcasting: per output element
    assert op_cost("Reshape", [x, t(2, itemsize=8)], [t(512, 256)]).flops == 0
    half = op_cost("Relu", [t(10, itemsize=2)], [t(10, itemsize=2)])
    assert half.bytes == 40
    unknown = op_cost("Frobnicate", [x], [x])
    assert unknown.flops is None and unknown.bytes == 2 * x.nbytes  # bytes still counted
    assert (
        op_cost("MatMul", [None, t(3, 3)], [t(3, 3)]).flops is None
    )  # a shape it needs is unknown


def test_graph_costs_use_inferred_shapes_at_the_given_input_shapes():
    # x [batch, 64] -> MatMul W[64, 32] -> Relu: intermediate shapes come from inference only.
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="act"),
        ],
        [vinfo("x", shape=("batch", 64))],
        [vinfo("y", shape=("batch", 32))],
        [tensor("w", np.ones((64, 32), np.float32))],
    )
    model = ir.serde.deserialize_model(proto)
    costs = graph_costs(model, {"x": (5, 64)})
    assert costs["mm"].macs == 5 * 32 * 64
    assert costs["act"].flops == 5 * 32
    assert graph_costs(model)["mm"].flops is None  # symbolic batch: unknown, not a guess
    assert [v.shape for v in model.graph.inputs][0][0] == ir.SymbolicDim("batch")  # model unchanged


def test_resnet18_is_1_82_g_multiply_adds():
    """The figure every paper quotes for ResNet-18 at 224x224: 1.82 G multiply-accumulates
    (which they call FLOPs); 11.69 M parameters."""
    from gcomp.perf import model_stats
    from models import build

    model = build("resnet18")
    # torchvision's 11,689,512 trainable parameters plus BN running means and variances.
    assert model_stats(model).parameters == 11_689_512 + 2 * 5 * (
        64 + 128 + 256 + 512
    )  # 5 BNs per width
    costs = graph_costs(model, {"input": (1, 3, 224, 224)})
    macs = sum(c.macs for c in costs.values() if c.macs)
    assert macs == pytest.approx(1.8141e9, rel=1e-3)
    convs = [c for name, c in costs.items() if name.endswith("Conv")]
    assert len(convs) == 20  # 1 stem + 16 in blocks + 3 projection shortcuts
    # The stem by hand: 64 x 112 x 112 outputs, 3*7*7 multiply-adds each.
    assert costs["/stem/conv/Conv"].macs == 64 * 112 * 112 * 3 * 49
    assert all(c.flops is not None for c in costs.values())
    # Batch 2 doubles every count.
    twice = graph_costs(model, {"input": (2, 3, 224, 224)})
    assert sum(c.macs for c in twice.values() if c.macs) == 2 * macs


def test_roofline_classification():
    assert roofline.classify(100, 10, ridge=5.0) == "compute"
    assert roofline.classify(100, 100, ridge=5.0) == "memory"
    assert roofline.classify(0, 100, ridge=5.0) == "memory"  # data movement
    assert roofline.classify(None, 100, ridge=5.0) is None


def test_machine_peaks_from_cpuinfo_calibrated_once_per_process(monkeypatch):
    monkeypatch.setattr(roofline, "_MEMO", {})
    info = {"model name": "Test CPU", "flags": "sse2 avx avx2 fma avx512f", "cpu MHz": "2500.000"}
    monkeypatch.setattr(roofline, "_cpuinfo", lambda: info)
    monkeypatch.setattr(roofline.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(roofline.Path, "read_text", _no_sysfs(roofline.Path.read_text))
    monkeypatch.setattr(roofline, "_calibrate", lambda: pytest.fail("calibrated with calibrate=False"))
    theory = roofline.machine(calibrate=False)
    # 512-bit vectors = 16 float32 lanes, x2 (FMA), x2 FMA units, x4 cores, x2.5 GHz.
    assert theory.theoretical_gflops == pytest.approx(16 * 2 * 2 * 4 * 2.5)
    assert theory.peak_source == "theoretical" and theory.bandwidth_gbs is None
    assert theory.peak_method.startswith("theoretical: 512-bit vectors")
    # The best matrix product is the compute roof, and the report is told which it was.
    gemms = {"numpy 512": 150.0, "onnxruntime 512": 200.0, "onnxruntime 1024": 180.0}
    monkeypatch.setattr(roofline, "_calibrate", lambda: (gemms, 20.0))
    first = roofline.machine()
    assert (first.measured_gflops, first.peak_gflops, first.bandwidth_gbs) == (200.0, 200.0, 20.0)
    assert first.peak_source == "measured" and first.ridge == pytest.approx(10.0)
    assert "onnxruntime 512 fastest" in first.peak_method and "256x256, 512x512, 1024x1024" in first.peak_method
    assert "copies of 256 MiB" in first.bandwidth_method and first.to_dict()["gemm_gflops"] == gemms
    # Kept for the process: no second calibration, and calibrate=False sees it too.
    monkeypatch.setattr(roofline, "_calibrate", lambda: pytest.fail("calibrated twice in one process"))
    assert roofline.machine() is first and roofline.machine(calibrate=False) is first
    # refresh measures again; a failed calibration leaves the theoretical peak, saying why.
    monkeypatch.setattr(roofline, "_calibrate", lambda: ({"numpy 256": 90.0}, 10.0))
    assert roofline.machine(refresh=True).peak_gflops == 90.0

    def broken():
        raise roofline.subprocess.CalledProcessError(1, ["python"], stderr="boom")

    monkeypatch.setattr(roofline, "_MEMO", {})
    monkeypatch.setattr(roofline, "_calibrate", broken)
    failed = roofline.machine()
    assert failed.peak_source == "theoretical" and "calibration failed" in failed.peak_method


def test_calibration_runs_in_a_child_and_times_every_product():
    """The real calibration: every size with numpy and ONNX Runtime, positive figures, and
    its 512 MiB of copy buffers never reach this process's peak RSS (profiles report it)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gemms, bandwidth = roofline._calibrate()
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    expected = {f"{lib} {n}" for lib in ("numpy", "onnxruntime") for n in roofline.GEMM_SIZES}
    assert set(gemms) == expected and all(v > 0 for v in gemms.values()) and bandwidth > 0
    assert grew < roofline.COPY_BYTES // 2, grew


def test_a_kernel_above_its_roof_is_judged_a_calibration_error():
    assert roofline.attainable(400.0, 25.0, 2.0) == 50.0  # memory roof: 2 FLOP/B x 25 GB/s
    assert roofline.attainable(400.0, 25.0, 100.0) == 400.0  # compute roof
    assert roofline.attainable(None, 25.0, 2.0) is None
    under = roofline.judge(40.0, 50.0)
    assert (under.efficiency, under.above_roof) == (pytest.approx(0.8), False)
    over = roofline.judge(65.0, 50.0)  # 130 % of the roof
    assert (over.efficiency, over.above_roof, over.attainable_gflops) == (None, True, 50.0)
    assert roofline.judge(50.0, 50.0).efficiency == 1.0  # exactly on the roof is fine
    assert roofline.judge(None, 50.0).efficiency is None and not roofline.judge(None, 50.0).above_roof


def _no_sysfs(original):
    def read_text(self, *args, **kwargs):
        if str(self).startswith("/sys/"):
            raise OSError("no cpufreq in this test")
        return original(self, *args, **kwargs)

    return read_text


def test_dtype_sizes_cover_onnx_float_types():
    for name in ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT8", "INT64", "BOOL"):
        assert TensorProto.DataType.Value(name) and name.lower() in flops.DTYPE_BYTES


def test_exporter_shape_chains_are_priced_at_concrete_shapes():
    """The default transformer computes Reshape targets from Shape/Gather/Concat chains, where
    ONNX's own inference loses dims; every node is still priced, projections by hand."""
    from gcomp import io

    model = io.load(REPO / "models" / "default.onnx")
    costs = graph_costs(model, {"input_ids": (2, 16)})
    assert all(c.flops is not None for c in costs.values()), [
        n for n, c in costs.items() if c.flops is None
    ]
    projections = 0
    for node in model.graph:
        weight = node.inputs[1].const_value if node.op_type == "MatMul" else None
        if weight is not None:
            k, n = weight.shape
            assert costs[node.name].macs == 2 * 16 * k * n, node.name
            projections += 1
    assert projections >= 4


def test_a_fused_kernel_is_priced_from_its_member_nodes():
    """A backend that fuses Conv+BN+Relu into one kernel (TVM) names the members: FLOPs are
    their sum, bytes only what crosses the group's boundary (no intermediate tensors)."""
    from gcomp.perf import LatencyStats, OpRow, Profile
    from models import build

    model = build("resnet18")
    members = ["/stem/conv/Conv", "/stem/bn/BatchNormalization", "/stem/relu/Relu"]
    row = OpRow(node="/stem/relu/Relu", op_type="Conv+BatchNormalization+Relu", time_ms=2.0,
                graph_nodes=members)
    prof = Profile(model={}, environment={}, backend={"name": "test", "target": "cpu"},
                   latency=LatencyStats.from_samples([2.5], 0), ops=[row])
    prof.annotate(model, {"input": (1, 3, 224, 224)}, calibrate=False)
    costs = graph_costs(model, {"input": (1, 3, 224, 224)})
    assert row.flops == sum(costs[m].flops for m in members)
    assert row.macs == 64 * 112 * 112 * 3 * 49
    image, weight, bn, out = 3 * 224 * 224, 64 * 3 * 7 * 7, 4 * 64, 64 * 112 * 112
    assert row.bytes == 4 * (image + weight + bn + out)
    assert row.graph_node == "/stem/relu/Relu"
    assert row.gflops_per_s == pytest.approx(row.flops / 2e6)


def test_shape_tool_fallback_never_writes_into_the_current_folder(tmp_path, monkeypatch):
    """ORT's symbolic shape tool saves "sym_shape_infer_temp.onnx" in the current folder
    when its inference is incomplete (here: an op of an unknown domain); gcomp runs it in
    a temporary folder, so profiling a model leaves the user's folder as it was."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from gcomp.perf import flops

    nodes = [helper.make_node("Foo", ["x"], ["t"], domain="custom"), helper.make_node("Relu", ["t"], ["u"]),
             helper.make_node("MatMul", ["u", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    monkeypatch.chdir(tmp_path)
    costs = flops.graph_costs(ir.from_proto(proto), {"x": (4, 4)})
    assert costs, "no costs computed"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
