"""fp16/bf16 checks see a lost signal: cosine, rel-l2, zeroed and flushed outputs.

The element-wise check is absolute below magnitude 1 (``atol`` times a scale of at least
1), so an output of 1e-9 that fp16 flushes to zeros is within it. These tests build such
models in code and show that verification fails them naming the output and the measure
(``gcomp optimize --precision fp16``: exit 1, nothing written), that ``--precision auto``
keeps the region responsible in fp32 and verifies, that ``--metric``/``--tolerance`` move
the bounds of ``--precision``, and how the measures treat outputs without a direction
(all zeros, constant, a single element) and non-float outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_model, ort_run, tensor, vinfo
from gcomp.passes.precision.accuracy import BOUNDS, compare
from onnx import helper

import gcomp
from gcomp.errors import GcompError
from gcomp.report.html import render_html
from gcomp.report.markdown import render_markdown
from gcomp.verify import verify
from models import build


def tiny_output_model() -> onnx.ModelProto:
    """x -> MatMul -> Mul(1e-3) -> MatMul -> y: y is about 1e-9, below fp16's smallest
    subnormal (6e-8), while the first MatMul's output (about 5e-3) is an ordinary fp16."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 32)) * 1e-3).astype(np.float32)
    w2 = (rng.standard_normal((32, 8)) * 1e-4).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
        helper.make_node("Mul", ["h", "scale"], ["s"], name="shrink"),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="head"),
    ]
    return make_model(nodes, [vinfo("x", shape=("batch", 16))], [vinfo("y", shape=("batch", 8))],
                      [tensor("w1", w1), tensor("w2", w2), tensor("scale", np.float32(1e-3))])


