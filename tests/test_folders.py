"""`gcomp optimize` with folders, in a real subprocess: `-o` naming a folder (trailing
separator or an existing one), `--report FORMAT` beside the output, and a folder of models
(an optimum-style export built here) optimized model by model into an output folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper

from gcomp.report import schema
from tests.conftest import assert_same_outputs, make_model, tensor, vinfo
from tests.test_cli import assert_one_line_error, gcomp

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
sys.path.insert(0, str(REPO))

BREAK_RELU = '''
import onnx_ir as ir
import gcomp


@gcomp.register_pass("break-relu")
class BreakRelu(ir.passes.InPlacePass):
    """Turn every Relu into Neg: a wrong pass, for verification to catch."""

    def __init__(self):
        super().__init__()

    def call(self, model):
        nodes = [n for n in model.graph if n.op_type == "Relu"]
        for node in nodes:
            node.op_type = "Neg"
        return ir.passes.PassResult(model, modified=bool(nodes))
'''


def _decoders(folder: Path) -> None:
    """Two decoders reading their weights from one shared external data file (as optimum's
    decoder and decoder-with-past can): x[batch, 16] -> MatMul W1 -> Relu -> MatMul W2 (-> Relu)."""
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Identity", ["r"], ["ri"]), helper.make_node("MatMul", ["ri", "W2"], ["y"])]
    proto = make_model(nodes, [vinfo("x", shape=("batch", 16))], [vinfo("y", shape=("batch", 16))],
                       [tensor("W1", w1), tensor("W2", w2)])
    onnx.save(proto, folder / "decoder_model.onnx", save_as_external_data=True, location="shared.onnx_data",
              size_threshold=0)
    with_past = onnx.load(folder / "decoder_model.onnx", load_external_data=False)  # same data, same offsets
    with_past.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    with_past.graph.output[0].name = "z"
    onnx.save(with_past, folder / "decoder_with_past_model.onnx")


def make_export(folder: Path) -> Path:
    """An optimum-style export: encoder, two decoders sharing external data, config,
    tokenizer, a nested vocabulary, and a hidden cache folder that is not part of it."""
    from gcomp import io
    from models import build

    folder.mkdir(parents=True)
    io.save(build("transformer", layers=1), folder / "encoder_model.onnx")
    _decoders(folder)
    (folder / "config.json").write_text('{"model_type": "test"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "extra").mkdir()
    (folder / "extra" / "vocab.txt").write_text("a\nb\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")
    return folder


MODELS = ["decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx"]


def _feeds(name: str) -> dict:
    if name == "encoder_model.onnx":
        return {"input_ids": np.random.default_rng(2).integers(0, 100, size=(2, 8)).astype(np.int64)}
    return {"x": np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)}


def test_a_folder_of_models_is_optimized_model_by_model(tmp_path):
    src = make_export(tmp_path / "export")
    out = tmp_path / "out"
    proc = gcomp("optimize", f"{src}{os.sep}", "-o", f"{out}{os.sep}", "--report", "json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted([
        "config.json", "tokenizer.json", "extra/vocab.txt", *MODELS,
        "decoder_model.onnx.data", "decoder_with_past_model.onnx.data",  # each writes its own weights
        *(m.replace(".onnx", ".report.json") for m in MODELS),
    ])
    assert (out / "config.json").read_text() == (src / "config.json").read_text()
    for name in MODELS:
        onnx.checker.check_model(str(out / name), full_check=True)
        assert_same_outputs(src / name, out / name, _feeds(name), rtol=1e-5, atol=1e-5)
        doc = json.loads((out / name.replace(".onnx", ".report.json")).read_text())
        jsonschema.validate(doc, schema())
        assert doc["verification"]["status"] == "passed" and doc["output"]["path"] == str(out / name)
    encoder = onnx.load(out / "encoder_model.onnx", load_external_data=False)
    assert len(encoder.graph.node) < len(onnx.load(src / "encoder_model.onnx").graph.node)
    table = proc.stdout
    for name in MODELS:
        row = next(line for line in table.splitlines() if name[:16] in line)
        assert "passed" in row and "→" in row, row
    assert "3 other file(s) copied" in table
    assert "wrote 3 model(s) and copied 3 other file(s)" in proc.stderr


def test_one_failing_model_is_named_and_the_others_are_written(tmp_path):
    src = make_export(tmp_path / "export")
    (src / "broken.onnx").write_bytes((src / "encoder_model.onnx").read_bytes()[:4000])
    plugin = tmp_path / "plug.py"
    plugin.write_text(BREAK_RELU)
    out = tmp_path / "out"
    proc = gcomp("optimize", src, "-o", f"{out}/", "--plugin", plugin, "--passes", "O1,break-relu")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gcomp: error: ")]
    assert errors[0].startswith("gcomp: error: broken.onnx: not a valid ONNX protobuf"), errors
    assert errors[1].startswith("gcomp: error: decoder_model.onnx: verification FAILED"), errors
    assert "first bad pass: break-relu" in errors[1]
    assert errors[2].startswith("gcomp: error: decoder_with_past_model.onnx: verification FAILED"), errors
    assert errors[3] == ("gcomp: error: 3 of 4 model(s) failed (broken.onnx, decoder_model.onnx, "
                         f"decoder_with_past_model.onnx), not written; the others are in {out}")
    assert "Traceback" not in proc.stderr
    # the encoder has no Relu: written; the failed models left nothing behind
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "encoder_model.onnx", "extra", "tokenizer.json"]
    assert_same_outputs(src / "encoder_model.onnx", out / "encoder_model.onnx", _feeds("encoder_model.onnx"),
                        rtol=1e-5, atol=1e-5)
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if ".onnx" in line}
    assert "FAILED" in rows["decoder_model.onnx"] and "not written" in rows["decoder_model.onnx"]
    assert "failed" in rows["broken.onnx"] and "passed" in rows["encoder_model.onnx"]


def test_folder_json_lists_every_model(tmp_path):
    src = make_export(tmp_path / "export")
    proc = gcomp("optimize", src, "-o", tmp_path / "out", "--json", "--input-shape", "input_ids=1,8")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "optimize-folder"
    assert [m["model"] for m in doc["models"]] == MODELS
    assert all(m["status"] == "written" and m["report"]["verification"]["status"] == "passed" for m in doc["models"])
    assert sorted(doc["copied"]) == ["config.json", "extra/vocab.txt", "tokenizer.json"]
    # --input-shape went only to the model that has that input
    encoder = next(m for m in doc["models"] if m["model"] == "encoder_model.onnx")
    assert encoder["report"]["verification"]["inputs"]["input_ids"]["shape"] == [1, 8]


@pytest.mark.parametrize("case, code, words", [
    ("file output", 2, "-o must be a folder: end it with '/'"),
    ("existing file", 2, "-o must be a folder (this is a file)"),
    ("same folder", 1, "is the input folder; refusing to write over its models"),
    ("report path", 2, "with a folder of models give a format (json, md or html)"),
    ("inputs", 2, "holds one model's inputs"),
    ("unknown shape", 2, "--input-shape nope: no model of the folder has this input"),
    ("no models", 1, "no .onnx model in this folder"),
])
def test_folder_input_refusals_are_one_line(tmp_path, case, code, words):
    src = make_export(tmp_path / "export")
    before = sorted(p.name for p in src.iterdir())
    out = tmp_path / "out"
    args = {"file output": ["-o", tmp_path / "x.onnx"], "existing file": ["-o", src / "config.json"],
            "same folder": ["-o", src], "report path": ["-o", out, "--report", tmp_path / "r.html"],
            "inputs": ["-o", out, "--inputs", tmp_path / "x.npz"],
            "unknown shape": ["-o", out, "--input-shape", "nope=1,2"]}.get(case)
    model = src / "extra" if case == "no models" else src
    proc = gcomp("optimize", model, *(args or ["-o", out]))
    assert_one_line_error(proc, code, words)
    assert not out.exists() and not (tmp_path / "x.onnx").exists()
    assert sorted(p.name for p in src.iterdir()) == before


def test_output_folder_keeps_the_model_name(tmp_path):
    made = tmp_path / "new" / "deeper"
    proc = gcomp("optimize", DEFAULT, "-o", f"{made}/", "--report", "md")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in made.iterdir()) == ["default.onnx", "default.report.md"]
    assert f"wrote {made / 'default.onnx'} and {made / 'default.report.md'}" in proc.stderr
    existing = tmp_path / "existing"
    existing.mkdir()
    proc = gcomp("optimize", DEFAULT, "-o", existing, "--report", "html", "--no-profile")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in existing.iterdir()) == ["default.onnx", "default.report.html"]
    # a plain file name still means that file, and the report format beside it
    proc = gcomp("optimize", DEFAULT, "-o", tmp_path / "m.opt.onnx", "--report", ".json")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.opt.report.json").is_file()


def test_output_folder_never_means_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(DEFAULT.read_bytes())
    proc = gcomp("optimize", model, "-o", f"{tmp_path}/")
    assert_one_line_error(proc, 1, "refusing to write over the input model")
    proc = gcomp("optimize", "m.onnx", "-o", ".", cwd=tmp_path)
    assert_one_line_error(proc, 1, "refusing to write over the input model")
    assert model.read_bytes() == DEFAULT.read_bytes()


def test_a_created_output_folder_is_removed_when_nothing_is_written(tmp_path):
    plugin = tmp_path / "plug.py"
    plugin.write_text(BREAK_RELU)
    from gcomp import io
    from models import build

    io.save(build("cnn"), tmp_path / "cnn.onnx")
    proc = gcomp("optimize", tmp_path / "cnn.onnx", "-o", f"{tmp_path}/a/b/", "--plugin", plugin,
                 "--passes", "O1,break-relu")
    assert proc.returncode == 1
    assert "verification FAILED" in proc.stderr
    assert not (tmp_path / "a").exists()


def test_a_failed_folder_model_writes_no_partial_output(tmp_path):
    """The shared external data of two decoders is read by both and copied by neither."""
    src = tmp_path / "export"
    src.mkdir()
    _decoders(src)
    (src / "shared.onnx_data").write_bytes((src / "shared.onnx_data").read_bytes()[:100])  # too short now
    proc = gcomp("optimize", src, "-o", tmp_path / "out")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gcomp: error: ")]
    assert len(lines) == 3 and all("external data file 'shared.onnx_data' is too short" in x for x in lines[:2])
    assert list((tmp_path / "out").iterdir()) == []
