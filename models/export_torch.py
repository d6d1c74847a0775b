"""Export real architectures with random weights to ONNX (needs the ``export`` extra).

Usage::

    python models/export_torch.py {bert,bert_base,gpt2,resnet,resnet18,vit,mobilenetv2} [...] -o DIR [--dynamo]
    python models/export_torch.py {vad,gru_seqlen,rnn_loop,audio_gru,crnn} [...] -o DIR

(the second line: models whose work sits in If/Loop bodies or RNNs, see
``models/export_subgraphs.py``).

Each model is built from a small ``transformers`` config with random initialisation
(seeded), put in eval mode, wrapped so that it takes and returns plain tensors, and
exported with ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``, opset
17 by default; ``--dynamo`` uses the ``torch.export``-based exporter, opset 18 by
default: asked for 17 it down-converts, which fails for some graphs, e.g. GPT-2's
``Split`` keeps its opset-18 ``num_outputs`` attribute and the file fails the checker). The file is
written to ``DIR/<name>.onnx`` without external data, then checked with ``onnx`` and
compared against PyTorch with ONNX Runtime when those are importable: once on the
export inputs and once on other sizes of the dynamic axes (batch 3, and sequence
length 16 with some padding in the attention mask for the text models), so a trace
that baked in a size or ignored the mask fails the check. Outputs must be finite and
``allclose(rtol=1e-3, atol=1e-4)`` to PyTorch's.

Tested with torch 2.13.0 (CPU) and transformers 5.24.

Requires ``pip install torch==2.13.0 transformers`` (``pip install -e .[export]``);
torch and transformers are imported inside functions so this module imports without them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EXPORTERS", "ExportSpec", "export", "main"]

INSTALL_HINT = "install the export extra: pip install torch==2.13.0 transformers"
TORCH_VERSION = "2.13.0"
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18  # the torch.export-based exporter's own; see the module docstring


@dataclass
class ExportSpec:
    """A module ready for export: example inputs and the ONNX signature."""

    module: Any  # torch.nn.Module
    args: tuple  # example inputs, in forward() order
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def _require_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(2) from None
    return torch, transformers


def _generator(torch: Any, seed: int) -> Any:
    return torch.Generator().manual_seed(seed)


def _perturb_uniform_parameters(torch: Any, model: Any, seed: int, std: float = 0.02) -> None:
    """Add N(0, std) noise to every parameter whose elements are all equal.

    The libraries initialise biases to 0 and norm scales to 1: left so, an optimizer
    could drop every ``Add(x, 0)`` and ``Mul(x, 1)``, which no trained model allows.
    """
    gen = _generator(torch, seed + 2)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                param.add_(torch.randn(param.shape, generator=gen) * std)


def _recalibrate_batchnorm(torch: Any, model: Any, image_shape: tuple, seed: int, steps: int = 4):
    """Recompute BatchNorm running statistics on random images (cumulative average).

    With random weights the stored statistics (0 / 1) do not match the activations, which
    then shrink or blow up layer after layer; recalibrating keeps every BN output near
    zero mean and unit variance, so the exported model's outputs are meaningful.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the calibration batches
    gen = _generator(torch, seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, *image_shape, generator=gen))
    model.eval()
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


