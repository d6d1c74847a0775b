"""What a target accepts is defined once, in gcomp.backends (target_ops), and gives the fusion
passes the answers they had when they kept their own table."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from gcomp.backends import capabilities, supports, targets
from gcomp.backends.target_ops import TARGETS
from gcomp.errors import OptionError
from gcomp.passes.fusion import FAMILIES
from gcomp.runtime import pass_context


def _emitted():
    return sorted({e for fusions in FAMILIES.values() for f in fusions for e in f.emits})


def _asked():
    """Every (domain, op, version) a fusion asks about: its standard ops at every opset from
    the one that has them up past the newest ONNX knows, contrib ops at version 1 (what
    ``Fusion.allowed`` asks)."""
    newest = onnx.defs.onnx_opset_version() + 2
    for domain, op, since in _emitted():
        standard = domain in ("", "ai.onnx")
        for version in range(since, newest + 1) if standard else (1,):
            yield domain, op, version


# The fusion passes' own table before it moved to gcomp.backends (its TVM half is now
# target_ops' static table; the ORT half already asked the backend), plus ONNX Runtime's
# default-domain SimplifiedLayerNormalization, which no fusion emitted then.
_OLD_TVM_LACKS = frozenset({
    "LSTM", "GRU", "RNN", "Loop", "Scan", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "RotaryEmbedding", "DFT", "STFT", "Attention", "SimplifiedLayerNormalization",
})


def _old_accepts(target: str, domain: str, op_type: str, version: int) -> bool:
    if target == "portable":
        return all(_old_accepts(t, domain, op_type, version) for t in ("ort-cpu", "tvm-llvm"))
    if target.startswith("ort-"):
        return supports(target, op_type, domain, version)
    return domain in ("", "ai.onnx") and version <= 23 and op_type not in _OLD_TVM_LACKS


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_emitted_op_gets_the_answer_fusion_had(target):
    accepts = capabilities(target).accepts
    for domain, op, version in _asked():
        assert accepts(domain, op, version) == _old_accepts(target, domain, op, version), (domain, op, version)


@pytest.mark.parametrize("target", ["tvm-llvm", "tvm-cuda"])
def test_tvm_table_matches_tvms_converter_table(target):
    """The static TVM answers (no TVM import while fusing) equal TVM's live converter table."""
    pytest.importorskip("tvm", reason="needs apache-tvm (a gcomp dependency)")
    for domain, op, version in _asked():
        if version <= 23:
            assert capabilities(target).accepts(domain, op, version) == supports(target, op, domain, version), (
                domain, op, version)


def test_portable_is_the_intersection():
    for domain, op, version in _asked():
        every = all(capabilities(t).accepts(domain, op, version) for t in TARGETS if t != "portable")
        assert capabilities("portable").accepts(domain, op, version) == every
    assert not capabilities("portable").accepts("", "Attention", 23)  # TVM 0.27 cannot import it
    assert capabilities("portable").accepts("", "LayerNormalization", 17)


def test_capabilities_name_the_backend_and_device():
    assert [(t.name, t.backend, t.device) for t in map(capabilities, targets())] == [
        ("ort-cpu", "ort", "cpu"), ("ort-cuda", "ort", "cuda"), ("tvm-llvm", "tvm", "llvm"),
        ("tvm-cuda", "tvm", "cuda"), ("portable", None, None)]
    with pytest.raises(OptionError, match="unknown target 'tpu'"):
        pass_context().target("tpu")


def test_fusing_for_tvm_never_imports_tvm():
    code = ("import sys; from gcomp.backends import capabilities; from gcomp.passes.fusion import FAMILIES; "
            "t = capabilities('tvm-llvm'); [f.allowed(t, 23) for fs in FAMILIES.values() for f in fs]; "
            "print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
