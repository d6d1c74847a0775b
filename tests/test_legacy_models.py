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


def _ir3_model() -> onnx.ModelProto:
    """IR version 3, opset 8: y = Relu(Identity(x @ W + B)) * S. W and B are initializers
    missing from the graph inputs (the checker refuses that for IR 3, ONNX Runtime runs it
    with them as constants); S is listed, so it is an input with a default value."""
    w = numpy_helper.from_array((np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 7, "W")
    b = numpy_helper.from_array(np.array([0.5, -1.0, 0.25], np.float32), "B")
    s = numpy_helper.from_array(np.array([1.5, 1.0, -2.0], np.float32), "S")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Add", ["m", "B"], ["a"]),
        helper.make_node("Identity", ["a"], ["a_i"]),
        helper.make_node("Relu", ["a_i"], ["r"]),
        helper.make_node("Mul", ["r", "S"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "legacy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("S", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w, b, s],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    return model


def test_ir3_model_with_unlisted_initializers(tmp_path):
    src, out = tmp_path / "legacy.onnx", tmp_path / "legacy.opt.onnx"
    onnx.save(_ir3_model(), src)
    with pytest.raises(onnx.checker.ValidationError, match="in initializer but not in graph input"):
        onnx.checker.check_model(str(src))  # what gcomp used to refuse
    proc = gcomp("optimize", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert ("note: IR version 3 requires initializers to be graph inputs, and 2 are not ('W', 'B'): read and "
            "written as IR version 4") in " ".join(proc.stderr.split()), proc.stderr
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out))
    assert written.ir_version == 4
    assert [i.name for i in written.graph.input] == ["x", "S"]  # S stays an input with a default
    assert "Identity" not in {n.op_type for n in written.graph.node}
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})["y"], ort_run(src, {"x": x})["y"], rtol=1e-6, atol=1e-6)
    # S is still an input with a default, as IR 3 says (ONNX Runtime itself takes every
    # initializer of an IR-3 model as a constant and refuses a value for S).
    weights = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    s = np.array([3.0, -1.0, 0.5], np.float32)
    expected = np.maximum(x @ weights["W"] + weights["B"], 0) * s
    np.testing.assert_allclose(ort_run(out, {"x": x, "S": s})["y"], expected, rtol=1e-5, atol=1e-6)


def test_ir3_model_already_valid_is_not_changed():
    from gcomp import io

    model = _ir3_model()
    model.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                              for n, shape in (("W", [4, 3]), ("B", [3]))])
    loaded = io.from_bytes(model.SerializeToString())
    assert loaded.ir_version == 3 and io.load_notes(loaded) == []


