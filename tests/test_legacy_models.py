"""Models and input files ONNX Runtime accepts that gcomp used to refuse, end to end.

- ``--inputs`` test_data_set folders holding SequenceProto / OptionalProto files;
- IR version 3 models whose initializers are not listed among the graph inputs;
- scikit-learn style classifiers ending in ZipMap (an output that is a sequence of maps).

Each case runs the real command (or the real API) and proves the output numerically
against the original on ONNX Runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ort_run


def gcomp(*args):
    return subprocess.run(
        [sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _write_set(folder: Path, messages) -> Path:
    folder.mkdir(parents=True)
    for i, message in enumerate(messages):
        (folder / f"input_{i}.pb").write_bytes(message.SerializeToString())
    return folder


def _sequence_model() -> onnx.ModelProto:
    """seq (a sequence of [n, 4] tensors), pos -> ConcatFromSequence * 2 and -SequenceAt(pos);
    an Identity for O1 to remove."""
    nodes = [
        helper.make_node("ConcatFromSequence", ["seq"], ["cat"], axis=0),
        helper.make_node("Identity", ["cat"], ["cat_i"]),
        helper.make_node("Add", ["cat_i", "cat_i"], ["y"]),
        helper.make_node("SequenceAt", ["seq", "pos"], ["item"]),
        helper.make_node("Neg", ["item"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "seq",
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["total", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.slow  # profiles before and after: ~9 s
def test_sequence_input_from_test_data_set(tmp_path):
    src, out, report = tmp_path / "seq.onnx", tmp_path / "seq.opt.onnx", tmp_path / "r.json"
    onnx.save(_sequence_model(), src)
    rng = np.random.default_rng(3)
    items = [rng.random((2, 4), dtype=np.float32), rng.random((3, 4), dtype=np.float32)]  # ragged: no one array
    folder = _write_set(tmp_path / "test_data_set_0", [
        numpy_helper.from_list(items, name="seq"), numpy_helper.from_array(np.array(1, np.int64), "pos"),
    ])
    # --profile: the model profiled before and after on these inputs too
    proc = gcomp("optimize", src, "-o", out, "--inputs", folder, "--report", report, "--profile", "--profile-iters", 2)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(report.read_text())
    assert doc["verification"]["status"] == "passed", doc["verification"]
    assert doc["verification"]["inputs"]["seq"] == {"shape": [2], "dtype": "sequence(float32)"}
    assert {row["op_type"] for row in doc["profiles"]["after"]["ops"]} >= {"ConcatFromSequence", "SequenceAt"}
    assert doc["before"]["op_types"]["Identity"] == 1 and "Identity" not in doc["after"]["op_types"]
    onnx.checker.check_model(str(out), full_check=True)
    feeds = {"seq": items, "pos": np.array(1, np.int64)}
    before, after = ort_run(src, feeds), ort_run(out, feeds)
    assert before["y"].shape == (5, 4)
    for name in ("y", "z"):
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6, err_msg=name)


def _optional_model() -> onnx.ModelProto:
    """o: optional(float[2]) -> y = -o if o holds a value else [0, 0]; has = OptionalHasElement(o)."""
    then = helper.make_graph(
        [helper.make_node("OptionalGetElement", ["o"], ["got"]), helper.make_node("Neg", ["got"], ["neg"])],
        "then", [], [helper.make_tensor_value_info("neg", TensorProto.FLOAT, [2])],
    )
    zeros = numpy_helper.from_array(np.zeros(2, np.float32), "zeros_value")
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["zeros"], value=zeros)],
        "else", [], [helper.make_tensor_value_info("zeros", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("OptionalHasElement", ["o"], ["has"]),
        helper.make_node("Identity", ["has"], ["has_i"]),
        helper.make_node("If", ["has_i"], ["picked"], then_branch=then, else_branch=other),
        helper.make_node("Identity", ["picked"], ["y"]),
    ]
    optional = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    graph = helper.make_graph(
        nodes, "opt", [helper.make_value_info("o", optional)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("has", TensorProto.BOOL, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("value", [np.array([1.5, -2.5], np.float32), None], ids=["present", "empty"])
def test_optional_input_from_test_data_set(tmp_path, value):
    src, out, report = tmp_path / "opt.onnx", tmp_path / "opt.opt.onnx", tmp_path / "r.json"
    onnx.save(_optional_model(), src)
    message = numpy_helper.from_optional(value, name="o", dtype=onnx.OptionalProto.TENSOR)
    folder = _write_set(tmp_path / "test_data_set_0", [message])
    proc = gcomp("optimize", src, "-o", out, "--inputs", folder, "--report", report)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(report.read_text())
    assert doc["verification"]["status"] == "passed", doc["verification"]
    assert doc["after"]["nodes"] < doc["before"]["nodes"]
    onnx.checker.check_model(str(out), full_check=True)
    before, after = ort_run(src, {"o": value}), ort_run(out, {"o": value})
    assert bool(before["has"]) is (value is not None)
    np.testing.assert_array_equal(before["y"], -value if value is not None else np.zeros(2, np.float32))
    for name in ("y", "has"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_test_data_set_file_of_the_wrong_kind_is_one_line(tmp_path):
    """A TensorProto where the model takes a sequence: protobuf would parse its bytes as an
    empty SequenceProto; gcomp says which message the input needs instead."""
    src = tmp_path / "seq.onnx"
    onnx.save(_sequence_model(), src)
    folder = _write_set(tmp_path / "test_data_set_0", [
        numpy_helper.from_array(np.ones((2, 4), np.float32), "seq"), numpy_helper.from_array(np.array(0), "pos"),
    ])
    proc = gcomp("optimize", src, "-o", tmp_path / "out.onnx", "--inputs", folder)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("gcomp: error: --inputs ") and "input_0.pb: not a SequenceProto" in lines[0], lines[0]
    assert "the model's input 'seq' is a Sequence" in lines[0], lines[0]
    assert not (tmp_path / "out.onnx").exists()
