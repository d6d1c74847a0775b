"""What is installed: gcomp's optional extras and the ONNX Runtime build it runs on.

``pip install gcomp`` installs the core: optimize, verify, inspect, profile and shard on
ONNX Runtime's plain CPU build. The heavy parts are extras (``pyproject.toml``):

- ``gcomp[tvm]``: apache-tvm (with its apache-tvm-ffi pin), xgboost and cloudpickle, for
  the TVM backend (``gcomp compile``, ``--backend tvm``) and tuning its kernels;
- ``gcomp[distributed]``: mpi4py and the mpich wheel, for ``gcomp run`` over MPI ranks;
- ``gcomp[all]``: both.

What this module guarantees:

- :func:`require` raises :class:`MissingExtraError` (a :class:`GcompError`, exit 1)
  whose message is one line naming the package that is missing and the
  ``pip install 'gcomp[extra]'`` that brings it; it never imports the package (a
  lookup only), so asking costs nothing. :func:`missing` answers the same question
  without raising (``--backend auto`` skips a backend that is not installed).
- :func:`check_onnxruntime` raises one line when ONNX Runtime is not installed, or
  when two of its builds (``onnxruntime`` and ``onnxruntime-gpu``, ...) are: they install
  into the same ``onnxruntime`` folder, the second overwriting the first's files, so
  neither can be trusted; the line names what is installed and the commands that keep
  one. It reads the installed distributions' folders on ``sys.path``, never imports
  ONNX Runtime, and answers once per process (:func:`ensure_onnxruntime`).

``python -m gcomp.deps`` prints the ONNX Runtime builds installed, one a line
(``scripts/_venv.sh`` uses it before gcomp itself is installed: only the standard
library and :mod:`gcomp.errors` are imported).
"""

from __future__ import annotations

__all__ = [
    "EXTRAS",
    "MissingExtraError",
    "check_onnxruntime",
    "ensure_onnxruntime",
    "missing",
    "onnxruntime_builds",
    "require",
]

import functools
import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from gcomp.errors import GcompError

# import name -> (extra that installs it, distribution that provides it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tvm": ("tvm", "apache-tvm"),
    "tvm_ffi": ("tvm", "apache-tvm-ffi"),
    "xgboost": ("tvm", "xgboost"),
    "cloudpickle": ("tvm", "cloudpickle"),
    "mpi4py": ("distributed", "mpi4py"),
}

# A dist-info folder that may hold an ONNX Runtime build: onnxruntime, onnxruntime_gpu,
# onnxruntime_directml, ort_nightly_gpu, ... (onnxruntime_genai and onnxruntime_extensions
# match too: their top_level.txt, read below, tells them apart).
_ORT_DIST_INFO = re.compile(r"^(onnxruntime|ort_nightly)(_[a-z0-9_]+)?-[^-]+\.dist-info$", re.IGNORECASE)


class MissingExtraError(GcompError):
    """A command needs an optional package that is not installed; the message names the
    ``pip install`` that fixes it."""

    exit_code = 1


def missing(module: str) -> bool:
    """Whether ``module`` (a top-level import name) cannot be imported here."""
    if module in sys.modules:
        return sys.modules[module] is None
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def require(feature: str, *modules: str, hint: str = "") -> None:
    """Raise :class:`MissingExtraError` when one of ``modules`` is not installed:
    ``"<feature> needs <distribution>, which is not installed: pip install 'gcomp[<extra>]'"``
    (``hint`` appended in parentheses)."""
    for module in modules:
        if missing(module):
            extra, dist = EXTRAS[module]
            more = f" ({hint})" if hint else ""
            raise MissingExtraError(
                f"{feature} needs {dist}, which is not installed: pip install 'gcomp[{extra}]'{more}"
            )


def onnxruntime_builds(paths: Iterable[str] | None = None) -> dict[str, str]:
    """``{distribution: version}``, sorted by name, of every ONNX Runtime build installed on
    ``paths`` (default ``sys.path``): distributions whose ``top_level.txt`` names
    ``onnxruntime`` (without one, whose files include ``onnxruntime/__init__.py``); the
    first folder on the path wins for a name installed twice."""
    from importlib.metadata import PathDistribution

    found: dict[str, str] = {}
    for entry in sys.path if paths is None else paths:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in sorted(n for n in names if _ORT_DIST_INFO.match(n)):
            dist = PathDistribution(Path(entry or ".") / name)
            top = dist.read_text("top_level.txt")
            if top is not None:
                ours = "onnxruntime" in top.split()
            else:  # no top_level.txt: the files it installed say
                ours = any(str(f) == "onnxruntime/__init__.py" for f in dist.files or ())
            if ours and dist.metadata["Name"]:
                found.setdefault(re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(), dist.version)
    return dict(sorted(found.items()))


def check_onnxruntime(paths: Iterable[str] | None = None) -> None:
    """Raise :class:`GcompError` (one line) when no ONNX Runtime can be imported, or when
    more than one build of it is installed (see the module's docstring)."""
    builds = onnxruntime_builds(paths)
    if len(builds) > 1:
        names = sorted(builds, key=lambda n: (n != "onnxruntime", n))
        listed = ", ".join(f"{n} {builds[n]}" for n in names)
        others = [n for n in names if n != "onnxruntime"]
        raise GcompError(
            f"{len(builds)} ONNX Runtime builds are installed ({listed}); they share the 'onnxruntime' package "
            f"folder, so none can be trusted: keep one with pip uninstall -y {' '.join(names)} && pip install "
            f"{others[0]} (or onnxruntime for the CPU only)"
        )
    if missing("onnxruntime"):
        raise GcompError(
            "ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu for CUDA; never both)"
        )


@functools.cache
def ensure_onnxruntime() -> None:
    """:func:`check_onnxruntime` once per process (every use of ONNX Runtime calls this
    first); a failed check is raised again on every call."""
    check_onnxruntime()


def _main() -> None:
    for name in onnxruntime_builds():
        print(name)


if __name__ == "__main__":
    _main()
