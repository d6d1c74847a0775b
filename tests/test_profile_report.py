"""Profiles as data: schema, a row per executed kernel, costs tied to graph nodes, the
Chrome trace, Markdown/HTML renderers and the profile/report/optimize commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from gcomp.backends import get_backend

from gcomp import io
from gcomp.perf import Profile, classify, graph_costs
from gcomp.report import compare_document, render_markdown, schema

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
SHAPE = (1, 3, 224, 224)


def gcomp(*args):
    return subprocess.run(
        [sys.executable, "-m", "gcomp", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    from models import build

    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    io.save(build("resnet18"), path)
    return path


@pytest.fixture(scope="module")
def feeds():
    return {"input": np.random.default_rng(0).random(SHAPE, dtype=np.float32)}


@pytest.fixture(scope="module")
def fused(resnet, feeds):
    """ResNet-18 on ORT with all its graph optimizations (fused, NCHWc kernels)."""
    return (
        get_backend("ort")
        .compile(resnet, "cpu", optimization="all")
        .profile(feeds, iters=3, warmup=1)
    )


@pytest.fixture(scope="module")
def plain(resnet, feeds):
    """ResNet-18 on ORT with optimizations off: kernels are the graph's nodes."""
    return (
        get_backend("ort")
        .compile(resnet, "cpu", optimization="disable")
        .profile(feeds, iters=2, warmup=1)
    )


def ort_kernel_names(path, feeds, optimization):
    """Kernel names straight from ONNX Runtime's own trace, independently of gcomp's parser."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(path).with_name(f"ort-{optimization}"))
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    return {
        e["name"][: -len("_kernel_time")]
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    }


def test_profile_json_follows_the_shipped_schema(fused):
    doc = fused.to_dict()
    jsonschema.validate(doc, schema())
    for key in ("schema_version", "model", "environment", "backend", "latency", "ops"):
        assert key in doc
    assert doc["schema_version"] == "1.3"
    assert all({"node", "op_type", "time_ms"} <= set(row) for row in doc["ops"])
    lat = doc["latency"]
    assert lat["iterations"] == 3 and lat["warmup"] == 1 and len(lat["samples_ms"]) == 3
    assert lat["min_ms"] <= lat["p50_ms"] <= lat["p99_ms"]
    env = doc["environment"]
    assert (
        env["cores"] >= 1 and isinstance(env["cpu_features"], list) and isinstance(env["gpu"], list)
    )
    assert doc["memory"]["peak_rss_bytes"] > 0
    # Saved and read back, it is the same document (gcomp report reads saved profiles).
    assert Profile.from_dict(json.loads(json.dumps(doc))).to_dict() == doc
    # A document that breaks the schema is caught (the check can fail).
    broken = json.loads(json.dumps(doc))
    broken["ops"][0]["bound"] = "cpu"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema())


@pytest.mark.parametrize("optimization", ["disable", "all"])
def test_every_executed_kernel_has_a_row(resnet, feeds, plain, fused, optimization):
    prof = plain if optimization == "disable" else fused
    rows = {op.node for op in prof.ops}
    assert rows == ort_kernel_names(resnet, feeds, optimization)
    kernels = [t for t in prof.timeline if t["op_type"] is not None]
    assert {t["node"] for t in kernels} == rows and len(kernels) == len(rows)


def test_costs_without_fusion_equal_the_graph_costs(plain, resnet):
    """With ORT's optimizations off each kernel is a graph node; pricing it from the shapes
    ORT ran gives exactly gcomp's count from inferred shapes."""
    model = io.load(resnet)
    costs = graph_costs(model, {"input": SHAPE})
    assert {op.node for op in plain.ops} == set(costs)
    for op in plain.ops:
        assert op.graph_node == op.node
        assert (op.flops, op.bytes) == (costs[op.node].flops, costs[op.node].bytes), op.node
    assert plain.totals["macs"] == pytest.approx(1.8141e9, rel=1e-3)
    assert plain.totals["graph_flops"] == plain.totals["flops"]


def test_fused_kernels_keep_the_work_and_name_their_graph_node(fused, resnet):
    names = {n.name for n in io.load(resnet).graph}
    # ORT folds BN into Conv and fuses Relu/Add: the multiply-adds are the same 1.81 G.
    assert fused.totals["macs"] == pytest.approx(fused.totals["graph_macs"], rel=0.01)
    convs = [op for op in fused.ops if op.op_type == "Conv"]
    assert len(convs) == 20
    assert all(op.graph_node in names for op in convs)  # e.g. ".../Relu_output_0_nchwc" -> its Relu
    assert all(op.graph_node is None or op.graph_node in names for op in fused.ops)
    assert all(op.flops is not None for op in fused.ops), [
        op.op_type for op in fused.ops if op.flops is None
    ]


