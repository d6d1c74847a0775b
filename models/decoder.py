"""Decoder-only LLMs (Llama- and Qwen2-style) exported with and without a KV cache.

Usage::

    python models/decoder.py llama -o DIR [--cache] [--dynamo] [--set num_hidden_layers=4 ...]

    from models import decoder
    path = decoder.export("llama", "out/", cache=True, dynamo=False)

Each model is built from a small ``transformers`` config (``LlamaConfig``: RMSNorm, rotary
embeddings, SwiGLU MLP, grouped-query attention with 2 KV heads for 4 query heads;
``Qwen2Config``: the same with Q/K/V biases) with seeded random weights, wrapped so it
takes and returns plain tensors, and exported with ``torch.onnx.export`` (TorchScript,
``dynamo=False``, opset 17; or ``dynamo=True``, opset 18). The ONNX signature, as ONNX
Runtime GenAI and optimum name it:

- without a cache: ``input_ids [batch, seq]``, ``attention_mask [batch, seq]``,
  ``position_ids [batch, seq]`` -> ``logits [batch, seq, vocab]``;
- with ``cache=True``: also ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads,
  past, head_dim]`` for each layer ``i``, the mask over ``past + seq`` positions; outputs also
  ``present.{i}.key`` / ``.value`` ``[batch, kv_heads, past + seq, head_dim]``.

Both exporters export the cache model (transformers 5's ``DynamicCache`` is built inside the
wrapper from the tensors; torch 2.13, transformers 5.25). After export the file is checked:
ONNX Runtime against PyTorch (``allclose(rtol=1e-3, atol=1e-4)``) on the export inputs and
on other sizes (batch 2, other past and sequence lengths, padding at the end of one row)
and at one token.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

if __package__:
    from .export_torch import _perturb_uniform_parameters, _require_torch
else:  # run as a script from models/
    from export_torch import _perturb_uniform_parameters, _require_torch

__all__ = ["ARCHS", "build", "cache_names", "corpus", "export", "greedy", "main", "save_hf", "signature",
           "step_feeds", "train"]

ARCHS = ("llama", "qwen2")
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
RTOL, ATOL = 1e-3, 1e-4
EXPORT_SIZES = (2, 3, 5)  # batch, seq, past at export (one row padded: a mask of ones is traced away)
CHECK_SIZES = (2, 4, 7)  # ... and at the second check


def _config(arch: str, overrides: dict[str, Any]) -> Any:
    _, transformers = _require_torch()
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return cls(**{**TINY, **overrides})


def signature(config: Any, cache: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of the export."""
    layers = range(config.num_hidden_layers)
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    if cache:
        inputs += [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
        outputs += [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
    return inputs, outputs


def _wrapper(torch: Any, model: Any, config: Any, cache: bool) -> Any:
    from transformers.cache_utils import DynamicCache

    layers = config.num_hidden_layers

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> Any:
            if not cache:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
                return out.logits
            kv = DynamicCache(config=config)
            for i in range(layers):
                kv.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=kv, use_cache=True)
            present = [t for layer in kv.layers[:layers] for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return Decoder().eval()


def _inputs(torch: Any, config: Any, cache: bool, sizes: tuple[int, int, int], seed: int,
            pad: bool = False) -> tuple:
    """Consistent inputs: positions past..past+seq-1 and a mask over past+seq positions
    (with ``pad``: the last two positions of the last row masked: right padding, so no query
    row of a causal model is masked entirely, where exporters and PyTorch may disagree)."""
    batch, seq, past = sizes if cache else (sizes[0], sizes[1], 0)
    gen = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    if pad:
        mask[-1, -2:] = 0
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    if not cache:
        return ids, mask, positions
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, past, head_dim)
    kv = [torch.randn(shape, generator=gen) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, positions, *kv)


def build(arch: str, *, seed: int = 0, config: dict | None = None) -> Any:
    """The ``transformers`` model (eval mode) with seeded random weights."""
    torch, transformers = _require_torch()
    cfg = _config(arch, dict(config or {}))
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    model = cls(cfg).eval()
    _perturb_uniform_parameters(torch, model, seed)
    return model


def export(arch: str, out_dir: str | Path, *, cache: bool = False, dynamo: bool = False, seed: int = 0,
           check: bool = True, config: dict | None = None, model: Any = None, name: str | None = None) -> Path:
    """Export ``arch`` (``llama`` or ``qwen2``) to ``out_dir/<name or arch>[_cache][_dynamo].onnx``:
    ``model`` (a trained one, see :func:`train`) or one built by :func:`build`."""
    torch, _ = _require_torch()
    model = model if model is not None else build(arch, seed=seed, config=config)
    cfg = model.config
    module = _wrapper(torch, model, cfg, cache)
    names, outputs = signature(cfg, cache)
    args = _inputs(torch, cfg, cache, EXPORT_SIZES, seed, pad=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or arch}{'_cache' if cache else ''}{'_dynamo' if dynamo else ''}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer warnings
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, opset_version=18,
                              input_names=names, output_names=outputs,
                              dynamic_shapes=_dynamic_shapes(torch, cfg, cache))
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=outputs, dynamic_axes=_dynamic_axes(names, outputs))
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    if check:
        for sizes, pad in ((EXPORT_SIZES, False), (CHECK_SIZES, True), ((1, 1, 6), False)):
            _compare(torch, module, path, names, _inputs(torch, cfg, cache, sizes, seed + 1, pad=pad))
    return path


