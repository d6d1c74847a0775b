"""The fusion target table agrees with the backends' own declarations."""

from __future__ import annotations

import pytest

from gcomp.passes.fusion import _engine, _load_rules
from gcomp.passes.fusion.targets import TARGETS, accepts


def _emitted():
    _load_rules()
    return sorted({(d, op, v) for f in _engine.FUSIONS for d, op, v in f.emits})


@pytest.mark.parametrize("target", ["tvm-llvm", "tvm-cuda"])
def test_tvm_table_matches_tvms_converter_table(target):
    """The static TVM answers (no TVM import during O2) equal TVM's live converter table."""
    pytest.importorskip("tvm", reason="needs apache-tvm (a gcomp dependency)")
    from gcomp.backends import supports

    for domain, op, version in _emitted():
        opset = max(version, 17) if domain in ("", "ai.onnx") else 17
        assert accepts(target, domain, op, opset) == supports(target, op, domain, opset), (domain, op)


def test_targets_match_the_backend_registry():
    from gcomp.backends import targets

    assert sorted(TARGETS) == sorted(targets())


def test_portable_is_the_intersection():
    for domain, op, version in _emitted():
        opset = max(version, 17) if domain in ("", "ai.onnx") else 17
        both = accepts("ort-cpu", domain, op, opset) and accepts("tvm-llvm", domain, op, opset)
        assert accepts("portable", domain, op, opset) == both
    assert not accepts("portable", "", "Attention", 23)  # TVM 0.27 cannot import it
    assert accepts("portable", "", "LayerNormalization", 17)
