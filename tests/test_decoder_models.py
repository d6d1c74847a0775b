"""Decoder LLMs with a KV cache: consistent generated inputs, and verification of real exports.

A cache model's inputs name their lengths apart (``seq``, ``past``, ``total``) and nothing in
the graph says ``total = past + seq``; generated inputs that ignore it fail inside the model
(a Gather out of bounds on a TorchScript Llama export), so gcomp reported "not verified".
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import gcomp
from gcomp.inputs import DEFAULT_DIM, generate_inputs
from gcomp.io import load
from tests.conftest import make_model, vinfo


def _cache_model(tmp_path, *, position_name="position_ids"):
    """The interface of a one-layer cache decoder (the body only echoes, this is about inputs)."""
    inputs = [vinfo("input_ids", TensorProto.INT64, ["batch", "seq"]),
              vinfo("attention_mask", TensorProto.INT64, ["batch", "total"]),
              vinfo(position_name, TensorProto.INT64, ["batch", "seq"]),
              vinfo("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 8]),
              vinfo("past_key_values.0.value", TensorProto.FLOAT, ["batch", 2, "past", 8])]
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [vinfo(f"{i.name}_out", i.type.tensor_type.elem_type,
                     [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in inputs]
    path = tmp_path / "cache.onnx"
    onnx.save(make_model(nodes, inputs, outputs), path)
    return load(path)


def test_generated_inputs_of_a_cache_model_are_consistent(tmp_path):
    feeds, notes = generate_inputs(_cache_model(tmp_path))
    p = s = DEFAULT_DIM
    assert feeds["past_key_values.0.key"].shape == (1, 2, p, 8)
    assert feeds["input_ids"].shape == (1, s)
    assert feeds["attention_mask"].shape == (1, p + s) and (feeds["attention_mask"] == 1).all()
    assert (feeds["position_ids"] == np.arange(p, p + s)).all()
    assert any("KV cache" in n and f"positions {p}..{p + s - 1}" in n for n in notes), notes


def test_cache_lengths_follow_given_shapes(tmp_path):
    """One token after 7 cached ones: --input-shape sets seq and past; the mask follows."""
    feeds, _ = generate_inputs(_cache_model(tmp_path),
                               shapes={"input_ids": (1, 1), "past_key_values.0.key": (1, 2, 7, 8)})
    assert feeds["attention_mask"].shape == (1, 8)
    assert feeds["position_ids"].tolist() == [[7]]
    assert feeds["past_key_values.0.value"].shape == (1, 2, 7, 8)


def test_models_without_a_cache_keep_positions_from_zero(tmp_path):
    nodes = [helper.make_node("Identity", ["position_ids"], ["y"])]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [vinfo("position_ids", TensorProto.INT64, ["batch", "seq"])],
                         [vinfo("y", TensorProto.INT64, ["batch", "seq"])]), path)
    feeds, notes = generate_inputs(load(path))
    assert (feeds["position_ids"] == np.arange(DEFAULT_DIM)).all()
    assert not any("KV cache" in n for n in notes)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    pytest.importorskip("torch", reason="needs torch==2.13.0 (the test extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the test extra installs it)")
    from models import decoder

    root = tmp_path_factory.mktemp("decoders")
    return {(arch, dynamo): decoder.export(arch, root, cache=True, dynamo=dynamo, check=False)
            for arch, dynamo in (("llama", False), ("llama", True), ("qwen2", False))}


@pytest.mark.slow
@pytest.mark.parametrize("arch,dynamo", [("llama", False), ("llama", True), ("qwen2", False)])
def test_cache_decoder_exports_verify(decoders, arch, dynamo):
    """Llama (grouped-query attention, 2 KV heads for 4) and Qwen2 KV-cache exports from both
    torch exporters: O3 verifies on generated inputs (it was "not possible": the generated
    mask did not cover past + seq) and keeps the cache interface."""
    path = decoders[(arch, dynamo)]
    result = gcomp.optimize(path, "O3")
    assert result.verification.passed, result.verification.summary()
    names = {v.name for v in result.model.graph.inputs}
    assert {"past_key_values.0.key", "past_key_values.1.value", "attention_mask"} <= names
    assert {"present.0.key", "present.1.value"} <= {v.name for v in result.model.graph.outputs}


@pytest.mark.slow
@pytest.mark.parametrize("arch,dynamo", [("llama", False), ("llama", True), ("qwen2", False)])
def test_rms_norms_fuse_on_both_exporters(decoders, arch, dynamo):
    """Every RMSNorm (two per layer and the final one) becomes RMSNormalization at opset 23,
    whether the exporter wrote rsqrt as ``1 / Sqrt`` (TorchScript) or ``Reciprocal(Sqrt)``."""
    result = gcomp.optimize(decoders[(arch, dynamo)], "O2", target_opset=23)
    assert result.verification.passed, result.verification.summary()
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("RMSNormalization") == 2 * 2 + 1, ops
    assert "ReduceMean" not in ops


@pytest.mark.slow
def test_greedy_with_the_cache_matches_pytorch(tmp_path):
    """The exported cache model, fed back its present.* one token at a time
    (models.decoder.greedy), continues a prompt exactly as PyTorch's own greedy generate."""
    torch = pytest.importorskip("torch", reason="needs torch==2.13.0 (the test extra installs it)")
    import onnxruntime as ort

    from models import decoder

    model = decoder.build("llama")
    path = decoder.export("llama", tmp_path, cache=True, model=model, check=False)
    prompt = np.arange(1, 9)[None]
    got = decoder.greedy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), prompt, 12,
                         model.config)
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert got == expected[0, 8:].tolist()
    assert len(set(got)) > 1  # a continuation, not one repeated token


@pytest.mark.slow
def test_int4_under_the_tokens_budget_reports_tokens_and_the_cache(decoders, tmp_path):
    """``--metric tokens``: the logits bound the budget (share of changed argmaxes, with the
    float margin where one changed), the KV cache is reported but not bounded; a budget no
    quantized node meets is one line, exit 1, nothing written."""
    import json
    import subprocess
    import sys

    path = decoders[("llama", False)]
    out = tmp_path / "q.onnx"
    base = [sys.executable, "-m", "gcomp", "optimize", str(path), "-o", str(out), "--quantize", "int4",
            "--metric", "tokens", "--no-speed-gate"]
    proc = subprocess.run([*base, "--tolerance", "1", "--json"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = {a["name"]: a for a in json.loads(proc.stdout)["quantization"]["accuracy"]}
    assert rows["logits"]["bounded"] and rows["logits"]["within"]
    assert 0 <= rows["logits"]["error"] <= 1
    assert not rows["present.0.key"]["bounded"]
    assert out.exists()
    out.unlink()
    # On this random-weight model some token's top two scores are near-equal, so every
    # quantized node flips one: a budget of 0 is declined (seeded: the same every run).
    proc = subprocess.run([*base, "--tolerance", "0"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "tokens <= 0 cannot be met" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