def faint_output_model() -> onnx.ModelProto:
    """One MatMul whose output (about 5e-6) is an fp16 subnormal: a few bits per element,
    so fp16 keeps the direction (cosine 0.9998) but not the size (rel-l2 about 0.018)."""
    w = (np.random.default_rng(1).standard_normal((64, 64)) * 1e-6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    return make_model(nodes, [vinfo("x", shape=("batch", 64))], [vinfo("y", shape=("batch", 64))], [tensor("w", w)])


def gcomp_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def node_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Node name -> the element type of its first output."""
    return {n.name: n.outputs[0].dtype for n in model.graph if n.name}


# ------------------------------------------------------------------------------ the issue


def test_fp16_zeroing_an_output_fails_naming_the_output_and_the_measure(tmp_path):
    """The fp16 conversion flushes y (about 1e-9) to zeros; the element-wise check alone
    passes that (|0 - 1e-9| <= atol); the signal check fails it: exit 1, one error line
    naming the output and the measure, nothing written."""
    src, out = tmp_path / "tiny.onnx", tmp_path / "tiny16.onnx"
    onnx.save(tiny_output_model(), src)
    proc = gcomp_cli("optimize", src, "-o", out, "--precision", "fp16", "-q")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gcomp: error: verification FAILED: output 'y': "), lines
    assert "all 8 element(s) are zero in fp16 where fp32 is not (8 flushed to zero)" in lines[0]
    assert "beyond rtol" not in lines[0]  # the element-wise check passed: only the signal check caught it
    assert "first bad pass: convert-precision" in lines[0] and lines[0].endswith("nothing written")
    assert not out.exists()


def test_auto_keeps_the_underflowing_region_fp32_and_verifies(tmp_path):
    """``auto`` finds the ops whose outputs underflow fp16 on the calibration inputs,
    tries them in fp16, sees y zeroed and keeps them fp32; the rest converts. The written
    model is verified, and its report holds the measures per output."""
    src, out, report = tmp_path / "tiny.onnx", tmp_path / "tiny.auto.onnx", tmp_path / "r.json"
    onnx.save(tiny_output_model(), src)
    proc = gcomp_cli("optimize", src, "-o", out, "--precision", "auto", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "search step 2: 1 region(s) more in fp16 (depth 0): error" in proc.stdout
    assert "rejected: output 'y': all 8 element(s) are zero in fp16 where fp32 is not" in proc.stdout
    assert "kept fp32: underflows the target on calibration: 2" in proc.stdout
    model = gcomp.io.load(out)
    dtypes = node_dtypes(model)
    assert dtypes["proj"] == ir.DataType.FLOAT16  # the region upstream still converts
    assert dtypes["shrink"] == dtypes["head"] == ir.DataType.FLOAT
    assert model.graph.initializers["w2"].dtype == ir.DataType.FLOAT
    x = np.random.default_rng(7).random((3, 16), dtype=np.float32)  # inputs the search never saw
    e, a = ort_run(src, {"x": x})["y"], ort_run(out, {"x": x})["y"]
    assert np.abs(e).max() < 1e-8 and np.linalg.norm(a - e) / np.linalg.norm(e) < 1e-2
    doc = json.loads(report.read_text())
    jsonschema.validate(doc, json.loads((Path(gcomp.__file__).parent / "schemas/report.schema.json").read_text()))
    (row,) = doc["verification"]["outputs"]
    assert doc["verification"]["status"] == "passed" and row["name"] == "y"
    assert row["cosine"] > 0.999 and row["rel_l2"] < 1e-2 and row["flushed"] == 0 and row["subnormal"] == 0
    md = render_markdown(doc)
    assert "| output | dtype | shape | max abs error | max rel error | cosine | rel-l2 | flushed / subnormal | ok |" in md
    assert f"| {row['rel_l2']:.3g} | 0 / 0 | yes |" in md
    assert ">flushed / subnormal</th>" in render_html(doc)


def test_fp16_loses_size_in_subnormals_and_metric_tolerance_move_the_bound():
    """An output of fp16 subnormals: the default rel-l2 bound (1e-2) fails it, naming the
    measure and the elements left subnormal; ``metric="rel-l2"`` with a looser
    ``tolerance`` passes it, a tighter cosine bound fails it on cosine; bf16 keeps it."""
    model = faint_output_model()
    shapes = {"x": (2, 64)}
    default = gcomp.optimize(model, "O1", precision="fp16", input_shapes=shapes).verification
    assert default.status == "failed"
    assert default.reason.startswith("output 'y': rel-l2 ")
    assert "> 0.01 (" in default.reason and "subnormal of 128)" in default.reason
    (row,) = default.outputs
    assert 0.999 < row.cosine < 1 and row.rel_l2 > 1e-2 and row.subnormal > 100
    assert row.max_abs_error < 1e-6  # far inside the element-wise tolerance
    looser = gcomp.optimize(model, "O1", precision="fp16", metric="rel-l2", tolerance=0.05, input_shapes=shapes)
    assert looser.verification.passed, looser.verification.reason
    assert looser.options["metric"] == "rel-l2"
    tighter = gcomp.optimize(model, "O1", precision="fp16", metric="cosine", tolerance=1e-5, input_shapes=shapes)
    assert tighter.verification.reason.startswith("output 'y': cosine 0.9998")
    assert "< 1 - 1e-05 (" in tighter.verification.reason
    assert gcomp.optimize(model, "O1", precision="bf16", input_shapes=shapes).verification.passed


def test_auto_refusal_names_the_output_and_the_measure():
    """``metric`` reaches the auto search through gcomp.optimize: a cosine bound no fp16
    conversion meets is refused, naming the output and the measure; the faint output
    above, whose op underflows fp16, is kept fp32 and meets even that bound."""
    with pytest.raises(GcompError, match=r"even the safe fp16 conversion misses output 'probs': cosine [0-9.]+ < "
                                         r"1 - 1e-12 \(cosine >= 1 - 1e-12, rel-l2 <= 0.01, max"):
        gcomp.optimize(build("mlp"), "O1", precision="auto", metric="cosine", tolerance=1e-12)
    kept = gcomp.optimize(faint_output_model(), "O1", precision="auto", metric="cosine", tolerance=1e-12,
                          input_shapes={"x": (2, 64)})
    assert kept.verification.passed and node_dtypes(kept.model)["proj"] == ir.DataType.FLOAT


def test_gcomp_verify_holds_an_fp16_file_to_the_default_bounds(tmp_path):
    """A converted file verified later (no record of the conversion's bounds): the
    precision's defaults apply, and the CLI table shows the measures."""
    src, out = tmp_path / "tiny.onnx", tmp_path / "tiny16.onnx"
    onnx.save(tiny_output_model(), src)
    result = gcomp.optimize(str(src), "O1", precision="fp16", verify=False)
    result.save(out)
    v = verify(src, out)
    assert v.status == "failed" and "all 8 element(s) are zero in fp16" in v.reason
    assert v.outputs[0].flushed == 8 and v.outputs[0].rel_l2 == pytest.approx(1.0)
    proc = gcomp_cli("verify", src, out)
    assert proc.returncode == 1
    assert "cosine" in proc.stdout and "rel-l2" in proc.stdout and "8 / 0" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16", "--tolerance", "0.1"], "--precision fp16 is checked element-wise at fixed tolerances"),
    (["--precision", "bf16", "--metric", "max-abs", "--tolerance", "0.1"], "--tolerance bounds --metric cosine or"),
    (["--precision", "fp16", "--metric", "top1", "--tolerance", "0.1"], "--metric top1 serves --quantize"),
    (["--precision", "auto", "--metric", "cosine"], "--metric with --precision names the measure --tolerance bounds"),
    (["--metric", "cosine"], "--metric needs --quantize or --precision"),
], ids=["fp16-tolerance-alone", "bf16-max-abs", "top1", "metric-alone", "neither"])
def test_metric_and_tolerance_misuse_with_precision(tmp_path, capsys, args, message):
    """One line, exit 2, nothing written (the CLI in-process: the subprocess test above
    shows the exit path is the same)."""
    from gcomp.cli import main

    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_output_model(), src)
    with pytest.raises(SystemExit) as stop:
        main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o.onnx").exists()


