"""transpose-gemm: 2-D Transpose folded into Gemm's transA/transB; rank-2 MatMul(Transpose) -> Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts


@pytest.mark.parametrize("which", ["A", "B", "AB"])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 1)])
def test_transpose_into_gemm(rng, which, trans_a, trans_b):
    # Shapes of the Gemm operands as the Gemm sees them (after the Transposes).
    a_seen = (4, 3) if trans_a else (3, 4)
    b_seen = (5, 4) if trans_b else (4, 5)
    nodes, a, b = [], "a", "b"
    a_in, b_in = a_seen, b_seen
    if "A" in which:
        a_in = a_seen[::-1]
        nodes.append(helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]))
        a = "at"
    if "B" in which:
        b_in = b_seen[::-1]
        nodes.append(helper.make_node("Transpose", ["b"], ["bt"]))  # no perm: reversed axes
        b = "bt"
    nodes.append(helper.make_node("Gemm", [a, b, "c"], ["y"], transA=trans_a, transB=trans_b, alpha=0.5))
    proto = make_model(nodes, [vinfo("a", shape=a_in), vinfo("b", shape=b_in)], [vinfo("y", shape=(3, 5))],
                       [tensor("c", np.linspace(-1, 1, 5).astype(np.float32))])
    model, result = fuse(proto, feeds_for(rng, a=a_in, b=b_in))
    assert result.details["fired"] == {"transpose-gemm": len(which)}
    assert op_counts(model) == {"Gemm": 1}


@pytest.mark.parametrize("which", ["A", "B", "AB"])
def test_rank2_matmul_with_transpose_to_gemm(rng, which):
    a_in = (4, 3) if "A" in which else (3, 4)
    b_in = (5, 4) if "B" in which else (4, 5)
    nodes, a, b = [], "a", "b"
    if "A" in which:
        nodes.append(helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]))
        a = "at"
    if "B" in which:
        nodes.append(helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]))
        b = "bt"
    nodes.append(helper.make_node("MatMul", [a, b], ["y"]))
    proto = make_model(nodes, [vinfo("a", shape=a_in), vinfo("b", shape=b_in)], [vinfo("y", shape=(3, 5))])
    model, _ = fuse(proto, feeds_for(rng, a=a_in, b=b_in))
    assert op_counts(model) == {"Gemm": 1}
    (gemm,) = list(model.graph)
    flags = (gemm.attributes.get_int("transA", 0), gemm.attributes.get_int("transB", 0))
    assert flags == ("A" in which, "B" in which)


def test_batched_or_shared_transpose_does_not_fire(rng):
    # A batched MatMul stays a MatMul.
    batched = make_model(
        [helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1]), helper.make_node("MatMul", ["at", "b"], ["y"])],
        [vinfo("a", shape=(2, 4, 3)), vinfo("b", shape=(4, 5))], [vinfo("y", shape=(2, 3, 5))])
    # The transposed value is also a graph output.
    shared = make_model(
        [helper.make_node("Transpose", ["a"], ["at"]), helper.make_node("MatMul", ["at", "b"], ["y"])],
        [vinfo("a", shape=(4, 3)), vinfo("b", shape=(4, 5))], [vinfo("y", shape=(3, 5)), vinfo("at", shape=(3, 4))])
    for proto, shapes in ((batched, {"a": (2, 4, 3), "b": (4, 5)}), (shared, {"a": (4, 3), "b": (4, 5)})):
        model, result = fuse(proto, feeds_for(rng, **shapes))
        assert not result.modified and op_counts(model) == {"Transpose": 1, "MatMul": 1}
