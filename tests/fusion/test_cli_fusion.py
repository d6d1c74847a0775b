"""The fusion options of ``gcomp optimize``: -O2/-O3, --target, --target-opset, --explain-fusion."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from gcomp.cli import cli

MODEL = "models/default.onnx"


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _ops(path) -> set[str]:
    proto = onnx.load(str(path))
    return {(f"{n.domain}::" if n.domain else "") + n.op_type for n in proto.graph.node}


def test_o3_for_ort_emits_contrib_ops_and_tvm_target_does_not(tmp_path):
    ort_out, tvm_out = tmp_path / "ort.onnx", tmp_path / "tvm.onnx"
    r = _run("optimize", MODEL, "-o", str(ort_out), "-O", "3", "--target", "ort-cuda", "-q")
    assert r.exit_code == 0, r.output
    assert "com.microsoft::Attention" in _ops(ort_out)
    r = _run("optimize", MODEL, "-o", str(tvm_out), "-O", "3", "--target", "tvm-llvm", "-q")
    assert r.exit_code == 0, r.output
    ops = _ops(tvm_out)
    assert not any(op.startswith("com.microsoft") for op in ops) and "LayerNormalization" in ops, ops


def test_explain_fusion_lists_rules_with_reasons(tmp_path):
    r = _run("optimize", MODEL, "-o", str(tmp_path / "o.onnx"), "-O", "2", "--explain-fusion", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    fired, rules = {}, {}
    for p in doc["passes"]:
        for name, info in ((p.get("details") or {}).get("rules") or {}).items():
            fired[name] = fired.get(name, 0) + info["fired"]
            rules[name] = info
    assert fired["layer-norm"] == 5
    assert "opset is 17" in rules["gelu-erf"]["not_run"]  # the default model is opset 17
    r = _run("optimize", MODEL, "-o", str(tmp_path / "o.onnx"), "-O", "2", "--explain-fusion")
    assert "fusion rules" in r.output and "gelu-erf" in r.output


def test_target_opset_upgrades_then_gelu_fires(tmp_path):
    out = tmp_path / "o.onnx"
    r = _run("optimize", MODEL, "-o", str(out), "-O", "2", "--target-opset", "20", "-q")
    assert r.exit_code == 0, r.output
    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 20
    assert "Gelu" in _ops(out)


@pytest.mark.parametrize("args,message", [
    (["--target", "nope"], "unknown target 'nope'"),
    (["--target-opset", "13"], "older than the model's opset 17"),
])
def test_bad_fusion_options_are_one_line_errors(tmp_path, args, message):
    import subprocess
    import sys

    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "gcomp", "optimize", MODEL, "-o", str(out), "-O", "2", *args],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gcomp: error: ") and message in lines[0], r.stderr
    assert not out.exists()
