"""Tensor parallelism on real torch exports: heads found whatever the exporter wrote.

BERT and GPT-2 with transformers' default attention (``sdpa``: PyTorch's scaled-dot-product
attention written out, with its NaN guard after the Softmax; GPT-2's one ``c_attn``
projection split three ways) and a Llama-style decoder (rotary embeddings, SwiGLU MLP,
4 KV heads and grouped-query attention with 2 KV heads for 4 query heads), each from both
torch exporters (TorchScript and torch.export, whose ``K^T`` is a 3-D transpose through
``batch * heads``), and GPT-2 from torch.export at opset 23 (one ``Attention`` op per
layer). For tp=2 and tp=4: exactly Megatron's 2 row-parallel all-reduces per
layer (plus one for a vocabulary-split embedding), no all-gather, every projection weight
divided by tp on each rank, and outputs equal to the unsharded model on ONNX Runtime
(optimizations off) within 1e-4.

Exports are tiny (2 layers, hidden 64, 4 heads) and made once per session.
"""

from __future__ import annotations

import numpy as np
import pytest
from gcomp.passes.sharding import summarize

from gcomp import io
from gcomp.distributed import runner

LAYERS, HIDDEN, HEADS = 2, 64, 4
TEXT = {
    "bert": {"num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
             "intermediate_size": 128, "vocab_size": 1000, "attn_implementation": "sdpa"},
    "gpt2": {"n_layer": LAYERS, "n_embd": HIDDEN, "n_head": HEADS, "vocab_size": 1000,
             "attn_implementation": "sdpa"},
}
MODELS = [(name, dynamo) for name in ("bert", "gpt2", "llama-kv4", "llama-kv2") for dynamo in (False, True)]
MODELS.append(("gpt2", 23))  # torch.export at opset 23 writes scaled-dot-product attention as one Attention op


@pytest.fixture(scope="session")
def exports(torch_export, tmp_path_factory):
    """``get(name, dynamo) -> Path``, each export made once (``dynamo=23``: torch.export at opset 23)."""
    from models import decoder

    root = tmp_path_factory.mktemp("tp-exports")
    made: dict = {}

    def get(name: str, dynamo: bool):
        if (name, dynamo) not in made:
            if dynamo == 23:
                from models import export_torch

                made[name, dynamo] = export_torch.export(name, root / f"{name}-23", dynamo=True, opset=23,
                                                         config=TEXT[name], check=False)
            elif name in TEXT:
                made[name, dynamo] = torch_export(name, TEXT[name], dynamo=dynamo)
            else:
                kv = int(name.split("kv")[1])
                folder = root / f"{name}-{'dynamo' if dynamo else 'ts'}"
                made[name, dynamo] = decoder.export("llama", folder, dynamo=dynamo, check=False, config={
                    "num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                    "num_key_value_heads": kv, "intermediate_size": 128, "vocab_size": 512})
        return made[name, dynamo]

    return get


def _feeds(model, batch=2, seq=8):
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.inputs:
        if v.name == "input_ids":
            feeds[v.name] = rng.integers(0, 500, (batch, seq)).astype(np.int64)
        elif v.name == "position_ids":
            feeds[v.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif v.name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            mask[-1, -2:] = 0  # right padding in one row: the mask must reach every rank's heads
            feeds[v.name] = mask
        else:
            feeds[v.name] = np.zeros((batch, seq), np.int64)
    return feeds


def _float_bytes(model, kinds=None) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype.is_floating_point()
               and (kinds is None or v.name in kinds))


def _projection_weights(model) -> dict[str, int]:
    """Bytes of every MatMul/Gemm weight but the LM head (whose output is the graph output):
    what Megatron divides by tp. Everything else (embedding tables, folded position
    embeddings, the LM head, norms, biases) may stay whole on each rank."""
    outputs = set(model.graph.outputs)
    out = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1].const_value is not None:
            w = node.inputs[1]
            if len(w.shape) == 2 and node.outputs[0] not in outputs and w.const_value.dtype.is_floating_point():
                out[w.name] = w.const_value.nbytes
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,dynamo", MODELS, ids=[f"{n}-{['torchscript', 'dynamo'][d] if d in (0, 1) else f'dynamo-opset{d}'}"
                                                     for n, d in MODELS])
def test_megatron_plan_on_sdpa_exports(exports, name, dynamo):
    path = exports(name, dynamo)
    feeds = _feeds(io.load(path))
    reference = runner.reference_outputs(io.load(path), feeds)
    for tp in (2, 4):
        prepared = runner.prepare(io.load(path), f"tp={tp}", feeds)
        s = summarize(prepared.model, prepared.plan)
        roles = prepared.plan.roles
        vocab = sum(1 for r in roles.values() if r == "embedding (vocab)")
        assert s["unplanned"] == [], s["unplanned"]
        assert s["row_parallel_all_reduces"] == 2 * LAYERS, s["collectives"]
        assert s["all_reduces"] == 2 * LAYERS + vocab and s["all_gathers"] == 0, s["collectives"]
        assert sum(1 for r in roles.values() if r == "attention output (row)") == LAYERS
        assert sum(1 for r in roles.values() if r == "mlp out (row)") == LAYERS
        projections = _projection_weights(prepared.model)
        allowance = _float_bytes(prepared.model) - sum(projections.values())
        bound = sum(projections.values()) / tp + allowance
        if name == "llama-kv2" and tp == 4:
            # 2 KV heads for 4 ranks: each KV head is held by the 2 ranks of its query group,
            # so K and V are halved, not quartered (all else as Megatron)
            kv_weights = [w for w in projections
                          if prepared.model.graph.initializers[w].shape[1] == 2 * HIDDEN // HEADS]
            assert len(kv_weights) == 2 * LAYERS and all("each KV head on 2 ranks" in roles[w] for w in kv_weights)
            kv = sum(projections[w] for w in kv_weights)
            bound += kv / 2 - kv / 4
        outs, calls = runner.simulate(prepared, feeds, threads=1)  # 1 thread: many small sessions
        assert len(calls) == s["all_reduces"]
        assert runner.max_abs_error(outs, reference) <= 1e-4
        for rank in range(tp):
            assert _float_bytes(prepared.rank_model(rank)) <= bound, (tp, rank)