def test_roofline_bounds(plain):
    roof = plain.roofline
    assert roof["peak_gflops"] > 0 and roof["bandwidth_gbs"] > 0 and roof["ridge_flop_per_byte"] > 0
    for op in plain.ops:
        assert op.bound == classify(op.flops, op.bytes, roof["ridge_flop_per_byte"])
        if op.time_ms > 0:
            assert op.gflops_per_s == pytest.approx(op.flops / op.time_ms / 1e6)
            assert op.gb_per_s == pytest.approx(op.bytes / op.time_ms / 1e6)
    # One FLOP per 8 bytes moved sits below any CPU's ridge point.
    relus = [op for op in plain.ops if op.op_type == "Relu"]
    assert relus and all(
        op.intensity == pytest.approx(1 / 8) and op.bound == "memory" for op in relus
    )


# Trace Event Format (the JSON object form chrome://tracing and Perfetto load), as a schema.
TRACE_SCHEMA = {
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "traceEvents": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "ph", "pid", "tid"],
                "properties": {
                    "name": {"type": "string"},
                    "ph": {"enum": ["X", "M"]},
                    "pid": {"type": "integer"},
                    "tid": {"type": "integer"},
                    "ts": {"type": "number", "minimum": 0},
                    "dur": {"type": "number", "minimum": 0},
                    "cat": {"type": "string"},
                    "args": {"type": "object"},
                },
                "if": {"properties": {"ph": {"const": "X"}}},
                "then": {"required": ["ts", "dur"]},
            },
        },
    },
}


def test_chrome_trace_is_valid_trace_event_json(fused, tmp_path):
    from gcomp.report.trace import write_trace

    path = write_trace(fused.to_dict(), tmp_path / "t.json")
    trace = json.loads(path.read_text())
    jsonschema.validate(trace, TRACE_SCHEMA)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    (run,) = [e for e in slices if e["cat"] == "run"]
    ops = [e for e in slices if e["cat"] == "op"]
    assert len(ops) == len(fused.ops)  # every kernel of the run is a slice
    assert {e["args"]["node"] for e in ops} == {op.node for op in fused.ops}
    eps = 1.0  # µs: ORT's timestamps are whole microseconds
    ops.sort(key=lambda e: e["ts"])
    for e in ops:
        assert run["ts"] - eps <= e["ts"] and e["ts"] + e["dur"] <= run["ts"] + run["dur"] + eps
    for a, b in zip(ops, ops[1:]):  # one thread: slices never partially overlap
        assert a["ts"] + a["dur"] <= b["ts"] + eps
    assert any(e["ph"] == "M" and e["name"] == "process_name" for e in trace["traceEvents"])


def test_renderers(fused):
    doc = fused.to_dict()
    md = render_markdown(doc)
    top = fused.ops[0]
    assert top.node in md and "GFLOP" in md and "## By op type" in md
    from gcomp.report import render_html

    page = render_html(doc)
    assert page.startswith("<!DOCTYPE html>") and top.node in page
    assert "<svg" in page and "Roofline" in page
    for forbidden in ('src="http', 'href="http', "<link", "@import", "url("):
        assert forbidden not in page
    # Names from the model are escaped: a hostile node name cannot inject markup.
    doc["ops"][0]["node"] = "<script>alert('x')</script>"
    hostile = render_html(doc)
    assert "<script>alert" not in hostile and "&lt;script&gt;alert" in hostile
    cmp = compare_document([fused.to_dict(), fused.to_dict()])
    jsonschema.validate(cmp, schema())
    assert cmp["labels"][0] != cmp["labels"][1]
    assert "median speed-up vs first" in render_markdown(cmp) and "Per node" in render_html(cmp)


def test_profile_command_writes_html_and_trace_quietly(tmp_path):
    html, trace, data = tmp_path / "p.html", tmp_path / "t.json", tmp_path / "p.json"
    proc = gcomp(
        "profile",
        DEFAULT,
        "--iters",
        "3",
        "--warmup",
        "1",
        "--report",
        html,
        "--trace",
        trace,
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert html.read_text().startswith("<!DOCTYPE html>")
    jsonschema.validate(json.loads(trace.read_text()), TRACE_SCHEMA)
    proc = gcomp("profile", DEFAULT, "--iters", "3", "--report", data, "--optimization", "disable")
    assert proc.returncode == 0, proc.stderr
    assert "GFLOP per run" in proc.stdout and "bound" in proc.stdout
    # gcomp report compares saved profiles.
    cmp = tmp_path / "cmp.json"
    proc = gcomp("report", data, data, "-o", cmp, "--label", "a", "--label", "b")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(cmp.read_text())
    jsonschema.validate(doc, schema())
    assert doc["kind"] == "compare" and doc["labels"] == ["a", "b"]


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["profile", DEFAULT, "--trace", "{d}/t.txt"], "--trace"),
        (["profile", DEFAULT, "--report", "{d}/p.pdf"], "unsupported format"),
        (["report", "{d}/missing.json", "-o", "{d}/c.html"], "no such file"),
        (["report", "{d}/not.json", "-o", "{d}/c.html"], "not a JSON file"),
        (["report", "{d}/optimize.json", "-o", "{d}/c.html"], "not a profile"),
        (["report", "{d}/future.json", "-o", "{d}/c.html"], "schema 2.0"),
        (["report", "{d}/optimize.json", "-o", "{d}/c.pdf"], "unsupported format"),
    ],
    ids=[
        "trace-extension",
        "report-extension",
        "missing",
        "not-json",
        "not-a-profile",
        "newer-schema",
        "output-ext",
    ],
)
def test_report_errors_are_one_line(tmp_path, args, contains):
    (tmp_path / "not.json").write_text("<html>")
    (tmp_path / "optimize.json").write_text(
        json.dumps({"schema_version": "1.1", "kind": "optimize"})
    )
    (tmp_path / "future.json").write_text(json.dumps({"schema_version": "2.0", "kind": "profile"}))
    proc = gcomp(*[str(a).replace("{d}", str(tmp_path)) for a in args])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gcomp: error: ") and contains in lines[0], (
        proc.stderr
    )
    assert not list(tmp_path.glob("c.*")) and not list(tmp_path.glob("t.*"))


