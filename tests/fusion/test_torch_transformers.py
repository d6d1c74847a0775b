"""Transformer fusions on real torch.onnx exports (TorchScript and dynamo exporters).

Small BERT / GPT-2 configs with random weights, exported by the shared ``torch_export`` fixture:
O3 for ORT must verify and fuse every layer's attention, norms and GELU, and the embeddings.
"""

from __future__ import annotations

import pytest

SMALL = {
    "bert": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128},
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4},
}
LAYERS = 2


@pytest.fixture(scope="module")
def export(torch_export):
    return lambda name, dynamo: torch_export(name, SMALL[name], dynamo=dynamo)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_o3_fuses_every_layer(export, name, dynamo):
    from gcomp import optimize

    result = optimize(export(name, dynamo), "O3", target="ort-cuda")
    assert result.verification.passed, result.verification.summary()
    ops = result.after.op_types
    attention = ops.get("com.microsoft::Attention", 0) + ops.get("com.microsoft::MultiHeadAttention", 0)
    assert attention == LAYERS, ops  # packed Attention where Q/K/V are biased projections of one input
    assert ops.get("com.microsoft::SkipLayerNormalization", 0) >= LAYERS, ops
    # the embeddings (BERT: word + segment + position; GPT-2: word + position, sum kept)
    assert ops.get("com.microsoft::EmbedLayerNormalization", 0) == 1, ops
    gelu = sum(ops.get(f"com.microsoft::{g}", 0) for g in ("BiasGelu", "FastGelu", "Gelu"))
    assert gelu == LAYERS, ops
    assert "Softmax" not in ops and "Erf" not in ops and "Pow" not in ops, ops  # (BERT's pooler keeps its Tanh)


@pytest.mark.slow
def test_o2_stays_portable_on_bert(export):
    from gcomp import optimize

    result = optimize(export("bert", False), "O2")
    assert result.verification.passed, result.verification.summary()
    ops = result.after.op_types
    assert not any(k.startswith("com.microsoft") for k in ops), ops
    assert "LayerNormalization" in ops


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_o3_for_ort_cpu_packs_gpt2_attention(export, dynamo):
    """GPT-2's causal + padding-masked attention -> packed com.microsoft.Attention (the mask as
    attention_bias); the CPU-slower SkipLayerNormalization / EmbedLayerNormalization stay off."""
    from gcomp import optimize

    result = optimize(export("gpt2", dynamo), "O3", target="ort-cpu")
    assert result.verification.passed, result.verification.summary()
    ops = result.after.op_types
    assert ops.get("com.microsoft::Attention", 0) == LAYERS and "Softmax" not in ops, ops
    assert not {"com.microsoft::SkipLayerNormalization", "com.microsoft::EmbedLayerNormalization"} & set(ops), ops