# A byte-level decoder trained here (``train``): its greedy continuations are meaningful, so a
# change of greedy tokens after quantization is a real loss of accuracy, not noise.
TRAINED = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def corpus(limit: int = 4 << 20) -> bytes:
    """Local text: the Python standard library's sources (sorted, the first ``limit`` bytes)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def train(*, steps: int = 600, seed: int = 0, seq: int = 128, batch: int = 16, lr: float = 3e-3,
          config: dict | None = None) -> tuple[Any, dict[str, float]]:
    """A Llama-style byte-level model (:data:`TRAINED`) trained for ``steps`` steps of AdamW on
    :func:`corpus` (the last 5 % held out), seeded, so the same weights on any machine;
    returns (model in eval mode, {steps, seconds, train_loss, heldout_loss} in nats per byte)."""
    import time

    import numpy as np

    torch, _ = _require_torch()
    torch.manual_seed(seed)
    data = np.frombuffer(corpus(), dtype=np.uint8).astype(np.int64)
    split = int(len(data) * 0.95)
    train_data, held = torch.from_numpy(data[:split]), torch.from_numpy(data[split:])
    model = build("llama", seed=seed, config={**TRAINED, **(config or {})}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), float("nan")
    for _ in range(steps):
        idx = torch.randint(0, len(train_data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([train_data[i:i + seq] for i in idx.tolist()])
        out = model(input_ids=x, labels=x, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = float(out.loss)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        x = torch.stack([held[i:i + seq] for i in range(0, min(len(held) - seq, 64 * seq), seq)])
        heldout = float(model(input_ids=x, labels=x, use_cache=False).loss)
    return model, {"steps": steps, "train_loss": loss, "heldout_loss": heldout, "seconds": seconds}


def save_hf(model: Any, folder: str | Path) -> Path:
    """``model`` as a Hugging Face folder (config, safetensors) with a tokenizer of one token
    per id (``<0>``, ``<1>``, ...; for a byte-level model, token ``<b>`` is byte ``b``), which
    tools that read a folder, such as ONNX Runtime GenAI's model builder, need."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    model.save_pretrained(folder)
    vocab = {f"<{i}>": i for i in range(model.config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                  eos_token="<0>", unk_token="<0>")
    tok.save_pretrained(folder)
    return folder


def step_feeds(ids: Any, config: Any, cache: dict | None = None) -> dict:
    """One cache step's feeds: ``ids`` (int ``[1, S]``) after the positions ``cache`` holds
    (``{past_key_values.N.key/value: [1, kv_heads, P, head_dim]}``; None: an empty cache, P =
    0): the mask over P + S positions, positions P..P+S-1."""
    import numpy as np

    if cache is None:
        head_dim = config.hidden_size // config.num_attention_heads
        empty = np.zeros((1, config.num_key_value_heads, 0, head_dim), np.float32)
        cache = dict.fromkeys(cache_names(config), empty)
    ids = np.asarray(ids, np.int64)
    p, s = next(iter(cache.values())).shape[2], ids.shape[1]
    return {"input_ids": ids, "attention_mask": np.ones((1, p + s), np.int64),
            "position_ids": np.arange(p, p + s, dtype=np.int64)[None], **cache}


def cache_names(config: Any) -> list[str]:
    """The KV-cache inputs, ``past_key_values.{layer}.key`` / ``.value`` in layer order."""
    return [f"past_key_values.{i}.{k}" for i in range(config.num_hidden_layers) for k in ("key", "value")]


def greedy(session: Any, prompt: Any, steps: int, config: Any, timings: list | None = None) -> list[int]:
    """Greedy continuation of ``prompt`` (int64 ``[1, S]``) by a cache model in an ONNX Runtime
    ``session`` (inputs and outputs by name, so ONNX Runtime GenAI's models, which compute
    positions themselves and order their outputs otherwise, run too): the prompt in one
    step, then one token at a time with the cache fed back. ``timings``: gets each step's
    seconds in the session (the first is the prompt's)."""
    import time

    import numpy as np

    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    ids, cache, tokens = prompt, None, []
    for _ in range(steps):
        feeds = {k: v for k, v in step_feeds(ids, config, cache).items() if k in names}
        start = time.perf_counter()
        got = dict(zip(outputs, session.run(None, feeds)))
        if timings is not None:
            timings.append(time.perf_counter() - start)
        cache = {k: got[k.replace("past_key_values", "present")] for k in cache_names(config)}
        token = int(np.argmax(got["logits"][0, -1]))
        tokens.append(token)
        ids = np.array([[token]], np.int64)
    return tokens


def _dynamic_axes(names: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    if len(names) == 3:
        axes["attention_mask"] = {0: "batch", 1: "seq"}
    axes.update({n: {0: "batch", 2: "past"} for n in names[3:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
    return axes


def _dynamic_shapes(torch: Any, config: Any, cache: bool) -> tuple:
    """torch.export's shapes by forward() parameter (the cache is the ``*past`` tuple); the
    mask's length is past + seq, which torch.export derives itself (``Dim.AUTO``)."""
    dim = torch.export.Dim
    batch, seq = dim("batch", max=64), dim("seq", max=256)
    if not cache:
        return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq})
    past = dim("past", max=256)
    kv = tuple({0: batch, 2: past} for _ in range(2 * config.num_hidden_layers))
    return ({0: batch, 1: seq}, {0: batch, 1: dim.AUTO}, {0: batch, 1: seq}, kv)


def _compare(torch: Any, module: Any, path: Path, names: list[str], args: tuple) -> None:
    import numpy as np
    import onnxruntime as ort

    with torch.no_grad():
        expected = module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    for (out, ref) in zip(got, expected):
        ref = ref.numpy()
        if out.shape != ref.shape or not np.allclose(out, ref, rtol=RTOL, atol=ATOL):
            diff = float(np.max(np.abs(out - ref))) if out.shape == ref.shape else float("nan")
            raise RuntimeError(f"{path}: differs from PyTorch at shapes {[list(a.shape) for a in args[:3]]}: "
                               f"{list(out.shape)} vs {list(ref.shape)}, max abs diff {diff:.3g}")
    print(f"  matches PyTorch at {', '.join(f'{n} {list(a.shape)}' for n, a in zip(names[:3], args))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a decoder-only LLM (random weights) to ONNX.")
    parser.add_argument("arch", choices=ARCHS)
    parser.add_argument("-o", "--out", default=".", help="output folder")
    parser.add_argument("--cache", action="store_true", help="past_key_values inputs and present outputs")
    parser.add_argument("--dynamo", action="store_true", help="the torch.export-based exporter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                        help="a config override, e.g. num_hidden_layers=4 (repeatable)")
    args = parser.parse_args(argv)
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
    export(args.arch, args.out, cache=args.cache, dynamo=args.dynamo, seed=args.seed, config=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
