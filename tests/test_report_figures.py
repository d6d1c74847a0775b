"""Report figures a reader can trust: the speed headline (worded by one rule from an
interleaved timing), size changes, the roofline's origin and kernels above it (a
calibration error, never above 100 %), process memory apart from the model's, and the
demo model. Wording is checked on fabricated figures; the real command's reports carry it."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gcomp.perf import roofline as rl
from gcomp.report import bytes_change, render_html, render_markdown, schema
from gcomp.report.roof import kernel_roof_text, peak_share_text, roof_origin
from gcomp.report.speed import headline, speed_summary

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
HEADLINE = re.compile(r"^(\d+\.\d\dx faster \(p10-p90 \d+\.\d\d-\d+\.\d\dx\)"
                      r"|\d+\.\d\dx slower \(\d+\.\d\dx; p10-p90 \d+\.\d\d-\d+\.\d\dx\)"
                      r"|no measurable difference \(within ±\d+\.\d %\))$")


def gcomp(*args):
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=600)


# --------------------------------------------------------------------------- speed
def _speed(ratios):
    return speed_summary([2.0, 2.2, 2.1, 1.9], [1.5, 1.4, 1.6, 1.5], ratios, block=4)


def test_speed_headline_claims_a_difference_only_outside_the_spread():
    # 5 blocks: p10 sits 0.4 of the way from the 1st ratio to the 2nd, p90 0.6 from the 4th to the 5th.
    faster = _speed([1.45, 1.30, 1.50, 1.35, 1.40])
    assert (faster["speedup_p10"], faster["speedup_p90"]) == (pytest.approx(1.32), pytest.approx(1.48))
    assert faster["verdict"] == "faster" and faster["headline"] == "1.40x faster (p10-p90 1.32-1.48x)"
    slower = _speed([0.80, 0.82, 0.85, 0.86, 0.90])
    assert slower["verdict"] == "slower"
    assert slower["headline"] == "1.18x slower (0.85x; p10-p90 0.81-0.88x)"
    same = _speed([0.95, 1.0, 1.02, 1.05, 1.1])  # p10 0.97, p90 1.08: 1.0 inside
    assert same["verdict"] == "no measurable difference"
    assert same["headline"] == "no measurable difference (within ±8.0 %)"
    # A median above 1 is no speed-up while the spread still reaches below 1.
    assert _speed([0.9, 1.0, 1.25, 1.3, 1.31])["verdict"] == "no measurable difference"
    # The other figures: minimums and medians of both models, every block's ratio, sorted.
    assert (faster["before_ms_min"], faster["after_ms_min"]) == (1.9, 1.4)
    assert (faster["before_ms_median"], faster["after_ms_median"]) == (pytest.approx(2.05), 1.5)
    assert faster["block_ratios"] == sorted(faster["block_ratios"]) and faster["blocks"] == 5
    # The wording is recomputed from the figures (a document's stored verdict is not trusted).
    assert headline({**faster, "verdict": "slower", "headline": "9.99x faster"}) == faster["headline"]
    with pytest.raises(ValueError):
        speed_summary([], [1.0], [1.0], block=1)


def test_interleaved_speed_times_both_models_in_alternating_blocks():
    from gcomp.profiling import SPEED_BLOCKS, interleaved_speed

    feeds = {"input_ids": np.zeros((1, 8), np.int64)}
    speed = interleaved_speed(DEFAULT, DEFAULT, feeds, budget_ms=200)
    assert speed["blocks"] == SPEED_BLOCKS == len(speed["block_ratios"])
    assert 3 <= speed["runs_per_block"] <= 25 and speed["runs"] == SPEED_BLOCKS * speed["runs_per_block"]
    assert speed["method"] == "interleaved" and speed["backend"] == "ort/cpu"
    assert HEADLINE.match(speed["headline"]), speed["headline"]


# --------------------------------------------------------------------------- sizes
def test_size_changes_show_bytes_and_percent():
    assert bytes_change(2_409_238, 2_409_238 - 1229) == "-1.2 KiB (-0.05 %)"
    assert bytes_change(2_409_238, 2_409_262) == "+24 B (<0.001 %)"
    assert bytes_change(100_000, 100_005) == "+5 B (+0.005 %)"
    assert bytes_change(1 << 20, 3 << 20) == "+2.0 MiB (+200.00 %)"
    assert bytes_change(5, 5) == "no change" and bytes_change(None, 5) == "-" and bytes_change(0, 10) == "+10 B"


# --------------------------------------------------------------------------- roofline
def _fake_machine(peak: float, bandwidth: float) -> rl.Machine:
    return rl.Machine("Test CPU", 2, 512, 2, 2.6, 332.8, peak, bandwidth, peak, "measured",
                      peak_method="measured for this run: test figure", bandwidth_method="measured: test figure")


def _profile(monkeypatch, peak: float, bandwidth: float) -> dict:
    from gcomp.backends import get_backend

    monkeypatch.setattr(rl, "machine", lambda **_kw: _fake_machine(peak, bandwidth))
    exe = get_backend("ort").compile(DEFAULT, "cpu")
    return exe.profile({"input_ids": np.zeros((1, 32), np.int64)}, iters=2, warmup=1).to_dict()


def _roof_cells(markdown: str) -> list[str]:
    """The "of roof" column of a Markdown op table."""
    lines = markdown[markdown.index("| node | op type"):].split("\n\n")[0].splitlines()
    return [line.strip("|").split(" | ")[-1].strip() for line in lines[2:]]


def test_kernels_above_the_roof_are_calibration_errors_never_above_100_percent(monkeypatch):
    doc = _profile(monkeypatch, peak=1.0, bandwidth=0.001)  # a roof every priced kernel beats
    priced = [o for o in doc["ops"] if o["gflops_per_s"]]
    assert priced and all(o["above_roof"] and o["roof_efficiency"] is None for o in priced)
    assert all(o["attainable_gflops_per_s"] <= 1.0 for o in priced)
    assert doc["totals"]["above_roof_ops"] == len(priced)
    jsonschema.validate(doc, schema())
    md, page = render_markdown(doc), render_html(doc)
    cells = _roof_cells(md)
    errors = [c for c in cells if c.startswith("calibration error (") and "GFLOP/s measured >" in c]
    assert errors and len(errors) == len(cells) - cells.count("-")  # "-": a kernel with no arithmetic
    assert page.count('title="measured above the roof"') == len(priced)  # the op table
    assert page.count('stroke="#c0392b"') == len(priced)  # hollow rings on the roofline
    assert "calibration error: " in md and "achieved >" in md  # the model as a whole, too
    # Under a roof no kernel reaches, every kernel has its share, at most 100 %.
    doc = _profile(monkeypatch, peak=1e6, bandwidth=1e6)
    assert not any(o["above_roof"] for o in doc["ops"]) and doc["totals"]["above_roof_ops"] == 0
    shares = [int(c.rstrip("%")) for c in _roof_cells(render_markdown(doc)) if c != "-"]
    assert shares and all(0 <= s <= 100 for s in shares)
    text = render_markdown(doc) + render_html(doc)
    assert "calibration error (" not in text and "calibration error: " not in text
    assert 'title="measured above the roof"' not in text and 'stroke="#c0392b"' not in text


def test_roof_wording_reads_old_documents_the_same_way():
    old = {"gflops_per_s": 130.0, "roof_efficiency": 1.3}  # written before above_roof existed
    assert kernel_roof_text(old) == "calibration error (130 GFLOP/s measured above the roof)"
    assert kernel_roof_text({"roof_efficiency": 0.834}) == "83%"
    assert kernel_roof_text({}) == "-" and kernel_roof_text({}, missing="–") == "–"
    roof = {"peak_gflops": 357.0, "peak_source": "measured", "bandwidth_gbs": 25.6}
    assert peak_share_text(120.0, roof) == "34% of the 357 GFLOP/s measured peak"
    assert peak_share_text(400.0, roof).startswith("calibration error: 400 GFLOP/s achieved > the 357")
    assert "how: not recorded" in roof_origin(roof)  # an old document's roof says what it cannot
    assert "test figure" in roof_origin(_fake_machine(300.0, 20.0).to_dict())


# --------------------------------------------------------------------------- memory
def _chain_model(batch: int | str = 1) -> ir.Model:
    """x -> Relu -> a -> Neg -> b; Mul(a, b) -> c; Add(c, Constant k) -> d; Add(d, W) -> y,
    every tensor [batch, 1024] float (4 KiB at batch 1)."""
    shape = [batch, 1024]
    k = helper.make_tensor("kv", TensorProto.FLOAT, [1, 1024], np.ones(1024, np.float32))
    w = helper.make_tensor("W", TensorProto.FLOAT, [1, 1024], np.ones(1024, np.float32))
    nodes = [helper.make_node("Constant", [], ["k"], value=k), helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Mul", ["a", "b"], ["c"]),
             helper.make_node("Add", ["c", "k"], ["d"]), helper.make_node("Add", ["d", "W"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


def test_model_memory_is_weights_plus_the_activations_alive_at_once():
    from gcomp.perf import graph_costs
    from gcomp.perf.stats import memory_estimate

    model, tensors = _chain_model(), {}
    graph_costs(model, {}, tensors=tensors)
    mem = memory_estimate(model, tensors)
    # At Mul: a, b and c are alive (x freed after Relu; y's turn comes after c is freed).
    assert mem["activations_peak_bytes"] == 3 * 4096
    assert mem["weights_bytes"] == 2 * 4096  # the initializer and the Constant
    assert mem["model_bytes_estimate"] == 5 * 4096 and mem["unsized_activations"] == 0
    assert "estimate" in mem["model_bytes_method"] and "arena" in mem["model_bytes_method"]
    symbolic, tensors = _chain_model("batch"), {}
    graph_costs(symbolic, {}, tensors=tensors)
    unknown = memory_estimate(symbolic, tensors)
    assert unknown["unsized_activations"] == 6 and unknown["activations_peak_bytes"] == 0  # a lower bound


# --------------------------------------------------------------------------- the real command
@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """`gcomp optimize -O3 --profile` on the default model, reports in JSON and Markdown."""
    d = tmp_path_factory.mktemp("figures")
    for ext in ("json", "md"):
        proc = gcomp("optimize", DEFAULT, "-o", d / "o.onnx", "-O", "3", "--profile", "--profile-iters", "3",
                     "--report", d / f"r.{ext}", "-q")
        assert proc.returncode == 0, proc.stderr
    return json.loads((d / "r.json").read_text()), (d / "r.md").read_text()


@pytest.mark.slow
def test_the_optimize_reports_carry_every_figure(optimized):
    doc, md = optimized
    jsonschema.validate(doc, schema())
    speed, page = doc["profiles"]["speed"], render_html(doc)
    # The headline: a ratio with its spread, or no measurable difference; the same in every format.
    assert HEADLINE.match(speed["headline"]), speed["headline"]
    inside = speed["speedup_p10"] <= 1.0 <= speed["speedup_p90"]
    assert (speed["verdict"] == "no measurable difference") == inside
    # (the Markdown report is a second run: its own timing, the same form)
    written = re.search(r"\*\*Speed: (.*?)\*\*", md)
    assert written and HEADLINE.match(written.group(1)) and "Rule: both models timed in one process" in md
    assert f"**Speed: {speed['headline']}**" in render_markdown(doc)
    assert f'speed (interleaved)</div><div class="v">{speed["headline"]}</div>' in page
    # Size changes in bytes and percent.
    assert re.search(r"\| file size \| [\d.]+ MiB \| [\d.]+ MiB \| [+-][\d.]+ (B|KiB|MiB) \((<0\.001|[+-][\d.]+) %\) \|",
                     md), md
    assert re.search(r"\| initializer bytes \| .* \| ([+-][\d.]+ (B|KiB|MiB) \(.*%\)|no change) \|", md)
    # Memory: the process apart from the model; the model's figure says what it is.
    for label in ("before", "after"):
        mem, model = doc["profiles"][label]["memory"], doc["profiles"][label]["model"]
        assert mem["weights_bytes"] >= model["initializer_bytes"]
        assert mem["weights_bytes"] < mem["model_bytes_estimate"] < mem["peak_rss_bytes"]
    assert "| process peak RSS | model memory (estimate) |" in md and "Model memory: estimate:" in md
    assert "process peak RSS" in page and "model memory (estimate)" in page
    # The roofline says where its roofs came from.
    roof = doc["profiles"]["after"]["roofline"]
    assert roof["peak_method"].startswith("measured for this run: best of float32 matrix products")
    assert f"Roofline: {roof_origin(roof)}" in render_markdown(doc) and roof_origin(roof) in html.unescape(page)
    assert "Roofline: compute roof " in md and "measured for this run: best of float32 matrix products" in md


def test_a_fabricated_speed_is_worded_by_the_rule_on_every_page(optimized):
    doc, _ = optimized
    doc = json.loads(json.dumps(doc))
    doc["profiles"]["speed"] = {**doc["profiles"]["speed"], **_speed([0.86, 0.87, 0.88, 0.87, 0.89])}
    assert "1.15x slower (0.87x; p10-p90" in render_markdown(doc) and "1.15x slower" in render_html(doc)
    doc["profiles"]["speed"] = {**doc["profiles"]["speed"], **_speed([0.85, 0.87, 1.02, 1.10, 1.12])}
    for text in (render_markdown(doc), render_html(doc)):
        assert "no measurable difference (within ±" in text and "x faster" not in text
    # A document without the interleaved timing (an older gcomp) claims no speed-up at all.
    del doc["profiles"]["speed"]
    assert "not a speed-up measurement" in render_markdown(doc)
    assert "no speed-up claimed" in render_html(doc) and "×" not in render_html(doc).split("Summary")[1][:400]


# --------------------------------------------------------------------------- demo model
def test_demo_model_is_generated_deterministically_and_takes_256_tokens(tmp_path):
    from models import make_demo

    paths = [make_demo.write_demo(tmp_path / f"d{i}.onnx") for i in range(2)]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].stat().st_size < make_demo.MAX_BYTES
    model = ir.load(paths[0])
    assert [d for d in model.graph.inputs[0].shape] == [1, 256]
    assert make_demo.DEMO_CONFIG["layers"] > 2  # larger than models/default.onnx
