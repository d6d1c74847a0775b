"""The Python API: optimize on paths and models, options, custom passes (the README example runs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import onnx
import onnx_ir as ir
import pytest

import gcomp
from gcomp.pipeline import registry  # importing the pipeline registers the built-in passes
from gcomp.errors import OptionError, PassFailedError

REPO = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(REPO)
    (REPO / "out").mkdir(exist_ok=True)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    saved = REPO / "out" / "default.custom.onnx"
    assert saved.is_file()
    onnx.checker.check_model(str(saved), full_check=True)
    assert "strip-doc-strings" in registry.passes()
    saved.unlink()


def test_optimize_path_and_model_agree():
    a = gcomp.optimize(REPO / "models" / "default.onnx", "O1")
    b = gcomp.optimize(gcomp.load(REPO / "models" / "default.onnx"), "O1")
    assert a.verification.passed and b.verification.passed
    assert a.after.nodes == b.after.nodes < a.before.nodes
    assert [p.name for p in a.passes] == [p.name for p in b.passes]
    assert a.pipeline == "O1"


def test_pass_stats_are_consistent():
    result = gcomp.optimize(REPO / "models" / "default.onnx", "O1", verify=False)
    assert result.verification is None
    for prev, cur in zip(result.passes, result.passes[1:]):
        assert cur.nodes_before == prev.nodes_after
    for p in result.passes:
        if not p.modified:
            assert p.nodes_before == p.nodes_after and not p.op_delta
        assert sum(p.op_delta.values()) == p.nodes_after - p.nodes_before
    assert result.passes[0].nodes_before == result.before.nodes
    assert result.passes[-1].nodes_after == result.after.nodes


def test_unknown_option_and_wrong_type():
    with pytest.raises(OptionError, match="unknown option"):
        gcomp.optimize(REPO / "models" / "default.onnx", "O1", verify=False, fold_everything=True)
    with pytest.raises(OptionError, match="expects int"):
        gcomp.optimize(REPO / "models" / "default.onnx", "O1", verify=False, cse_size_limit="x")
    with pytest.raises(OptionError, match="unknown pipeline"):
        registry.get_pipeline("O9")


def test_options_must_be_keyword_only():
    with pytest.raises(TypeError, match="keyword-only"):

        @registry.register_pass("bad-positional")
        class Bad(ir.passes.InPlacePass):
            def __init__(self, limit: int = 1):
                super().__init__()

            def call(self, model):
                return ir.passes.PassResult(model, False)


def test_registered_options_are_introspected():
    @registry.register_pass("test-options")
    class WithOptions(ir.passes.InPlacePass):
        """Has options."""

        def __init__(self, *, limit: Annotated[int, "the limit"] = 3, name: str = "x"):
            super().__init__()

        def call(self, model):
            return ir.passes.PassResult(model, False)

    info = registry.get_pass("test-options")
    assert [(o.name, o.type, o.default, o.help) for o in info.options] == [
        ("limit", int, 3, "the limit"),
        ("name", str, "x", ""),
    ]
    assert info.summary == "Has options."
    assert info.options[0].parse("0x10") == 16


def test_a_crashing_pass_is_named():
    class Crash(ir.passes.InPlacePass):
        def call(self, model):
            raise RuntimeError("kaboom")

    with pytest.raises(PassFailedError, match=r"pass 'Crash' failed \(after: validate\): kaboom"):
        gcomp.optimize(gcomp.load(REPO / "models" / "default.onnx"), ["O0", Crash()], verify=False)


def test_validation_is_not_repeated_on_a_freshly_loaded_model():
    path = REPO / "models" / "default.onnx"
    fresh = gcomp.optimize(path, "O1,validate", verify=False)
    first, last = fresh.passes[0], fresh.passes[-1]
    assert first.name == "validate" and first.note and "unchanged since the check at load" in first.note
    assert last.name == "validate" and last.note is None  # cleanup modified the model: checked again
    given = gcomp.optimize(gcomp.load(path), "O0", verify=False)
    assert given.passes[0].note is None  # a caller's model may have been edited: always checked
