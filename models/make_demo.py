"""Write the demo model, ``models/demo.onnx`` (``scripts/demo.sh`` makes it on every run).

The demo model is the transformer encoder from :mod:`models.transformer`, larger than
``models/default.onnx`` so that a run takes milliseconds and what pipeline O3 gains is
measurable above run-to-run noise: ``layers=4, hidden=128, heads=4, ffn=512, vocab=1000``,
one sequence of 256 tokens (``input_ids`` is ``[1, 256]``, fixed, so every tool times
the same shape), seed 0, no external data (about 3.9 MB). It is generated rather than
committed; the output is deterministic: every run writes the same bytes.

Usage::

    python -m models.make_demo [-o models/demo.onnx]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx_ir as ir

from models import transformer
from models.make_default import MAX_BYTES, save_small  # noqa: F401  (MAX_BYTES: the demo's bound too)

__all__ = ["DEMO_CONFIG", "DEMO_PATH", "build_demo", "main", "write_demo"]

DEMO_PATH = Path(__file__).resolve().parent / "demo.onnx"
DEMO_CONFIG = {"seed": 0, "layers": 4, "hidden": 128, "heads": 4, "ffn": 512, "vocab": 1000,
               "batch": 1, "seq": 256, "max_positions": 256}


def build_demo() -> ir.Model:
    """The demo model, in memory."""
    return transformer.build(**DEMO_CONFIG)


def write_demo(path: str | Path = DEMO_PATH) -> Path:
    """Build the demo model and save it to ``path`` (no external data, under 5 MiB)."""
    return save_small(build_demo(), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEMO_PATH, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    path = write_demo(args.output)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
