"""unflatten-gemm: Reshape(Gemm(Reshape(x, [-1, K]), W, c), x's leading dims + [N]) -> MatMul(x, W) + c."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import make_model, tensor, vinfo
from tests.fusion._util import feeds_for, fuse, op_counts

K, N = 8, 6


def _linear(rng, *, trans_b=0, swap=False, bias_shape=(N,), extra_use=False, rank=3):
    """GPT-2's Conv1D as exported: sizes read from Shape(x) at run time."""
    lead = ["B", "S", "T"][: rank - 1]
    nodes = [helper.make_node("Shape", ["x"], ["shp"])]
    dims = []
    for k in range(rank - 1):
        nodes += [helper.make_node("Gather", ["shp", f"i{k}"], [f"g{k}"], axis=0),
                  helper.make_node("Unsqueeze", [f"g{k}", "zero"], [f"u{k}"])]
        dims.append(f"u{k}")
    if swap:
        dims[0], dims[1] = dims[1], dims[0]
    w = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    nodes += [helper.make_node("Concat", [*dims, "n"], ["target"], axis=0),
              helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
              helper.make_node("Gemm", ["flat", "w", "c"], ["g"], transB=trans_b),
              helper.make_node("Reshape", ["g", "target"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["flat"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    inits = [tensor(f"i{k}", np.array(k, np.int64)) for k in range(rank - 1)] + [
        tensor("zero", np.array([0], np.int64)), tensor("n", np.array([N], np.int64)),
        tensor("flat_shape", np.array([-1, K], np.int64)), tensor("w", w),
        tensor("c", rng.standard_normal(bias_shape).astype(np.float32))]
    return make_model(nodes, [vinfo("x", shape=(*lead, K))], outputs, inits)


def _only_matmul_add(model):
    # The size arithmetic is left dead for the pipeline's dead-code pass; no Gemm or Reshape is left.
    counts = op_counts(model)
    assert counts["MatMul"] == 1 and counts["Add"] == 1 and not counts["Gemm"] and not counts["Reshape"], counts


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [(N,), (1, N), ()])
def test_flattened_gemm_becomes_matmul_and_bias(rng, trans_b, bias_shape):
    proto = _linear(rng, trans_b=trans_b, bias_shape=bias_shape)
    model, result = fuse(proto, feeds_for(rng, x=(2, 3, K)))
    assert result.details["fired"] == {"unflatten-gemm": 1}
    _only_matmul_add(model)


def test_rank_four(rng):
    proto = _linear(rng, rank=4)
    model, result = fuse(proto, feeds_for(rng, x=(2, 3, 4, K)))
    assert result.details["fired"] == {"unflatten-gemm": 1}
    _only_matmul_add(model)


def test_swapped_dims_or_shared_flatten_do_not_fire(rng):
    # [S, B, N] is a legal reshape of the rows, but not x's rows put back: refused.
    model, result = fuse(_linear(rng, swap=True), feeds_for(rng, x=(2, 3, K)))
    assert "unflatten-gemm" not in result.details["fired"] and op_counts(model)["Gemm"] == 1
    # The flattened tensor is used elsewhere: the Reshape must stay anyway.
    model, result = fuse(_linear(rng, extra_use=True), feeds_for(rng, x=(2, 3, K)))
    assert "unflatten-gemm" not in result.details["fired"] and op_counts(model)["Gemm"] == 1


def test_row_dependent_bias_does_not_fire(rng):
    # A [rows, N] bias adds a different vector to every row: not expressible after the MatMul
    # on the unflattened tensor (static shapes so the model is valid).
    nodes = [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "c"], ["g"]),
             helper.make_node("Reshape", ["g", "target"], ["y"])]
    inits = [tensor("flat_shape", np.array([-1, K], np.int64)), tensor("target", np.array([2, 3, N], np.int64)),
             tensor("w", rng.standard_normal((K, N)).astype(np.float32)),
             tensor("c", rng.standard_normal((6, N)).astype(np.float32))]
    proto = make_model(nodes, [vinfo("x", shape=(2, 3, K))], [vinfo("y", TensorProto.FLOAT, (2, 3, N))], inits)
    model, result = fuse(proto, feeds_for(rng, x=(2, 3, K)))
    assert "unflatten-gemm" not in result.details["fired"] and op_counts(model)["Gemm"] == 1