# ----------------------------------------------------------------------------- the measures


def test_outputs_without_a_direction_are_not_judged_by_cosine():
    """All zeros in fp32: no cosine, no rel-l2 (the element-wise check judges them);
    constant or single-element: no cosine, rel-l2 still; integer and sequence outputs:
    not measured."""
    e = {"zeros": np.zeros(6, np.float32), "const": np.full(6, 2.0, np.float32),
         "scalar": np.float32(3.0), "ids": np.arange(4)}
    near = {"zeros": np.full(6, 1e-3, np.float32), "const": np.full(6, 2.002, np.float32),
            "scalar": np.float32(3.003), "ids": np.arange(4)}
    e["seq"] = near["seq"] = [np.ones(2, np.float32), np.ones(3, np.float32)]  # a ragged sequence output
    rows = {r.name: r for r in compare(e, near, "fp16")}
    assert set(rows) == {"zeros", "const", "scalar"}
    assert rows["zeros"].cosine is None and rows["zeros"].rel_l2 is None and not rows["zeros"].zeroed
    assert rows["const"].cosine is None and rows["const"].rel_l2 == pytest.approx(1e-3, rel=1e-3)
    assert rows["scalar"].cosine is None and rows["scalar"].rel_l2 == pytest.approx(1e-3, rel=1e-3)
    assert all(r.miss(BOUNDS["fp16"]) is None for r in rows.values())
    off = compare(e, {**near, "const": np.full(6, 2.5, np.float32)}, "fp16")
    assert [r.miss(BOUNDS["fp16"]) for r in off if r.name == "const"] == ["rel-l2 0.25 > 0.01"]


def test_flushed_and_subnormal_counts():
    """Counted where fp32 is non-zero: elements fp16 flushes to zero, and elements it holds
    as subnormals; fp32 values too small for fp16 are not fp16 subnormals."""
    e = np.array([1e-9, 1e-6, 1.0, 0.0, 2e-9], np.float32)
    fp16 = e.astype(np.float16).astype(np.float32)  # 1e-9 -> 0, 1e-6 -> a subnormal
    (row,) = compare({"y": e}, {"y": fp16}, "fp16")
    assert (row.flushed, row.subnormal, row.zeroed) == (2, 1, False)
    (kept,) = compare({"y": e}, {"y": e * np.float32(1 + 1e-6)}, "fp16")
    assert (kept.flushed, kept.subnormal) == (0, 0)
    (gone,) = compare({"y": e}, {"y": np.zeros_like(e)}, "fp16")
    assert gone.zeroed and gone.miss(BOUNDS["fp16"], "fp16") == \
        "all 5 element(s) are zero in fp16 where fp32 is not (4 flushed to zero)"


def test_bf16_floors_are_looser_than_fp16():
    """A direction error of cosine about 0.9988 and rel-l2 about 0.048: past fp16's floors
    (0.999, 0.01), within bf16's (0.99, 0.05)."""
    rng = np.random.default_rng(3)
    e = rng.standard_normal(4096).astype(np.float32)
    a = e + np.float32(0.048) * rng.standard_normal(4096).astype(np.float32)
    (row,) = compare({"y": e}, {"y": a})
    assert 0.998 < row.cosine < 0.999 and 0.04 < row.rel_l2 < 0.05
    assert row.miss(BOUNDS["fp16"]).startswith("cosine 0.998")
    assert row.miss(BOUNDS["bf16"]) is None
