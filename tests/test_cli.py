"""The gcomp CLI end to end, in a real subprocess: outputs, reports, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper

from gcomp.report import schema
from tests.conftest import assert_same_outputs, make_model, vinfo

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"


def gcomp(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_one_line_error(proc, code=None, contains=""):
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gcomp: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    assert contains in lines[0], lines[0]


def test_optimize_default_model_end_to_end(tmp_path):
    out = tmp_path / "default.opt.onnx"
    report = tmp_path / "report.json"
    proc = gcomp("optimize", DEFAULT, "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "verification" in proc.stdout and "passed" in proc.stdout
    onnx.checker.check_model(str(out), full_check=True)
    doc = json.loads(report.read_text())
    jsonschema.validate(doc, schema())
    assert doc["verification"]["status"] == "passed"
    assert doc["after"]["nodes"] < doc["before"]["nodes"]
    assert doc["output"]["file_bytes"] == out.stat().st_size
    ids = np.random.default_rng(5).integers(0, 1000, size=(2, 16)).astype(np.int64)
    assert_same_outputs(DEFAULT, out, {"input_ids": ids}, rtol=1e-5, atol=1e-6)


def test_optimize_markdown_report_and_o0(tmp_path):
    out = tmp_path / "o0.onnx"
    proc = gcomp("optimize", DEFAULT, "-o", out, "-O", "0", "--report", tmp_path / "r.md")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "r.md").read_text()
    assert "pipeline `O0`" in text and "## Verification" in text and "**passed**" in text
    assert onnx.load(out).graph.node.__len__() == onnx.load(DEFAULT).graph.node.__len__()


def test_optimize_json_output_and_set_option(tmp_path):
    proc = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--json", "--set", "cse_size_limit=0")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, schema())
    assert doc["options"] == {"cse_size_limit": 0}


def test_passes_lists_registry():
    proc = gcomp("passes", "--json")
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert {"O0", "O1"} <= set(doc["pipelines"])
    assert "cse" in doc["passes"] and doc["passes"]["cse"]["options"][0]["name"] == "cse_size_limit"


def test_inspect(tmp_path):
    proc = gcomp("inspect", DEFAULT, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["inputs"][0]["name"] == "input_ids"
    assert info["nodes"] == len(onnx.load(DEFAULT).graph.node)
    assert info["opsets"][""] == 17
    human = gcomp("inspect", DEFAULT)
    assert "MatMul" in human.stdout and "parameters" in human.stdout


def test_verify_command(tmp_path, small_model):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(small_model, a)
    assert gcomp("optimize", a, "-o", b, "-q").returncode == 0
    ok = gcomp("verify", a, b)
    assert ok.returncode == 0 and "verified" in ok.stdout
    broken = onnx.load(b)
    for node in broken.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Sigmoid"
    onnx.save(broken, tmp_path / "c.onnx")
    bad = gcomp("verify", a, tmp_path / "c.onnx", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["status"] == "failed"


def test_profile_command(tmp_path):
    report = tmp_path / "p.json"
    proc = gcomp("profile", DEFAULT, "--iters", "5", "--warmup", "1", "--report", report)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(report.read_text())
    jsonschema.validate(doc, schema())
    assert doc["latency"]["iterations"] == 5 and doc["latency"]["mean_ms"] > 0
    names = {n.name for n in onnx.load(DEFAULT).graph.node}
    assert doc["ops"] and all(op["time_ms"] >= 0 for op in doc["ops"])
    # ORT fuses with optimizations on; rows still name nodes, and with them off they are graph nodes.
    plain = gcomp("profile", DEFAULT, "--iters", "3", "--optimization", "disable", "--json")
    rows = json.loads(plain.stdout)["ops"]
    assert {r["node"] for r in rows} <= names
    assert "MatMul" in {r["op_type"] for r in rows}


def test_unverified_model_is_written_but_strict_refuses(tmp_path):
    proto = make_model(
        [helper.make_node("Identity", ["x"], ["t"], name="i"),
         helper.make_node("Frobnicate", ["t"], ["y"], name="f", domain="com.example")],
        [vinfo("x")], [vinfo("y")], extra_opsets=[helper.make_opsetid("com.example", 1)],
    )
    path = tmp_path / "custom.onnx"
    onnx.save(proto, path)
    proc = gcomp("optimize", path, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "not verified" in proc.stderr and "Frobnicate" in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["status"] == "unverified"
    strict = gcomp("optimize", path, "-o", tmp_path / "s.onnx", "--strict")
    assert_one_line_error(strict, 1, "not verified")
    assert not (tmp_path / "s.onnx").exists()


def test_failed_verification_writes_nothing(tmp_path, small_model):
    plugin = tmp_path / "breaker.py"
    plugin.write_text(
        "import onnx_ir as ir\nimport gcomp\n\n"
        "@gcomp.register_pass('break-relu')\n"
        "class BreakRelu(ir.passes.InPlacePass):\n"
        "    \"\"\"Deliberately wrong.\"\"\"\n"
        "    def call(self, model):\n"
        "        for n in model.graph:\n"
        "            if n.op_type == 'Relu':\n"
        "                n.op_type = 'Sigmoid'\n"
        "        return ir.passes.PassResult(model, True)\n"
    )
    path = tmp_path / "m.onnx"
    onnx.save(small_model, path)
    out = tmp_path / "o.onnx"
    proc = gcomp("optimize", path, "-o", out, "--plugin", plugin, "--passes", "O1,break-relu", "--report", tmp_path / "r.json")
    assert proc.returncode == 1
    assert "verification FAILED" in proc.stderr and "first bad pass: break-relu" in proc.stderr
    assert "nothing written" in proc.stderr
    assert not out.exists() and not (tmp_path / "r.json").exists()


@pytest.fixture
def bad_files(tmp_path, small_model):
    good = tmp_path / "good.onnx"
    onnx.save(small_model, good)
    (tmp_path / "text.onnx").write_text("definitely not protobuf\n")
    data = small_model.SerializeToString()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "folder.onnx").mkdir()
    invalid = make_model([helper.make_node("Relu", ["ghost"], ["y"], name="r")], [vinfo("x")], [vinfo("y")])
    onnx.save(invalid, tmp_path / "invalid.onnx")
    w = np.ones((4, 4), np.float32)
    ext = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="m")], [vinfo("x")], [vinfo("y")],
                     [onnx.numpy_helper.from_array(w, "W")])
    onnx.save(ext, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    return tmp_path


@pytest.mark.parametrize(
    "args, code, contains",
    [
        (["optimize", "{d}/missing.onnx", "-o", "{d}/o.onnx"], 1, "no such file"),
        (["optimize", "{d}/folder.onnx", "-o", "{d}/o.onnx"], 2, "is a folder of models, so -o must be a folder"),
        (["optimize", "{d}/text.onnx", "-o", "{d}/o.onnx"], 1, "not a valid ONNX protobuf"),
        (["optimize", "{d}/trunc.onnx", "-o", "{d}/o.onnx"], 1, "text"),
        (["optimize", "{d}/invalid.onnx", "-o", "{d}/o.onnx"], 1, "fails the ONNX checker"),
        (["optimize", "{d}/ext.onnx", "-o", "{d}/o.onnx"], 1, "external data file 'ext.bin' is missing"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "-O", "9"], 2, "unknown pipeline or pass '9'"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "--passes", "O1,nope"], 2, "unknown pipeline or pass 'nope'"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "--set", "nope=1"], 2, "no pass in this pipeline"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "--set", "cse_size_limit=big"], 2, "expects int"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "--no-such-flag"], 2, "No such option"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/good.onnx"], 1, "refusing to write over the input"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/nowhere/o.onnx"], 1, "does not exist"),
        (["optimize", "{d}/good.onnx", "-o", "/proc/gcomp-test.onnx"], 1, "/proc"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "--report", "{d}/r.txt"], 2, "unsupported format"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "--inputs", "{d}/none.npz"], 2, "no such file"),
        (["optimize", "{d}/good.onnx", "-o", "{d}/o.onnx", "--input-shape", "q=1,2"], 2, "no input 'q'"),
        (["inspect", "{d}/text.onnx"], 1, "not a valid ONNX protobuf"),
        (["verify", "{d}/good.onnx", "{d}/missing.onnx"], 1, "no such file"),
    ],
    ids=[
        "missing", "directory", "not-onnx", "truncated", "checker", "missing-external-data", "bad-level",
        "unknown-pass", "unknown-option", "bad-option-value", "unknown-flag", "output-is-input", "no-out-dir",
        "unwritable-out-dir", "bad-report-format", "missing-inputs-file", "unknown-input-name", "inspect-not-onnx",
        "verify-missing",
    ],
)
def test_bad_input_one_line_no_output(bad_files, args, code, contains):
    # --device cuda without a GPU: tests/test_providers.py (the answer depends on the ORT build)
    d = bad_files
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()}
    proc = gcomp(*[a.format(d=d) for a in args])
    if contains == "text":  # a truncated protobuf may fail to parse or fail the checker
        assert_one_line_error(proc, code)
        assert any(k in proc.stderr for k in ("not a valid ONNX protobuf", "not an ONNX model", "checker"))
    else:
        assert_one_line_error(proc, code, contains)
    assert not (d / "o.onnx").exists()
    after = {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()}
    assert after == before  # nothing written, nothing overwritten


def test_debug_shows_traceback(bad_files):
    proc = gcomp("--debug", "optimize", bad_files / "text.onnx", "-o", bad_files / "o.onnx")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_is_fast_and_lists_commands():
    proc = gcomp("--help")
    assert proc.returncode == 0
    for cmd in ("optimize", "passes", "inspect", "verify", "profile"):
        assert cmd in proc.stdout
    # Heavy runtimes are not imported for --help / passes.
    check = subprocess.run(
        [sys.executable, "-c", "import sys, gcomp.cli, gcomp.pipeline; gcomp.pipeline.registry.passes(); "
         "print(sorted(m for m in ('onnxruntime', 'tvm', 'torch', 'mpi4py') if m in sys.modules))"],
        capture_output=True, text=True,
    )
    assert check.stdout.strip() == "[]", check.stdout + check.stderr


def test_optimize_says_what_lifting_the_fold_size_limit_would_cost(tmp_path):
    value = helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.5])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], value=value),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    shape = onnx.numpy_helper.from_array(np.array([256, 256], np.int64), "shape")
    src = tmp_path / "cos.onnx"
    onnx.save(make_model(nodes, [vinfo("x", shape=(3, 256))], [vinfo("y", shape=(3, 256))], [shape]), src)
    proc = gcomp("optimize", src, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("left unfolded"))
    assert "1 node(s) (size: 1)" in line and "256.0 KiB" in line and "--set max_fold_bytes=BYTES" in line