# --------------------------------------------------------------------------- models
def bert(*, seed: int = 0, batch: int = 2, seq: int = 128, **config_overrides: Any) -> ExportSpec:
    torch, transformers = _require_torch()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        **{
            "vocab_size": 8192,
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
            "max_position_embeddings": 512,
            "hidden_act": "gelu",
            "attn_implementation": "eager",
            **config_overrides,
        }
    )
    model = transformers.BertModel(config).eval()
    _perturb_uniform_parameters(torch, model, seed)

    class Bert(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=False,
            )
            return out[0], out[1]

    gen = _generator(torch, seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    token_type_ids = torch.zeros(batch, seq, dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    return ExportSpec(
        module=Bert(model).eval(),
        args=(input_ids, attention_mask, token_type_ids),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_axes={
            "input_ids": axes,
            "attention_mask": axes,
            "token_type_ids": axes,
            "last_hidden_state": axes,
            "pooler_output": {0: "batch"},
        },
    )


def gpt2(*, seed: int = 0, batch: int = 2, seq: int = 128, **config_overrides: Any) -> ExportSpec:
    torch, transformers = _require_torch()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        **{
            "vocab_size": 8192,
            "n_positions": 512,
            "n_embd": 256,
            "n_layer": 4,
            "n_head": 4,
            "use_cache": False,
            "bos_token_id": 0,  # the defaults (50256) lie outside the small vocabulary
            "eos_token_id": 0,
            "attn_implementation": "eager",
            **config_overrides,
        }
    )
    model = transformers.GPT2Model(config).eval()
    _perturb_uniform_parameters(torch, model, seed)

    class GPT2(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            # GPT2Model's second positional parameter is past_key_values: the mask must be
            # passed by keyword.
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                return_dict=False,
            )[0]

    gen = _generator(torch, seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    return ExportSpec(
        module=GPT2(model).eval(),
        args=(input_ids, attention_mask),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
    )


def _image_classifier(
    torch: Any, model: Any, *, seed: int, batch: int, image_size: int
) -> ExportSpec:
    class ImageClassifier(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: Any) -> Any:
            return self.model(pixel_values=pixel_values, return_dict=False)[0]  # logits

    gen = _generator(torch, seed)
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=gen)
    return ExportSpec(
        module=ImageClassifier(model).eval(),
        args=(pixel_values,),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
    )


def resnet(*, seed: int = 0, batch: int = 2, image_size: int = 224, **config_overrides: Any) -> ExportSpec:
    torch, transformers = _require_torch()
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        **{
            "num_channels": 3,
            "embedding_size": 32,
            "hidden_sizes": [32, 64, 128, 256],
            "depths": [2, 2, 2, 2],
            "layer_type": "basic",
            "hidden_act": "relu",
            "num_labels": 10,
            **config_overrides,
        }
    )
    model = transformers.ResNetForImageClassification(config)
    _perturb_uniform_parameters(torch, model, seed)
    _recalibrate_batchnorm(torch, model, (3, image_size, image_size), seed)
    return _image_classifier(torch, model.eval(), seed=seed, batch=batch, image_size=image_size)


def vit(*, seed: int = 0, batch: int = 2, image_size: int = 224) -> ExportSpec:
    torch, transformers = _require_torch()
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=16,
        num_channels=3,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
        num_labels=10,
        attn_implementation="eager",
    )
    model = transformers.ViTForImageClassification(config).eval()
    _perturb_uniform_parameters(torch, model, seed)
    return _image_classifier(torch, model, seed=seed, batch=batch, image_size=image_size)


def mobilenetv2(*, seed: int = 0, batch: int = 2, image_size: int = 224) -> ExportSpec:
    torch, transformers = _require_torch()
    torch.manual_seed(seed)
    config = transformers.MobileNetV2Config(
        num_channels=3,
        image_size=image_size,
        depth_multiplier=1.0,
        num_labels=10,
    )
    model = transformers.MobileNetV2ForImageClassification(config)
    # The library's random init (normal, std 0.02, for every conv) makes the activations
    # vanish within a few blocks: use He init for convs, identity BNs, then recalibrate.
    nn = torch.nn
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    _perturb_uniform_parameters(torch, model, seed)
    _recalibrate_batchnorm(torch, model, (3, image_size, image_size), seed)
    return _image_classifier(torch, model.eval(), seed=seed, batch=batch, image_size=image_size)


