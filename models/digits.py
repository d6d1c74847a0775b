"""Small trained classifiers on scikit-learn's bundled digits (no download), exported to ONNX.

Two models, trained on CPU with a fixed seed in a few seconds each, for accuracy-aware
benchmarks (quantization: a held-out top-1 is a real accuracy, not a cosine on random
weights)::

    from models import digits
    path, x_test, y_test = digits.load("cnn", "bench/results")      # trains once, then cached
    calib = digits.training_inputs("cnn", 64)                       # for static calibration

* ``cnn``: input ``pixels [batch, 1, 8, 8]`` (values / 16): Conv 1->16, Relu, Conv 16->32,
  Relu, MaxPool 2x2, Flatten, Gemm 512->64, Relu, Gemm 64->10 -> ``logits [batch, 10]``.
* ``transformer``: input ``pixels [batch, 8, 8]``: the 8 rows are 8 tokens of 8 values;
  a MatMul token embedding (8->64) plus learned positions, 2 pre-LayerNorm encoder
  layers (d=64, 4 heads, separate q/k/v/out MatMul projections, MLP 64->128->64 with
  Gelu), a final LayerNorm, mean over tokens, Gemm 64->10 -> ``logits [batch, 10]``.

The data: ``sklearn.datasets.load_digits`` (1797 images, shipped inside scikit-learn),
split with ``train_test_split(test_size=0.3, random_state=0, stratify=labels)``: 1257
training and 540 held-out images, the same on every machine. Each model is exported with
``torch.onnx.export(..., dynamo=False)`` (opset 17, dynamic batch axis) to
``FOLDER/digits_<kind>.onnx`` beside ``digits_<kind>.json`` (its stamp: the training
recipe and the PyTorch top-1 on the held-out split); a file whose stamp matches is
reused, so a benchmark trains once. Needs torch and scikit-learn (the ``bench`` and
``export`` extras), imported inside functions.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["KINDS", "Exported", "dataset", "load", "main", "top1", "training_inputs"]

KINDS = ("cnn", "transformer")
SEED = 0
TEST_SIZE = 0.3
OPSET = 17
RECIPE_VERSION = 1  # bump when a model or its training changes: cached exports are redone
# kind -> (epochs, learning rate); AdamW, batch 64, cosine-free constant rate
TRAINING = {"cnn": (30, 3e-3), "transformer": (60, 2e-3)}
BATCH = 64
THREADS = 2


class Exported(NamedTuple):
    """An exported digits model and its held-out split."""

    path: Path
    inputs: np.ndarray  # float32, the model's input layout, 540 images
    labels: np.ndarray  # int64 [540]


def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: images [n, 8, 8] float32 in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, random_state=SEED, stratify=labels)
    return x_train, y_train, x_test, y_test


def _layout(kind: str, images: np.ndarray) -> np.ndarray:
    """The model's input layout: [n, 1, 8, 8] for the CNN, [n, 8, 8] (8 tokens) otherwise."""
    return np.ascontiguousarray(images[:, None] if kind == "cnn" else images)


def training_inputs(kind: str, count: int = 64) -> np.ndarray:
    """The first ``count`` training images in ``kind``'s input layout (calibration data)."""
    x_train, _, _, _ = dataset()
    return _layout(kind, x_train[:count])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(np.argmax(logits, axis=-1) == labels))


# --------------------------------------------------------------------------- models
def _cnn(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def _transformer(torch: Any, d: int = 64, heads: int = 4, layers: int = 2, tokens: int = 8) -> Any:
    nn = torch.nn

    class Block(nn.Module):
        """Pre-LayerNorm encoder layer written out (no fused attention module in the graph)."""

        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def _split(self, x: Any) -> Any:  # [b, t, d] -> [b, heads, t, d/heads]
            return x.reshape(x.shape[0], x.shape[1], heads, d // heads).transpose(1, 2)

        def forward(self, x: Any) -> Any:
            h = self.ln1(x)
            q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], d)
            x = x + self.o(ctx)
            return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, d)
            self.pos = nn.Parameter(torch.randn(tokens, d) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, pixels: Any) -> Any:
            x = self.embed(pixels) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln(x).mean(dim=1))

    return Classifier()


def _train(torch: Any, kind: str, x: np.ndarray, y: np.ndarray) -> Any:
    """Train ``kind`` with AdamW (seeded order and initialisation); returns it in eval mode."""
    torch.manual_seed(SEED)
    model = _cnn(torch) if kind == "cnn" else _transformer(torch)
    epochs, lr = TRAINING[kind]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), BATCH):
            idx = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _export(torch: Any, model: Any, example: np.ndarray, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (torch.from_numpy(example),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["pixels"], output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        )


def _stamp(kind: str) -> dict[str, Any]:
    epochs, lr = TRAINING[kind]
    return {"kind": kind, "recipe": RECIPE_VERSION, "seed": SEED, "epochs": epochs, "lr": lr,
            "batch": BATCH, "test_size": TEST_SIZE, "opset": OPSET}


def _cached(path: Path, stamp_path: Path, stamp: dict[str, Any]) -> bool:
    if not (path.exists() and stamp_path.exists()):
        return False
    try:
        recorded = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    return {k: recorded.get(k) for k in stamp} == stamp


def load(kind: str, folder: str | Path, *, force: bool = False) -> Exported:
    """The exported ``kind`` model under ``folder`` (trained and exported when not cached),
    with the held-out inputs and labels."""
    if kind not in KINDS:
        raise KeyError(f"unknown digits model {kind!r}; choose from {KINDS}")
    folder = Path(folder)
    path, stamp_path = folder / f"digits_{kind}.onnx", folder / f"digits_{kind}.json"
    x_train, y_train, x_test, y_test = dataset()
    stamp = _stamp(kind)
    if force or not _cached(path, stamp_path, stamp):
        import time

        import torch

        folder.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            t0 = time.perf_counter()
            model = _train(torch, kind, _layout(kind, x_train), y_train)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                logits = model(torch.from_numpy(_layout(kind, x_test))).numpy()
            _export(torch, model, _layout(kind, x_test[:2]), path)
        finally:
            torch.set_num_threads(threads)
        stamp.update(torch_top1=top1(logits, y_test), train_seconds=round(seconds, 2),
                     torch_version=torch.__version__)
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return Exported(path, _layout(kind, x_test), y_test)


def main(argv: list[str] | None = None) -> int:
    """``python models/digits.py [FOLDER] [--force]``: train/export both, print top-1 on ORT."""
    import onnxruntime as ort

    args = sys.argv[1:] if argv is None else argv
    force = "--force" in args
    folder = Path(next((a for a in args if not a.startswith("--")), "bench/results"))
    for kind in KINDS:
        path, x, y = load(kind, folder, force=force)
        stamp = json.loads(path.with_suffix(".json").read_text())
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ort_top1 = top1(sess.run(None, {"pixels": x})[0], y)
        print(f"{kind}: {path} ({path.stat().st_size} bytes), trained in {stamp.get('train_seconds')} s; "
              f"held-out top-1 torch {stamp.get('torch_top1'):.2f} %, ONNX Runtime {ort_top1:.2f} % "
              f"({len(y)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
