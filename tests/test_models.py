"""Tests of the model builders in ``models/`` and of ``models/default.onnx``."""

from __future__ import annotations

import collections
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import models
from models import cnn, make_default, mlp, transformer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ONNX = REPO / "models" / "default.onnx"
MAX_DEFAULT_BYTES = 5 * 1024 * 1024

# name -> (builder, input name, output name, expected output shape for batch=2 / seq=7)
CASES = {
    "cnn": (cnn.build, "input", "logits", (2, 10)),
    "transformer": (transformer.build, "input_ids", "last_hidden_state", (2, 7, 128)),
    "mlp": (mlp.build, "x", "probs", (2, 10)),
}


def _feed(name: str, batch: int = 2, seq: int = 7, seed: int = 1234) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "cnn":
        return {"input": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    if name == "transformer":
        return {"input_ids": rng.integers(0, 1000, (batch, seq), dtype=np.int64)}
    if name == "mlp":
        return {"x": rng.standard_normal((batch, 64)).astype(np.float32)}
    raise KeyError(name)


def _session(model: ir.Model | bytes) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else ir.to_proto(model).SerializeToString()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    name = request.param
    builder, input_name, output_name, shape = CASES[name]
    return name, builder(), input_name, output_name, shape


# ----------------------------------------------------------------------------- structure
def test_registry():
    assert set(models.BUILDERS) == {"cnn", "transformer", "mlp", "resnet18"}
    assert models.BUILDERS["resnet18"] is models.resnet.build
    assert models.BUILDERS["cnn"] is cnn.build
    assert models.BUILDERS["transformer"] is transformer.build
    assert models.BUILDERS["mlp"] is mlp.build
    assert _bytes(models.build("mlp", seed=3)) == _bytes(mlp.build(seed=3))
    with pytest.raises(KeyError):
        models.build("nope")


def test_checker_full(case):
    _, model, *_ = case
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_model_conventions(case):
    _, model, input_name, output_name, _ = case
    assert model.ir_version == 10
    assert model.opset_imports == {"": 17}
    graph = model.graph
    assert [v.name for v in graph.inputs] == [input_name]
    assert [v.name for v in graph.outputs] == [output_name]
    for value in [*graph.inputs, *graph.outputs]:
        assert value.dtype is not None and value.shape is not None
        assert value.shape[0] == ir.SymbolicDim("batch")
    node_names = [node.name for node in graph]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    value_names = [out.name for node in graph for out in node.outputs]
    value_names += list(graph.initializers) + [v.name for v in graph.inputs]
    assert all(value_names) and len(set(value_names)) == len(value_names)
    # Every initializer is registered and used; nothing else feeds from outside the graph.
    assert graph.initializers
    for init in graph.initializers.values():
        assert init.const_value is not None and init.uses()
    assert all(node.domain == "" for node in graph)


# ------------------------------------------------------------------------------ running
def test_runs_in_onnxruntime(case):
    name, model, input_name, output_name, shape = case
    sess = _session(model)
    assert [i.name for i in sess.get_inputs()] == [input_name]
    (out,) = sess.run([output_name], _feed(name))
    assert out.shape == shape
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert np.ptp(out) > 1e-3, "outputs are all (nearly) equal"
    # Different samples of the batch give different outputs.
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(case, batch):
    name, model, _, output_name, shape = case
    (out,) = _session(model).run([output_name], _feed(name, batch=batch, seq=5))
    expected = (batch, *shape[1:])
    if name == "transformer":
        expected = (batch, 5, shape[2])
    assert out.shape == expected
    assert np.isfinite(out).all()


def test_deterministic(case):
    name, model, *_ = case
    builder = CASES[name][0]
    assert _bytes(builder()) == _bytes(model)
    assert _bytes(builder(seed=0)) == _bytes(model)
    assert _bytes(builder(seed=1)) != _bytes(model)


def test_weights_sane(case):
    _, model, *_ = case
    for name, array in _weights(model).items():
        assert np.isfinite(array).all(), name
        if array.dtype == np.float32 and array.ndim >= 2:
            assert 0.01 < float(array.std()) < 0.15, (name, float(array.std()))


# --------------------------------------------------------------- numpy reference models
def _layer_norm(x, gamma, beta, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _transformer_reference(w, ids, layers, heads):
    def p(name):
        return w[name].astype(np.float64)

    hidden = w["embeddings.word_embeddings.weight"].shape[1]
    d = hidden // heads
    b, s = ids.shape

    def lin(t, name):
        return t @ p(f"{name}.weight") + p(f"{name}.bias")

    def norm(t, name):
        return _layer_norm(t, p(f"{name}.weight"), p(f"{name}.bias"))

    def split(t):
        return t.reshape(b, s, heads, d).transpose(0, 2, 1, 3)

    x = p("embeddings.word_embeddings.weight")[ids] + p("embeddings.position_embeddings.weight")[:s]
    x = norm(x, "embeddings.LayerNorm")
    for i in range(layers):
        pre = f"encoder.layer.{i}"
        q = split(lin(x, f"{pre}.attention.self.query"))
        k = split(lin(x, f"{pre}.attention.self.key"))
        v = split(lin(x, f"{pre}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, hidden)
        x = norm(lin(ctx, f"{pre}.attention.output.dense") + x, f"{pre}.attention.output.LayerNorm")
        h = lin(x, f"{pre}.intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = norm(lin(h, f"{pre}.output.dense") + x, f"{pre}.output.LayerNorm")
    return x


def test_transformer_matches_reference():
    model = transformer.build(layers=2, hidden=64, heads=4, ffn=128, vocab=1000, seed=5)
    ids = _feed("transformer", batch=2, seq=9)["input_ids"]
    (out,) = _session(model).run(None, {"input_ids": ids})
    ref = _transformer_reference(_weights(model), ids, layers=2, heads=4)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_mlp_matches_reference():
    model = mlp.build(seed=2)
    w = _weights(model)
    x = _feed("mlp")["x"].astype(np.float64)
    h = x
    for i in range(2):
        h = np.maximum(h @ w[f"layers.{i}.weight"] + w[f"layers.{i}.bias"], 0.0)
    logits = h @ w["classifier.weight"] + w["classifier.bias"]
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    (out,) = _session(model).run(None, _feed("mlp"))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


def _conv3x3(x, weight, bias):
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return np.einsum("bchwij,ocij->bohw", windows, weight) + bias[None, :, None, None]


def _cnn_reference(w, x):
    def block(t, prefix, relu=True):
        t = _conv3x3(t, w[f"{prefix}.conv.weight"], w[f"{prefix}.conv.bias"])
        shape = (1, -1, 1, 1)
        mean, var = w[f"{prefix}.bn.running_mean"], w[f"{prefix}.bn.running_var"]
        t = (t - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5)
        t = t * w[f"{prefix}.bn.weight"].reshape(shape) + w[f"{prefix}.bn.bias"].reshape(shape)
        return np.maximum(t, 0.0) if relu else t

    def pool(t):
        b, c, h, wd = t.shape
        return t.reshape(b, c, h // 2, 2, wd // 2, 2).max(axis=(3, 5))

    x = x.astype(np.float64)
    y = pool(block(block(x, "stem"), "layer1"))
    h = block(block(y, "layer2.0"), "layer2.1", relu=False)
    y = pool(np.maximum(h + y, 0.0))
    y = block(y, "layer3").mean(axis=(2, 3))
    return y @ w["fc.weight"].T + w["fc.bias"]


def test_cnn_matches_reference():
    model = cnn.build(seed=4)
    feed = _feed("cnn")
    (out,) = _session(model).run(None, feed)
    ref = _cnn_reference(_weights(model), feed["input"])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_transformer_graph_is_exporter_like():
    model = transformer.build()
    ops = collections.Counter(node.op_type for node in model.graph)
    expected = "Gather Shape Range Concat Reshape Transpose Softmax ReduceMean Sub Pow Sqrt Erf"
    for op in [*expected.split(), "Identity", "MatMul", "Div"]:
        assert ops[op] > 0, op
    assert not {"LayerNormalization", "Gelu", "Attention"} & set(ops)
    # ReduceMean at opset 17 takes its axes as an attribute, with a single input.
    for node in model.graph:
        if node.op_type == "ReduceMean":
            assert len(node.inputs) == 1 and list(node.attributes["axes"].as_ints()) == [-1]
    # Equal Constant nodes appear more than once (duplicates for CSE to remove).
    consts = collections.Counter(
        (n.attributes["value"].as_tensor().dtype, n.attributes["value"].as_tensor().tobytes())
        for n in model.graph
        if n.op_type == "Constant"
    )
    assert max(consts.values()) > 1
    # 2 layers: each has its own Shape chains for the reshapes.
    assert ops["Shape"] == 1 + 2 * 8
    assert ops["Reshape"] == 2 * 4


@pytest.mark.parametrize("layers", [1, 3])
def test_transformer_layers(layers):
    model = transformer.build(layers=layers, hidden=32, heads=2, ffn=64, vocab=50)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ids = np.random.default_rng(0).integers(0, 50, (2, 4), dtype=np.int64)
    (out,) = _session(model).run(None, {"input_ids": ids})
    assert out.shape == (2, 4, 32) and np.isfinite(out).all()
    assert sum(n.op_type == "Softmax" for n in model.graph) == layers


def test_builder_options():
    model = cnn.build(batch=4, channels=1, size=16, num_classes=3)
    (out,) = _session(model).run(
        None, {"input": np.random.default_rng(0).standard_normal((4, 1, 16, 16), np.float32)}
    )
    assert out.shape == (4, 3)
    model = mlp.build(features=8, hidden=(16,), classes=5)
    (out,) = _session(model).run(None, {"x": np.ones((3, 8), np.float32)})
    assert out.shape == (3, 5)
    with pytest.raises(ValueError):
        transformer.build(hidden=30, heads=4)


# ---------------------------------------------------------------------------- default
def test_default_onnx_exists_and_small():
    assert DEFAULT_ONNX.is_file(), "run: python models/make_default.py"
    assert DEFAULT_ONNX.stat().st_size < MAX_DEFAULT_BYTES


def test_default_onnx_matches_make_default(tmp_path):
    path = tmp_path / "default.onnx"
    ir.save(make_default.build_default(), path)
    assert path.read_bytes() == DEFAULT_ONNX.read_bytes(), (
        "models/default.onnx is stale: run python models/make_default.py"
    )


def test_default_onnx_loads_and_runs():
    proto = onnx.load(str(DEFAULT_ONNX))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
    )
    (out,) = _session(DEFAULT_ONNX.read_bytes()).run(None, _feed("transformer", seq=16))
    assert out.shape == (2, 16, 128) and np.isfinite(out).all()


def test_make_default_script_is_deterministic(tmp_path):
    outputs = []
    for i in range(2):
        path = tmp_path / f"d{i}.onnx"
        subprocess.run(
            [sys.executable, str(REPO / "models" / "make_default.py"), "-o", str(path)],
            check=True,
            capture_output=True,
        )
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1] == DEFAULT_ONNX.read_bytes()


# ------------------------------------------------------------------------- export_torch
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None
    and importlib.util.find_spec("transformers") is not None,
    reason="torch and transformers are installed",
)
def test_export_torch_without_torch(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "models" / "export_torch.py"), "bert", "-o", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "install the export extra: pip install torch==2.13.0 transformers" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs the export extra (torch==2.13.0, transformers)",
)
def test_export_torch_resnet_and_optimize(tmp_path):
    """The exporter runs (it checks ORT against PyTorch itself) and O1 verifies on its output."""
    import gcomp

    result = subprocess.run(
        [sys.executable, str(REPO / "models" / "export_torch.py"), "resnet", "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("*.onnx")
    optimized = gcomp.optimize(path, "O1")
    assert optimized.verification.passed, optimized.verification.summary()
