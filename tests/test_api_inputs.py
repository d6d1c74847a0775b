"""gcomp.optimize's model kinds (path, bytes, ModelProto, onnx-ir Model), the model it
gives back (result.model, result.to_onnx()), caller's models left untouched, and every
wrong argument refused as a one-line GcompError (the CLI's line where both can say it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import gcomp
from gcomp import io
from gcomp.errors import GcompError, ModelLoadError, OptionError
from tests.conftest import assert_same_outputs, make_model, ort_run, tensor, vinfo

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
IDS = {"input_ids": np.random.default_rng(3).integers(0, 1000, size=(2, 8)).astype(np.int64)}


def _kinds():
    return {
        "str": lambda: str(DEFAULT),
        "Path": lambda: DEFAULT,
        "bytes": lambda: DEFAULT.read_bytes(),
        "ModelProto": lambda: onnx.load(DEFAULT),
        "ir.Model": lambda: gcomp.load(DEFAULT),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_every_model_kind_optimizes_to_the_same_verified_model(kind):
    result = gcomp.optimize(_kinds()[kind](), "O1")
    assert result.verification.passed, result.verification.summary()
    assert isinstance(result.model, ir.Model)
    reference = gcomp.optimize(DEFAULT, "O1", verify=False)
    assert result.after.nodes == reference.after.nodes < result.before.nodes
    proto = result.to_onnx()
    assert isinstance(proto, onnx.ModelProto)
    onnx.checker.check_model(proto, full_check=True)
    assert len(proto.graph.node) == result.after.nodes
    assert_same_outputs(DEFAULT, proto, IDS, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bytes", "ModelProto"])
def test_bytes_and_protos_are_checked_at_load_like_files(kind):
    result = gcomp.optimize(_kinds()[kind](), "O0", verify=False)
    assert "unchanged since the check at load" in (result.passes[0].note or "")


def test_a_callers_model_proto_is_not_modified(tmp_path):
    proto = onnx.load(DEFAULT)
    before = proto.SerializeToString()
    result = gcomp.optimize(proto, "O3")  # fusion rewrites most of the graph
    assert result.verification.passed and result.after.nodes < result.before.nodes
    result.save(tmp_path / "out.onnx", external_data=True)
    result.to_onnx()
    assert proto.SerializeToString() == before


def test_a_callers_ir_model_is_not_modified_and_keeps_its_source(tmp_path):
    model = gcomp.load(DEFAULT)
    before = ir.to_proto(model).SerializeToString()
    result = gcomp.optimize(model, "O3")
    assert result.verification.passed and result.after.nodes < result.before.nodes
    assert result.model is not model
    assert ir.to_proto(model).SerializeToString() == before
    assert len(model.graph) == result.before.nodes
    with pytest.raises(GcompError, match="refusing to write over the input"):
        result.save(DEFAULT)  # the copy still knows where the caller's model came from


def test_bisect_names_the_bad_pass_on_a_callers_model_without_touching_it(small_model):
    class BreakRelu(ir.passes.InPlacePass):
        def call(self, model):
            for node in model.graph:
                if node.op_type == "Relu":
                    node.op_type = "Neg"
            return ir.passes.PassResult(model, modified=True)

    model = ir.from_proto(small_model)
    result = gcomp.optimize(model, ["cse", BreakRelu()])
    assert result.verification.status == "failed"
    assert result.verification.first_bad_pass == "BreakRelu (step 2)"
    assert [n.op_type for n in model.graph].count("Relu") == 2


def test_to_onnx_reads_external_data_in(tmp_path):
    model = gcomp.load(DEFAULT)
    io.save(model, tmp_path / "ext.onnx", external_data=True)
    result = gcomp.optimize(tmp_path / "ext.onnx", "O1", verify=False)
    assert any(True for _ in io.external_tensors(result.model))
    proto = result.to_onnx()
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    assert_same_outputs(DEFAULT, proto, IDS, rtol=1e-5, atol=1e-6)


def test_a_wrong_model_type_names_the_accepted_kinds():
    with pytest.raises(ModelLoadError) as info:
        gcomp.optimize(42)
    message = str(info.value)
    assert "\n" not in message
    for kind in ("path", "bytes", "onnx.ModelProto", "onnx_ir.Model", "not int"):
        assert kind in message, message


def _cli_error(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gcomp: error: "), proc.stderr
    return lines[0].removeprefix("gcomp: error: ")


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_the_api_raises_the_clis_line(tmp_path, case):
    path = tmp_path / "m.onnx"
    if case == "corrupt":
        path.write_bytes(DEFAULT.read_bytes()[:5000])
    with pytest.raises(ModelLoadError) as info:
        gcomp.optimize(path)
    assert str(info.value) == _cli_error("optimize", path, "-o", tmp_path / "out.onnx")


def test_bad_bytes_and_protos_are_one_line_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^the model bytes: not a valid ONNX protobuf"):
        gcomp.optimize(b"\x08\x07not onnx at all")
    with pytest.raises(ModelLoadError, match=r"^the model bytes: empty"):
        gcomp.optimize(b"")
    invalid = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x")], [vinfo("y")])
    invalid.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ModelLoadError, match=r"^the ModelProto: fails the ONNX checker"):
        gcomp.optimize(invalid)
    # weights left in a file the proto cannot locate
    w = np.ones((64, 64), np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vinfo("x", shape=(1, 64))],
                       [vinfo("y", shape=(1, 64))], [tensor("W", w)])
    onnx.save(proto, tmp_path / "w.onnx", save_as_external_data=True, location="w.data", size_threshold=0)
    lazy = onnx.load(tmp_path / "w.onnx", load_external_data=False)
    with pytest.raises(ModelLoadError, match=r"tensor 'W' reads external data 'w.data'.*pass the model's path"):
        gcomp.optimize(lazy)
    loaded = gcomp.optimize(onnx.load(tmp_path / "w.onnx"), "O1")  # with its data: fine
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(ort_run(loaded.to_onnx(), {"x": x})["y"], x @ w)


@pytest.mark.parametrize("kwargs, words", [
    ({"pipeline": 5}, "pipeline must be"),
    ({"inputs": 5}, "inputs must be a path"),
    ({"input_shapes": [1, 16]}, "input_shapes must be a dict"),
    ({"input_shapes": {"input_ids": "1,16"}}, "input_shapes['input_ids'] must be a sequence"),
    ({"input_shapes": {"input_ids": (1, -2)}}, "non-negative ints"),
    ({"seed": "x"}, "seed must be an int"),
    ({"tolerances": 0.1}, "tolerances must be a dict"),
])
def test_wrong_argument_kinds_are_one_line_option_errors(kwargs, words):
    with pytest.raises(OptionError) as info:
        gcomp.optimize(DEFAULT, **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("gcomp.optimize: ")
