"""Shared helpers: tiny models built in code, and the reference runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, initializers=(), opset=17, functions=(), extra_opsets=()):
    """An onnx ModelProto from helper-made pieces (ir_version 10)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 10
    return model


def tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def vinfo(name, dtype=TensorProto.FLOAT, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def ort_run(model, feeds):
    """Outputs of ``model`` (ModelProto, ir.Model or path) on ORT with optimizations off."""
    import onnxruntime as ort

    from gcomp import io

    if isinstance(model, ir.Model):
        src = io.serialize(model)  # external weights are read in
    else:
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def assert_same_outputs(before, after, feeds, rtol=1e-6, atol=1e-6):
    """Numerical proof of a transformation: same output names, close values."""
    a, b = ort_run(before, feeds), ort_run(after, feeds)
    assert list(a) == list(b), f"outputs differ: {list(a)} vs {list(b)}"
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def small_model():
    """x[batch,4] -> Identity -> MatMul W -> Relu (twice, CSE-able) -> Add; a dead Neg; a duplicate W."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"], name="id"),
        helper.make_node("MatMul", ["xi", "W"], ["a"], name="m1"),
        helper.make_node("MatMul", ["xi", "W2"], ["b"], name="m2"),
        helper.make_node("Relu", ["a"], ["ra"], name="r1"),
        helper.make_node("Relu", ["a"], ["rb"], name="r2"),
        helper.make_node("Add", ["ra", "rb"], ["c"], name="add"),
        helper.make_node("Add", ["c", "b"], ["y"], name="add2"),
        helper.make_node("Neg", ["c"], ["dead"], name="dead"),
    ]
    return make_model(nodes, [vinfo("x")], [vinfo("y")], [tensor("W", w), tensor("W2", w.copy())])


@pytest.fixture(scope="session")
def torch_export(tmp_path_factory):
    """``get(name, config, dynamo=False) -> Path``: a small models/export_torch.py export
    (random weights, no PyTorch comparison), made once per session for each argument set."""
    pytest.importorskip("torch", reason="needs torch==2.13.0 (the test extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the test extra installs it)")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models import export_torch

    root = tmp_path_factory.mktemp("torch-exports")
    made: dict = {}

    def get(name: str, config: dict, dynamo: bool = False) -> Path:
        key = (name, tuple(sorted(config.items())), dynamo)
        if key not in made:
            made[key] = export_torch.export(name, root / str(len(made)), dynamo=dynamo, config=config, check=False)
        return made[key]

    return get
