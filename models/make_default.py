"""Write the default benchmark model, ``models/default.onnx``.

The default model is the transformer encoder from :mod:`models.transformer` with
``layers=2, hidden=128, heads=4, ffn=512, vocab=1000`` and seed 0, saved without
external data. The output is deterministic: every run writes the same bytes.

Usage::

    python models/make_default.py [-o models/default.onnx]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx_ir as ir

from models import transformer

__all__ = ["DEFAULT_CONFIG", "DEFAULT_PATH", "build_default", "main", "save_small", "write_default"]

DEFAULT_PATH = Path(__file__).resolve().parent / "default.onnx"
DEFAULT_CONFIG = {"seed": 0, "layers": 2, "hidden": 128, "heads": 4, "ffn": 512, "vocab": 1000}
MAX_BYTES = 5 * 1024 * 1024


def build_default() -> ir.Model:
    """The default model, in memory."""
    return transformer.build(**DEFAULT_CONFIG)


def write_default(path: str | Path = DEFAULT_PATH) -> Path:
    """Build the default model and save it to ``path`` (no external data)."""
    return save_small(build_default(), path)


def save_small(model: ir.Model, path: str | Path) -> Path:
    """Save ``model`` to ``path`` as one file (no external data), refusing one of
    :data:`MAX_BYTES` or more."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path)
    size = path.stat().st_size
    if size >= MAX_BYTES:
        raise RuntimeError(f"{path} is {size} bytes, over the {MAX_BYTES}-byte limit")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_PATH,
        help="where to write (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    path = write_default(args.output)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