def resnet18(**kwargs: Any) -> ExportSpec:
    """ResNet-18 proper: stem 64, stages 64-128-256-512, 1000 classes (11.7M parameters)."""
    return resnet(**{"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "num_labels": 1000, **kwargs})


def bert_base(**kwargs: Any) -> ExportSpec:
    """BERT-base: hidden 768, 12 layers, 12 heads, intermediate 3072, BERT's 30522 tokens."""
    return bert(**{"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, **kwargs})


EXPORTERS: dict[str, Callable[..., ExportSpec]] = {
    "bert": bert,
    "bert_base": bert_base,
    "gpt2": gpt2,
    "resnet": resnet,
    "resnet18": resnet18,
    "vit": vit,
    "mobilenetv2": mobilenetv2,
}
if __package__:
    from .export_subgraphs import exporters as _subgraph_exporters
else:  # run as a script from models/
    from export_subgraphs import exporters as _subgraph_exporters
# Models whose work sits in If/Loop bodies or RNNs (vad, gru_seqlen, rnn_loop, audio_gru, crnn).
EXPORTERS.update(_subgraph_exporters(ExportSpec, _require_torch))


# --------------------------------------------------------------------------- export
def _to_numpy(tensor: Any) -> Any:
    return tensor.detach().cpu().numpy()


# The check's tolerance: ONNX Runtime against PyTorch, float32 on CPU.
RTOL, ATOL = 1e-3, 1e-4
# Other sizes of the dynamic axes for the second check (see _other_inputs).
CHECK_SIZES = {"batch": 3, "seq": 16}


def _other_inputs(torch: Any, name: str, seed: int, config: dict | None = None) -> ExportSpec:
    """The same model (same seed, same weights) with inputs of other dynamic sizes.

    Text models also get padding in the attention mask (the last positions of two
    rows), so an export that traced the mask away would fail the comparison.
    """
    kwargs = {"batch": CHECK_SIZES["batch"]}
    if name in ("bert", "bert_base", "gpt2"):
        kwargs["seq"] = CHECK_SIZES["seq"]
    spec = EXPORTERS[name](seed=seed, **kwargs, **(config or {}))
    if "attention_mask" in spec.input_names:
        i = spec.input_names.index("attention_mask")
        mask = spec.args[i].clone()
        mask[0, -5:] = 0
        mask[-1, -1:] = 0
        spec.args = spec.args[:i] + (mask,) + spec.args[i + 1 :]
    return spec


def _compare(sess: Any, spec: ExportSpec, expected: list[Any], label: str, path: Path) -> None:
    import numpy as np

    feed = {name: _to_numpy(arg) for name, arg in zip(spec.input_names, spec.args)}
    got = sess.run(None, feed)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
    print(f"  {label} ({shapes}):")
    for name, ref, out in zip(spec.output_names, expected, got):
        ref = _to_numpy(ref)
        diff = float(np.max(np.abs(ref - out))) if ref.size else 0.0
        finite = bool(np.isfinite(out).all())
        print(
            f"    {name}: shape {list(out.shape)}, std {float(np.std(out)):.4g}, "
            f"max |ort - torch| {diff:.3g}, finite {finite}"
        )
        if not finite:
            raise RuntimeError(f"{path}: output {name} is not finite ({label})")
        if out.shape != ref.shape or not np.allclose(out, ref, rtol=RTOL, atol=ATOL):
            raise RuntimeError(
                f"{path}: output {name} differs from PyTorch ({label}): shape "
                f"{list(out.shape)} vs {list(ref.shape)}, max abs diff {diff:.3g}"
            )


def _check(
    path: Path, name: str, seed: int, spec: ExportSpec, expected: list[Any], config: dict | None = None
) -> None:
    """Check the file with onnx and compare ONNX Runtime against PyTorch.

    Skipped (with a note) when onnx or onnxruntime is not importable; raises
    ``RuntimeError`` when an output is not finite or differs from PyTorch's.
    """
    try:
        import onnx
    except ImportError:
        print("  onnx not installed: check skipped", file=sys.stderr)
        return
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    print(
        f"  {len(proto.graph.node)} nodes, {len(proto.graph.initializer)} initializers, opset {opset}"
    )
    del proto
    try:
        import onnxruntime as ort
    except ImportError:
        print("  onnxruntime not installed: comparison skipped", file=sys.stderr)
        return
    torch, _ = _require_torch()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _compare(sess, spec, expected, "export inputs", path)
    other = _other_inputs(torch, name, seed, config)
    with torch.no_grad():
        other_expected = other.module(*other.args)
    if not isinstance(other_expected, (tuple, list)):
        other_expected = [other_expected]
    _compare(sess, other, list(other_expected), "other sizes", path)


def _dynamic_shapes(torch: Any, spec: ExportSpec) -> dict[str, dict[int, Any]]:
    """``dynamic_axes`` of the inputs as ``torch.export`` dynamic shapes."""
    limits = {"seq": 512}  # positions are embedded from a table of 512 rows
    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    for name in spec.input_names:
        shapes[name] = {}
        for axis, axis_name in spec.dynamic_axes.get(name, {}).items():
            if axis_name not in dims:
                dims[axis_name] = torch.export.Dim(axis_name, max=limits.get(axis_name, 1024))
            shapes[name][axis] = dims[axis_name]
    return shapes


def export(
    name: str,
    out_dir: str | Path,
    *,
    dynamo: bool = False,
    opset: int | None = None,
    seed: int = 0,
    check: bool = True,
    config: dict | None = None,
) -> Path:
    """Export model ``name`` (a key of :data:`EXPORTERS`) to ``out_dir/<name>.onnx``.

    ``opset``: default 17 for the TorchScript exporter, 18 with ``dynamo=True``.
    ``config``: overrides of the text models' ``transformers`` config (e.g.
    ``{"n_layer": 2, "n_embd": 64}``), for small test exports.
    """
    if opset is None:
        opset = DYNAMO_OPSET if dynamo else TORCHSCRIPT_OPSET
    torch, _ = _require_torch()
    if not torch.__version__.startswith(TORCH_VERSION):
        print(
            f"warning: tested with torch {TORCH_VERSION}, found {torch.__version__}",
            file=sys.stderr,
        )
    spec = EXPORTERS[name](seed=seed, **(config or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"

    with torch.no_grad():
        expected = spec.module(*spec.args)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]

    common = {
        "input_names": spec.input_names,
        "output_names": spec.output_names,
        "opset_version": opset,
    }
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated (the point here: its graphs carry the
        # Shape/Gather/Constant chains an optimizer should clean up), and tracing
        # transformers models warns about every Python-level shape test.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        _torch_export(torch, spec, path, dynamo, common)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    if check:
        _check(path, name, seed, spec, expected, config)
    return path


def _torch_export(torch: Any, spec: ExportSpec, path: Path, dynamo: bool, common: dict) -> None:
    if dynamo:
        # torch.export wants dynamic_shapes keyed by forward() parameter (named like the
        # inputs); one Dim object per axis name ties equal dimensions across inputs.
        torch.onnx.export(
            spec.module,
            spec.args,
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=_dynamic_shapes(torch, spec),
            **common,
        )
    else:
        torch.onnx.export(
            spec.module,
            spec.args,
            str(path),
            dynamo=False,
            dynamic_axes=spec.dynamic_axes,
            **common,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export real architectures with random weights to ONNX."
    )
    parser.add_argument(
        "models",
        nargs="+",
        choices=sorted(EXPORTERS),
        metavar="MODEL",
        help=f"one or more of: {', '.join(EXPORTERS)}",
    )
    parser.add_argument(
        "-o",
        "--output-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder to write <model>.onnx into",
    )
    parser.add_argument(
        "--dynamo",
        action="store_true",
        help="use the torch.export-based exporter (default: TorchScript)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"opset version (default: {TORCHSCRIPT_OPSET}, {DYNAMO_OPSET} with --dynamo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the onnx checker and the ONNX Runtime comparison",
    )
    args = parser.parse_args(argv)

    _require_torch()  # fail fast with the install hint
    for name in args.models:
        export(
            name,
            args.output_dir,
            dynamo=args.dynamo,
            opset=args.opset,
            seed=args.seed,
            check=not args.no_check,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
