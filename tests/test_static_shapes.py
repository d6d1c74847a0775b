"""`--static` / ``gcomp.optimize(static=True)``: every dim fixed at the input shapes, shape
arithmetic folded away, verified at those shapes; and what ``--input-shape`` does without it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import gcomp
from gcomp.errors import OptionError
from tests.conftest import assert_same_outputs, make_model, ort_run, vinfo
from tests.test_cli import assert_one_line_error, gcomp as run_gcomp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _transformer(path: Path) -> Path:
    from gcomp import io
    from models import build

    io.save(build("transformer", layers=1), path)
    return path


def _declared_dims(proto: onnx.ModelProto) -> dict[str, list]:
    """Every declared value of the main graph -> its dims (int, or the dim_param / None)."""
    dims = {}
    for info in (*proto.graph.input, *proto.graph.value_info, *proto.graph.output):
        shape = info.type.tensor_type.shape
        dims[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]
    return dims


def _assert_all_static(proto: onnx.ModelProto) -> None:
    dims = _declared_dims(proto)
    node_outputs = {o for n in proto.graph.node for o in n.output}
    assert node_outputs <= set(dims), f"values without a declared shape: {sorted(node_outputs - set(dims))[:5]}"
    loose = {name: d for name, d in dims.items() if not all(isinstance(x, int) for x in d)}
    assert not loose, list(loose.items())[:5]


def _ids(shape):
    return {"input_ids": np.random.default_rng(4).integers(0, 100, size=shape).astype(np.int64)}


def test_static_cli_fixes_every_dim_and_folds_shape_arithmetic(tmp_path):
    model = _transformer(tmp_path / "t.onnx")
    out = tmp_path / "s.onnx"
    proc = run_gcomp("optimize", model, "-o", out, "--static", "--input-shape", "input_ids=2,16")
    assert proc.returncode == 0, proc.stderr
    assert "passed" in proc.stdout
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    _assert_all_static(proto)
    assert _declared_dims(proto)["input_ids"] == [2, 16]
    assert _declared_dims(proto)["last_hidden_state"] == [2, 16, 128]
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Shape", "Range", "Unsqueeze", "Concat"}, ops
    assert_same_outputs(model, out, _ids((2, 16)), rtol=1e-5, atol=1e-5)
    # without --static, the same shapes only size the verification inputs: the model stays dynamic
    plain = tmp_path / "p.onnx"
    proc = run_gcomp("optimize", model, "-o", plain, "--input-shape", "input_ids=2,16")
    assert proc.returncode == 0, proc.stderr
    assert _declared_dims(onnx.load(plain))["input_ids"] == ["batch", "seq"]
    assert "Shape" in {n.op_type for n in onnx.load(plain).graph.node}
    assert_same_outputs(model, plain, _ids((3, 5)), rtol=1e-5, atol=1e-5)


def test_input_shape_help_says_what_it_does():
    proc = run_gcomp("optimize", "--help")
    text = " ".join(proc.stdout.split())
    assert "Shape of a generated input for verification" in text
    assert "The written model keeps its symbolic dims unless --static." in text
    assert "fixes its symbolic dims everywhere" not in text
    assert "--static" in text and "Fix every dim at the input shapes" in text


def test_static_without_shapes_is_one_line(tmp_path):
    model = _transformer(tmp_path / "t.onnx")
    out = tmp_path / "s.onnx"
    proc = run_gcomp("optimize", model, "-o", out, "--static")
    assert_one_line_error(proc, 2, "--static: input 'input_ids' has unknown dims [batch, seq]: give its shape "
                                   "with --input-shape input_ids=D1,D2")
    assert not out.exists()


def _two_inputs() -> onnx.ModelProto:
    """x[batch, seq] and mask[batch, seq] -> x * mask, reshaped through its own Shape."""
    nodes = [helper.make_node("Mul", ["x", "mask"], ["m"]), helper.make_node("Shape", ["m"], ["s"]),
             helper.make_node("Reshape", ["m", "s"], ["y"])]
    return make_model(nodes, [vinfo("x", shape=("batch", "seq")), vinfo("mask", shape=("batch", "seq"))],
                      [vinfo("y", shape=("batch", "seq"))])


def test_dims_named_by_one_input_fix_the_others():
    proto = _two_inputs()
    result = gcomp.optimize(proto, "O1", static=True, input_shapes={"x": (3, 7)})
    assert result.verification.passed, result.verification.summary()
    assert [list(v.shape) for v in result.model.graph.inputs] == [[3, 7], [3, 7]]
    fixed = result.to_onnx()
    _assert_all_static(fixed)
    assert [n.op_type for n in fixed.graph.node] == ["Mul"]  # Shape and the no-op Reshape are gone
    feeds = {"x": np.full((3, 7), 2, np.float32), "mask": np.ones((3, 7), np.float32)}
    np.testing.assert_array_equal(ort_run(fixed, feeds)["y"], ort_run(proto, feeds)["y"])
    assert result.options["static"] is True and result.options["input_shapes"] == {"x": [3, 7], "mask": [3, 7]}


def test_static_takes_the_shapes_of_given_inputs(tmp_path):
    feeds = {"x": np.ones((2, 5), np.float32), "mask": np.zeros((2, 5), np.float32)}
    np.savez(tmp_path / "in.npz", **feeds)
    result = gcomp.optimize(_two_inputs(), "O1", static=True, inputs=tmp_path / "in.npz")
    assert result.verification.passed
    assert [list(v.shape) for v in result.model.graph.inputs] == [[2, 5], [2, 5]]


def test_a_model_with_static_inputs_needs_no_shapes():
    proto = make_model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                       [vinfo("x", shape=(2, 3))], [vinfo("y", shape=("a", "b"))])
    result = gcomp.optimize(proto, "O1", static=True)
    assert result.verification.passed
    assert [list(v.shape) for v in result.model.graph.outputs] == [[2, 3]]
    assert [n.op_type for n in result.model.graph] == ["Reshape"]  # to a constant shape: Shape folded
    assert result.model.graph.node(0).inputs[1].const_value is not None


@pytest.mark.parametrize("shapes, words", [
    ({"x": (3,)}, "input 'x' has rank 2 ([batch, seq]), the shape given has 1 dims"),
    ({"nope": (1, 2)}, "the model has no input 'nope' (inputs: x, mask)"),
    ({"x": (3, 7), "mask": (4, 7)}, "dim 'batch' is 3 on input 'x' and 4 on input 'mask'"),
    ({}, "input 'x' has unknown dims [batch, seq]"),
])
def test_static_refusals_name_the_input(shapes, words):
    proto = _two_inputs()
    before = proto.SerializeToString()
    with pytest.raises(OptionError) as info:
        gcomp.optimize(proto, "O1", static=True, input_shapes=shapes)
    assert words in str(info.value) and str(info.value).startswith("--static: ")
    assert proto.SerializeToString() == before


def test_a_fixed_dim_must_match():
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", shape=("n", 4))], [vinfo("y")])
    with pytest.raises(OptionError, match=r"input 'x' is \[n, 4\], the shape given is \[2, 5\]"):
        gcomp.optimize(proto, "O1", static=True, input_shapes={"x": (2, 5)})


def test_the_pass_is_registered_and_runs_on_its_own():
    proc = run_gcomp("passes", "--json")
    assert "static-shapes" in proc.stdout
    from gcomp.pipeline import registry

    step = registry.get_pass("static-shapes").create(shapes="x=2,3")
    model = ir.from_proto(_two_inputs())
    assert step(model).modified
    assert all(list(v.shape) == [2, 3] for v in model.graph.inputs)
    assert not step(model).modified  # fixed already: honest flag


@pytest.mark.slow
def test_static_bert_export_loses_every_shape_op(torch_export):
    """A real torch export (TorchScript BERT, three inputs named [batch, seq]): one shape
    fixes all three, every Shape op folds away, outputs equal the original's."""
    path = torch_export("bert", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                 "intermediate_size": 128})
    assert "Shape" in {n.op_type for n in onnx.load(path).graph.node}
    result = gcomp.optimize(path, "O2", static=True, input_shapes={"input_ids": (2, 16)})
    assert result.verification.passed, result.verification.summary()
    proto = result.to_onnx()
    _assert_all_static(proto)
    assert "Shape" not in {n.op_type for n in proto.graph.node}
    rng = np.random.default_rng(9)
    feeds = {"input_ids": rng.integers(0, 100, size=(2, 16)).astype(np.int64),
             "attention_mask": np.ones((2, 16), np.int64), "token_type_ids": np.zeros((2, 16), np.int64)}
    feeds["attention_mask"][1, 10:] = 0
    assert_same_outputs(path, proto, feeds, rtol=1e-4, atol=1e-5)