def test_optimize_report_has_pass_errors_and_profiles(tmp_path):
    report = tmp_path / "r.json"
    proc = gcomp(
        "optimize",
        DEFAULT,
        "-o",
        tmp_path / "o.onnx",
        "--report",
        report,
        "--profile",
        "--pass-errors",
        "--pass-latency",
        "--profile-iters",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(report.read_text())
    jsonschema.validate(doc, schema())
    changed = [p for p in doc["passes"] if p["modified"]]
    assert changed and all(
        p["max_abs_error"] is not None and p["max_abs_error"] < 1e-4 for p in changed
    )
    assert all(p["max_abs_error"] is None for p in doc["passes"] if not p["modified"])
    assert all(p["latency_ms"] > 0 for p in changed) and doc["input_latency_ms"] > 0
    before, after = doc["profiles"]["before"], doc["profiles"]["after"]
    assert before["model"]["nodes"] > after["model"]["nodes"]
    assert before["totals"]["graph_flops"] == pytest.approx(
        after["totals"]["graph_flops"], rel=0.05
    )
    # The speed figure is the interleaved timing's, worded by one rule on every page.
    from gcomp.report import render_html
    from gcomp.report.speed import headline

    speed = doc["profiles"]["speed"]
    assert speed["runs"] == speed["blocks"] * speed["runs_per_block"] and len(speed["block_ratios"]) == 12
    assert speed["speedup_p10"] <= speed["speedup_median"] <= speed["speedup_p90"]
    assert headline(speed) in render_html(doc) and headline(speed) in render_markdown(doc)
    assert "median speed-up vs first" not in render_markdown(doc)  # no second, unmatched figure
    # The optimize report with profiles is itself comparable.
    proc = gcomp("report", report, "-o", tmp_path / "c.md")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "c.md").read_text()
    assert "default.onnx · ort/cpu" in text and "o.onnx · ort/cpu" in text


def test_no_timeline_means_no_files(fused, tmp_path):
    """A backend that records no run timeline cannot give a trace: nothing is written, not
    even the report asked for beside it."""
    from gcomp.errors import GcompError
    from gcomp.profiling import write_outputs

    doc = fused.to_dict()
    doc["timeline"] = []
    with pytest.raises(GcompError, match="no timeline"):
        write_outputs(doc, report=tmp_path / "r.html", trace=tmp_path / "t.json")
    assert list(tmp_path.iterdir()) == []


def test_pass_latency_is_measured_after_each_changing_pass():
    from gcomp.pipeline import optimize

    result = optimize(DEFAULT, "O1", pass_latency=True, input_shapes={"input_ids": (1, 16)})
    assert result.input_latency_ms is not None and result.input_latency_ms > 0
    changed = [p for p in result.passes if p.modified]
    assert changed and all(p.latency_ms is not None and p.latency_ms > 0 for p in changed)
    assert all(p.latency_ms is None for p in result.passes if not p.modified)
    assert all(p.max_abs_error is None for p in result.passes)  # not asked for
    untimed = optimize(DEFAULT, "O1", input_shapes={"input_ids": (1, 16)})
    assert untimed.input_latency_ms is None and all(p.latency_ms is None for p in untimed.passes)


def test_op_times_account_for_the_profiled_runs(fused):
    """ORT's own span of the profiled runs is recorded; the kernels sum to most of it
    (bench/PROFILE_RESIDUE.md: 97-99.8% on ms-scale models; the rest is ORT's per-kernel
    bookkeeping), whatever else loads the machine."""
    totals = fused.totals
    assert totals["profiled_run_ms"] > 0
    assert 0.5 < totals["op_time_over_profiled_run"] <= 1.05
