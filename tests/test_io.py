"""gcomp.io: loading with clear errors, atomic saving, external data, never touching the input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from gcomp import io
from gcomp.errors import ModelLoadError, ModelSaveError
from tests.conftest import assert_same_outputs, make_model, tensor, vinfo


def _external_model(tmp_path: Path, name="ext.onnx") -> Path:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [vinfo("x", shape=("batch", 64))],
        [vinfo("y", shape=("batch", 64))],
        [tensor("W", w)],
    )
    path = tmp_path / name
    onnx.save(model, path, save_as_external_data=True, location=name + ".bin", size_threshold=0)
    return path


def test_load_reads_graph_and_records_source(tmp_path, small_model):
    path = tmp_path / "m.onnx"
    onnx.save(small_model, path)
    model = io.load(path)
    assert len(model.graph) == 8
    assert io.source_path(model) == path.resolve()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_text("hello, not a model\n"), p)[1], "not a valid ONNX protobuf"),
    ],
    ids=["missing", "directory", "empty", "text"],
)
def test_load_errors(tmp_path, make, message):
    path = make(tmp_path / "x.onnx")
    with pytest.raises(ModelLoadError, match=message):
        io.load(path)


def test_load_truncated(tmp_path, small_model):
    path = tmp_path / "t.onnx"
    data = small_model.SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt|not an ONNX model|checker"):
        io.load(path)


def test_load_checker_failure(tmp_path):
    # A node consumes a value nobody produces: invalid graph.
    bad = make_model([helper.make_node("Relu", ["nowhere"], ["y"])], [vinfo("x")], [vinfo("y")])
    path = tmp_path / "bad.onnx"
    onnx.save(bad, path)
    with pytest.raises(ModelLoadError, match="fails the ONNX checker"):
        io.load(path)


def test_load_missing_external_data(tmp_path):
    path = _external_model(tmp_path)
    (tmp_path / "ext.onnx.bin").unlink()
    with pytest.raises(ModelLoadError, match="tensor 'W'.*external data file 'ext.onnx.bin' is missing"):
        io.load(path)


def test_load_short_external_data(tmp_path):
    path = _external_model(tmp_path)
    data = tmp_path / "ext.onnx.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="too short"):
        io.load(path)


def test_load_refuses_external_data_outside_folder(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _external_model(tmp_path)
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../ext.onnx.bin"
    onnx.save(proto, inner / "m.onnx")
    with pytest.raises(ModelLoadError, match="escapes the model's folder"):
        io.load(inner / "m.onnx")


def test_save_is_atomic_and_loadable(tmp_path, small_model):
    model = ir.from_proto(small_model)
    out = tmp_path / "out.onnx"
    io.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temp left behind
    assert_same_outputs(small_model, out, {"x": np.ones((2, 4), np.float32)}, rtol=0, atol=0)


def test_save_refuses_input(tmp_path, small_model):
    path = tmp_path / "m.onnx"
    onnx.save(small_model, path)
    before = path.read_bytes()
    model = io.load(path)
    with pytest.raises(ModelSaveError, match="refusing to write over the input"):
        io.save(model, path)
    link = tmp_path / "alias.onnx"
    os.symlink(path, link)
    with pytest.raises(ModelSaveError, match="refusing to write over the input"):
        io.save(model, link)
    assert path.read_bytes() == before


def test_save_refuses_data_file_the_model_reads(tmp_path):
    path = _external_model(tmp_path, name="w")
    model = io.load(path)
    # Saving as "w.onnx" would write "w.onnx.data"; saving as "w.onnx.bin"'s stem is fine, but
    # writing the model file itself onto its data file must be refused.
    with pytest.raises(ModelSaveError, match="reads its weights from it"):
        io.save(model, tmp_path / "w.bin")


def test_save_external_data_round_trip(tmp_path):
    path = _external_model(tmp_path)
    model = io.load(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "opt.onnx"
    io.save(model, out)  # input had external data -> output writes its own
    assert (out_dir / "opt.onnx.data").is_file()
    proto = onnx.load(out, load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"opt.onnx.data"}  # never points at the input's data file
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}
    assert_same_outputs(path, out, feeds, rtol=0, atol=0)
    # The input's data is untouched and still loads.
    assert io.load(path) is not None


def test_save_inline_when_asked(tmp_path):
    path = _external_model(tmp_path)
    model = io.load(path)
    out = tmp_path / "inline.onnx"
    io.save(model, out, external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    proto = onnx.load(out, load_external_data=False)
    assert not any(t.external_data for t in proto.graph.initializer)


@pytest.mark.parametrize(
    "target, message",
    [
        (lambda t: t / "missing-dir" / "o.onnx", "does not exist"),
        (lambda t: t, "is a directory"),
        (lambda t: Path("/proc/gcomp-cannot-write.onnx"), "not writable|cannot write"),
    ],
    ids=["no-folder", "directory", "unwritable"],
)
def test_save_bad_targets(tmp_path, small_model, target, message):
    with pytest.raises(ModelSaveError, match=message):
        io.save(ir.from_proto(small_model), target(tmp_path))


def test_save_failure_leaves_nothing(tmp_path, small_model, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", boom)
    out = tmp_path / "o.onnx"
    with pytest.raises(ModelSaveError, match="disk full"):
        io.save(ir.from_proto(small_model), out)
    assert list(tmp_path.iterdir()) == []


def test_optimize_external_data_model_from_another_cwd(tmp_path, monkeypatch):
    """O0/O1 validation must resolve external data against the model's folder, not the cwd."""
    import gcomp

    path = _external_model(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = gcomp.optimize(path, "O1")
    assert result.verification.passed
    out = result.save(tmp_path / "o1.onnx")
    assert (tmp_path / "o1.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
