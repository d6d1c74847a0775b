"""The fusion lists run in the order their reasons give (gcomp.passes.fusion: PORTABLE, ORT, TVM),
each fusion declared once, and the passes run the list of their target's family."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from gcomp.errors import OptionError
from gcomp.passes.fusion import FAMILIES, ORT, PORTABLE, TVM, Fuse, FuseTarget
from gcomp.runtime import pass_context

# The order the catalogue had when it was sorted by per-file ORDER numbers (it must not move
# without a reason written beside the list).
EXPECTED = {
    "portable": [
        "pad-conv", "conv-bn", "unflatten-gemm", "bias", "matmul-add-gemm", "scale", "transpose-gemm",
        "layer-norm", "layer-norm-scale-shift", "layer-norm-no-bias", "layer-norm-no-affine",
        "rms-norm", "rms-norm-no-scale", "gelu-erf", "gelu-tanh", "rotary", "attention-scores-scale", "attention", "residual-sum",
        "bias-residual-sum",
    ],
    "ort": [
        "ort-pad-fused-conv", "ort-gelu", "ort-bias-gelu", "ort-embed-shape", "ort-embed-layer-norm",
        "ort-fused-conv", "ort-fused-matmul", "ort-skip-layer-norm",
        "ort-simplified-layer-norm", "ort-simplified-layer-norm-no-scale", "ort-skip-simplified-layer-norm",
        "ort-rotary", "ort-group-query-attention", "ort-attention-scores-scale", "ort-attention", "ort-attention-split-shape",
        "ort-attention-split", "ort-mha", "ort-mha-heads",
    ],
    "tvm": ["tvm-parallel-matmul"],
}


def test_each_family_keeps_its_order():
    assert {family: [f.name for f in fusions] for family, fusions in FAMILIES.items()} == EXPECTED


def test_every_fusion_is_declared_once():
    names = [f.name for f in PORTABLE + ORT + TVM]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("kind", "target", "expected"), [
    (Fuse, "ort-cpu", PORTABLE), (Fuse, "tvm-llvm", PORTABLE), (FuseTarget, "ort-cuda", ORT),
    (FuseTarget, "tvm-cuda", TVM), (FuseTarget, "portable", ()),
])
def test_a_pass_runs_its_family(kind, target, expected):
    pass_ = kind(target=target, context=pass_context())
    assert pass_.fusions(pass_.capabilities) == expected


def test_without_a_context_the_pass_says_what_it_needs():
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 17}), ir_version=8)
    with pytest.raises(OptionError, match="context=gcomp.runtime.pass_context"):
        Fuse()(model)
