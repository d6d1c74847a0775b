"""Models whose work sits in If/Loop bodies: O1 and O3 leave no more nodes than onnxslim's
default output (nodes counted in the main graph and every body), no Constant node and no
exporter slice pair inside the bodies, and the results match the original on ONNX Runtime
on every branch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import gcomp
from models import control_flow
from tests.conftest import assert_same_outputs


def _graphs(graph):
    """``graph`` and every body under it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(body)


def _nodes(proto) -> int:
    return sum(len(g.node) for g in _graphs(proto.graph))


def _body_nodes(proto) -> list:
    return [n for g in list(_graphs(proto.graph))[1:] for n in g.node]


def _slim_nodes(proto) -> int:
    import onnxslim

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return _nodes(onnxslim.slim(copy))


def _optimized(proto, level):
    result = gcomp.optimize(ir.from_proto(proto), level)
    assert result.verification.passed
    return ir.to_proto(result.model)


def _assert_cleaned_bodies(after):
    body = _body_nodes(after)
    assert body, "the bodies are gone: nothing left to check"
    assert not [n.name for n in body if n.op_type == "Constant"]
    produced_by = {o: n for g in _graphs(after.graph) for n in g.node for o in n.output}
    chained = [n.name for n in body if n.op_type == "Slice" and getattr(produced_by.get(n.input[0]), "op_type", "") == "Slice"]
    assert not chained


@pytest.fixture(scope="module")
def front_end():
    return ir.to_proto(control_flow.build())


@pytest.mark.parametrize("level", ["O1", "O3"])
def test_control_flow_front_end_ends_below_onnxslim(front_end, level):
    after = _optimized(front_end, level)
    assert _nodes(after) <= _slim_nodes(front_end)
    assert _nodes(after) < _nodes(front_end) // 2
    _assert_cleaned_bodies(after)
    rng = np.random.default_rng(0)
    for sr in (16000, 8000):
        for samples in (100, 37, 16):  # whole frames, a remainder, and one frame / two loop steps
            feeds = {
                "x": rng.standard_normal((2, samples)).astype(np.float32),
                "sr": np.array(sr, np.int64),
                "context": rng.standard_normal((2, 16)).astype(np.float32),
            }
            assert_same_outputs(front_end, after, feeds, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O1", "O3"])
def test_scripted_vad_export_ends_below_onnxslim(torch_export, level):
    proto = onnx.load(str(torch_export("vad", {})))
    assert any(n.op_type == "If" for n in proto.graph.node) and any(n.op_type == "Constant" for n in _body_nodes(proto))
    after = _optimized(proto, level)
    assert _nodes(after) <= _slim_nodes(proto)
    _assert_cleaned_bodies(after)
    rng = np.random.default_rng(1)
    for sr in (16000, 8000):
        for batch, samples in ((2, 512), (3, 256)):
            feeds = {
                "x": rng.standard_normal((batch, samples)).astype(np.float32),
                "sr": np.array(sr, np.int64),
                "state": (rng.standard_normal((2, batch, 64)) * 0.1).astype(np.float32),
            }
            assert_same_outputs(proto, after, feeds, rtol=1e-4, atol=1e-5)