def _zipmap_classifier(labels=(0, 1, 2), intercepts=(0.1, -0.2, 0.3)) -> onnx.ModelProto:
    """As skl2onnx converts a LogisticRegression with its default ZipMap: LinearClassifier,
    Normalizer (L1), the label (Cast to int64, or as is for string labels), ZipMap of the
    probabilities into a sequence of maps; plus Identity nodes for O1 to remove (one
    between the Normalizer and the ZipMap)."""
    strings = isinstance(labels[0], str)
    key, kind = (TensorProto.STRING, "strings") if strings else (TensorProto.INT64, "ints")
    coefficients = ((np.arange(12, dtype=np.float32).reshape(3, 4) - 6) / 5).ravel().tolist()
    nodes = [
        helper.make_node("Identity", ["X"], ["X_i"]),
        helper.make_node("LinearClassifier", ["X_i"], ["label", "scores"], domain="ai.onnx.ml",
                         coefficients=coefficients, intercepts=list(intercepts), post_transform="LOGISTIC",
                         multi_class=1, **{f"classlabels_{kind}": list(labels)}),
        helper.make_node("Normalizer", ["scores"], ["probabilities"], domain="ai.onnx.ml", norm="L1"),
        helper.make_node("Identity", ["probabilities"], ["probabilities_i"]),
        helper.make_node("Identity", ["label"], ["output_label"]) if strings
        else helper.make_node("Cast", ["label"], ["output_label"], to=TensorProto.INT64),
        helper.make_node("ZipMap", ["probabilities_i"], ["output_probability"], domain="ai.onnx.ml",
                         **{"classlabels_strings" if strings else "classlabels_int64s": list(labels)}),
    ]
    maps = helper.make_sequence_type_proto(
        helper.make_map_type_proto(key, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("output_label", key, [None]), helper.make_value_info("output_probability", maps)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    return model


def _assert_same_maps(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert set(a) == set(e)
        np.testing.assert_allclose([a[k] for k in e], [e[k] for k in e], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("labels", [(0, 1, 2), ("cat", "dog", "eel")], ids=["int-labels", "string-labels"])
def test_zipmap_classifier_is_optimized_and_verified(tmp_path, labels):
    src, out, report = tmp_path / "clf.onnx", tmp_path / "clf.opt.onnx", tmp_path / "r.json"
    original = _zipmap_classifier(labels)
    onnx.save(original, src)
    proc = gcomp("optimize", src, "-o", out, "--report", report, "--input-shape", "X=5,4")
    assert proc.returncode == 0, proc.stderr
    assert "note: output(s) 'output_probability' hold maps" in " ".join(proc.stderr.split()), proc.stderr
    doc = json.loads(report.read_text())
    checks = {o["name"]: o for o in doc["verification"]["outputs"]}
    assert doc["verification"]["status"] == "passed", doc["verification"]
    assert checks["output_probability"] == {**checks["output_probability"], "dtype": "sequence", "shape": [5], "ok": True}
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out))
    assert [o.SerializeToString() for o in written.graph.output] == [o.SerializeToString() for o in original.graph.output]
    ops = [n.op_type for n in written.graph.node]
    assert "Identity" not in ops and ops.count("ZipMap") == 1
    x = np.random.default_rng(2).standard_normal((7, 4)).astype(np.float32)
    before, after = ort_run(src, {"X": x}), ort_run(out, {"X": x})
    np.testing.assert_array_equal(after["output_label"], before["output_label"])
    assert isinstance(before["output_probability"][0], dict)
    _assert_same_maps(after["output_probability"], before["output_probability"])


@pytest.mark.parametrize("change, detail", [
    ({"labels": (0, 1, 5)}, "map keys or kind differ"),
    ({"intercepts": (0.1, -0.2, 0.31)}, "element(s) beyond rtol=0.0001"),
], ids=["keys", "values"])
def test_verification_compares_the_map_output(tmp_path, change, detail):
    """A candidate whose maps differ (other keys, or values off by about 1e-3) fails on that
    output; the same model passes."""
    from gcomp.verify import verify

    src, other = tmp_path / "clf.onnx", tmp_path / "other.onnx"
    onnx.save(_zipmap_classifier(), src)
    onnx.save(_zipmap_classifier(**change), other)
    assert verify(src, src, input_shapes={"X": (6, 4)}).passed
    result = verify(src, other, input_shapes={"X": (6, 4)})
    assert result.status == "failed"
    bad = {c.name: c.detail for c in result.outputs if not c.ok}
    assert detail in bad["output_probability"], bad


def test_map_typed_input_is_one_line(tmp_path):
    """A map input (DictVectorizer's) is refused in one line naming the input."""
    src = tmp_path / "dv.onnx"
    map_type = helper.make_map_type_proto(TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    graph = helper.make_graph(
        [helper.make_node("DictVectorizer", ["d"], ["v"], domain="ai.onnx.ml", string_vocabulary=["a", "b"])],
        "dv", [helper.make_value_info("d", map_type)], [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.save(model, src)
    proc = gcomp("optimize", src, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == (f"gcomp: error: {src}: input 'd' is a map, which gcomp's IR (onnx-ir) cannot hold; "
                        "gcomp reads maps only as outputs made at the end of the graph (ZipMap)"), lines[0]


def test_inspect_says_what_loading_changed(tmp_path):
    src = tmp_path / "clf.onnx"
    onnx.save(_zipmap_classifier(), src)
    proc = gcomp("inspect", src, "--json")
    assert proc.returncode == 0, proc.stderr
    notes = json.loads(proc.stdout)["notes"]
    assert len(notes) == 1 and notes[0].startswith("output(s) 'output_probability' hold maps"), notes


def _mlp_classifier() -> onnx.ModelProto:
    """As skl2onnx converts an MLPClassifier with ZipMap: MatMul/Add/Relu layers, Softmax,
    ArgMax for the label, ZipMap of the probabilities."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32) / 4, "W1"),
        numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) / 4, "B1"),
        numpy_helper.from_array(rng.standard_normal((64, 3)).astype(np.float32) / 8, "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"]), helper.make_node("Add", ["h", "B1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
        helper.make_node("ArgMax", ["prob"], ["label"], axis=1, keepdims=0),
        helper.make_node("ZipMap", ["prob"], ["output_probability"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    maps = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), helper.make_value_info("output_probability", maps)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("args, rtol, expect_op", [
    (("--precision", "fp16"), 1e-2, "Cast"),
    (("--quantize", "int8-dynamic", "--no-speed-gate"), 2e-2, "DynamicQuantizeMatMul"),
], ids=["fp16", "int8-dynamic"])
def test_zipmap_model_converted_keeps_its_maps(tmp_path, args, rtol, expect_op):
    """Precision and quantization run on copies of the model: the ZipMap comes along, and
    the maps are held to the budget (as arrays of their values)."""
    src, out = tmp_path / "mlp.onnx", tmp_path / "mlp.out.onnx"
    onnx.save(_mlp_classifier(), src)
    proc = gcomp("optimize", src, "-o", out, *args, "--input-shape", "X=8,16")
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out))
    assert [o.name for o in written.graph.output] == ["label", "output_probability"]
    assert {expect_op, "ZipMap"} <= {n.op_type for n in written.graph.node}
    x = np.random.default_rng(4).random((8, 16), dtype=np.float32)
    before, after = ort_run(src, {"X": x}), ort_run(out, {"X": x})
    np.testing.assert_array_equal(after["label"], before["label"])
    for a, e in zip(after["output_probability"], before["output_probability"]):
        assert set(a) == set(e)
        np.testing.assert_allclose([a[k] for k in e], [e[k] for k in e], rtol=rtol, atol=rtol)


def test_api_zipmap_proto_is_not_modified():
    """gcomp.optimize on a caller's ModelProto: the tail is taken from a copy, the result
    holds the whole model (ZipMap and its output) and is verified."""
    import gcomp

    proto = _zipmap_classifier()
    before = proto.SerializeToString()
    result = gcomp.optimize(proto, "O1", input_shapes={"X": (3, 4)})
    assert proto.SerializeToString() == before
    assert result.verification.passed, result.verification.summary()
    assert {c.name for c in result.verification.outputs} == {"output_label", "output_probability"}
    written = result.to_onnx()
    onnx.checker.check_model(written, full_check=True)
    assert [o.name for o in written.graph.output] == ["output_label", "output_probability"]
    assert "ZipMap" in {n.op_type for n in written.graph.node}
