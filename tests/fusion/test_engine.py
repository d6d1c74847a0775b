"""The fusion engine: the onnxscript adapter's version check and root filter, and run state
that lives in one run only."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnxscript.rewriter import pattern

from gcomp.backends import capabilities
from gcomp.errors import GcompError
from gcomp.passes.fusion import _onnxscript, gelu
from gcomp.passes.fusion._engine import FusionRun
from gcomp.registry import get_pass


@pytest.mark.parametrize("version", ["0.6.3", "0.8.0", "1.0", "dev"])
def test_onnxscript_outside_the_tested_range_is_a_clear_error(version):
    with pytest.raises(GcompError, match=r"onnxscript >=0\.7,<0\.8; onnxscript .* is installed"):
        _onnxscript._check_version(version)


def test_the_tested_range_passes():
    _onnxscript._check_version("0.7.2")


def _empty_model() -> ir.Model:
    return ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 20}), ir_version=10)


def test_root_filter_is_a_rule_of_its_own():
    run = FusionRun(_empty_model(), capabilities("portable"))
    original = gelu.GELU_ERF.build(run)[0]
    filtered = _onnxscript.root_filtered(original)
    assert isinstance(filtered, _onnxscript.RootFilteredRule) and filtered is not original
    assert filtered.root == ("", "Mul") and filtered.name == original.name
    assert "try_rewrite" not in vars(original)  # the library's rule object is not patched
    assert type(original).try_rewrite is pattern.RewriteRule.try_rewrite


def test_fresh_names_avoid_every_name_of_the_model_and_start_over_per_run():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    node = ir.node("Relu", [x], name="w__f0")
    node.outputs[0].name = "w__f1"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 20}), ir_version=10)
    first = FusionRun(model, capabilities("ort-cpu"))
    assert [first.fresh_name("w") for _ in range(2)] == ["w__f2", "w__f3"]
    again = FusionRun(model, capabilities("tvm-llvm"))
    assert again.fresh_name("w") == "w__f2" and again.target.name == "tvm-llvm"


def test_context_is_not_an_option():
    for name in ("fuse", "fuse-target"):
        assert [o.name for o in get_pass(name).options] == ["target", "explain_fusion", "rotary_in_attention"]
