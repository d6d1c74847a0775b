"""The layers run one way: every import in the product code is checked against them.

Top to bottom (docs/architecture.md, "Layers"); a module imports only from its own layer
or below:

1. the CLI and the package facade: ``gcomp.cli``, ``gcomp.__main__``, ``gcomp``
2. the core: pipeline, verification, inputs, the runtime interface, backend choice,
   profiling runs, reports, distributed execution
3. ``gcomp.passes`` and ``gcomp.backends`` (neither imports the other)
4. ``gcomp.perf``: profile data, FLOPs, roofline, model statistics
5. ``gcomp.registry``, ``gcomp.io`` (with ``gcomp.compat``, its repairs of legacy models), ``gcomp.errors``,
   ``gcomp.deps`` (which optional packages and which ONNX Runtime build are installed)

On top of the order: a pass imports no runtime (onnxruntime, tvm, torch, mpi4py) and no
gcomp module but the registry, errors, io and other passes. Every import counts, also
those inside functions (lazy imports are still dependencies).

The module tree is read from the files (``passes/`` installs as ``gcomp.passes`` and
``backends/`` as ``gcomp.backends``), found from this file's own location.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGE_DIRS = {"gcomp": "gcomp", "passes": "gcomp.passes", "backends": "gcomp.backends"}

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("gcomp.cli", "gcomp.__main__", "gcomp")),  # "gcomp": the package facade only
    ("core", ("gcomp.pipeline", "gcomp.jobs", "gcomp.quantize", "gcomp.quantize_plan", "gcomp.quantize_regions", "gcomp.verify", "gcomp.inputs", "gcomp.runtime", "gcomp.autoselect",
              "gcomp.profiling", "gcomp.report", "gcomp.distributed", "gcomp.decode")),
    ("passes and backends", ("gcomp.passes", "gcomp.backends")),
    ("perf", ("gcomp.perf",)),
    ("base", ("gcomp.registry", "gcomp.io", "gcomp.compat", "gcomp.errors", "gcomp.deps")),
]
# Within the passes-and-backends layer the two sides never meet.
SEPARATE = (("gcomp.passes", "gcomp.backends"), ("gcomp.backends", "gcomp.passes"))
PASS_MAY_IMPORT = ("gcomp.passes", "gcomp.registry", "gcomp.errors", "gcomp.io")
RUNTIMES = ("onnxruntime", "tvm", "tvm_ffi", "torch", "mpi4py")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or (prefix != "gcomp" and name.startswith(prefix + "."))


def layer_of(module: str) -> int | None:
    """The index of the layer holding ``module`` (longest matching prefix), or None."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def product_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every product module by its installed name."""
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved.

    ``from a import b`` imports module ``a.b`` when there is one, else ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in modules else target, node.lineno))
    return out


def violations(root: Path = ROOT) -> list[str]:
    """Every import that runs against the layers, as ``file:line: what``."""
    modules = product_modules(root)
    found = []
    for module, path in modules.items():
        mine = layer_of(module)
        where = f"{path.relative_to(root)}"
        if mine is None:
            found.append(f"{where}: module {module} belongs to no layer")
            continue
        for target, line in imports_of(module, path, modules):
            found.extend(f"{where}:{line}: {module} imports {target}: {why}"
                         for why in _why_not(module, mine, target, modules))
    return sorted(set(found))


def _why_not(module: str, mine: int, target: str, modules: dict[str, Path]) -> list[str]:
    reasons = []
    ours = target == "gcomp" or target.startswith("gcomp.")
    if _within(module, "gcomp.passes"):
        if target.split(".")[0] in RUNTIMES:
            reasons.append("a pass never imports a runtime (it receives one through its context)")
        if ours and not any(_within(target, p) for p in PASS_MAY_IMPORT):
            reasons.append("a pass imports only gcomp.registry, gcomp.errors, gcomp.io and other passes")
    if not ours:
        return reasons
    theirs = layer_of(target)
    if theirs is not None and theirs < mine:
        reasons.append(f"layer '{LAYERS[mine][0]}' may not import the layer above it, '{LAYERS[theirs][0]}'")
    for a, b in SEPARATE:
        if _within(module, a) and _within(target, b):
            reasons.append(f"{a} never imports {b}")
    return reasons


def test_product_imports_follow_the_layers():
    assert product_modules(), f"no product modules found under {ROOT}"
    bad = violations()
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in PACKAGE_DIRS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # the registry reaching up into the passes (it must not load them itself)
        ({"gcomp/registry.py": "def load():\n    import gcomp.passes\n"}, "may not import the layer above"),
        # a pass driving a runtime, even lazily inside a function
        ({"passes/fold.py": "def run():\n    import onnxruntime\n"}, "never imports a runtime"),
        # a pass importing a backend through a relative import
        ({"passes/fusion/__init__.py": "", "passes/fusion/targets.py": "from ...backends import ort\n",
          "backends/ort.py": ""}, "never imports gcomp.backends"),
        # a pass reaching a core module
        ({"passes/precision.py": "from gcomp.verify import Tolerance\n", "gcomp/verify.py": ""},
         "a pass imports only"),
        # a backend running the pipeline
        ({"backends/tvm.py": "from gcomp.pipeline import optimize\n", "gcomp/pipeline.py": ""},
         "may not import the layer above"),
        # perf data reaching a pass helper
        ({"gcomp/perf/__init__.py": "", "gcomp/perf/flops.py": "from gcomp.passes import weightless\n",
          "passes/weightless.py": ""}, "may not import the layer above"),
        # a module nobody placed in a layer
        ({"gcomp/stray.py": ""}, "belongs to no layer"),
    ],
)
def test_a_planted_edge_against_the_layers_fails(tmp_path, files, expected):
    root = _plant(tmp_path, files)
    bad = violations(root)
    assert any(expected in v for v in bad), bad


def test_a_planted_tree_that_follows_the_layers_passes(tmp_path):
    root = _plant(tmp_path, {
        "gcomp/cli.py": "from gcomp import pipeline\n",
        "gcomp/pipeline.py": "from gcomp.passes import fold\nfrom gcomp.backends import ort\n",
        "passes/fold.py": "import numpy\nfrom gcomp.registry import register_pass\nfrom . import rewire\n",
        "passes/rewire.py": "",
        "backends/ort.py": "from gcomp.perf.profile import Profile\n",
        "gcomp/perf/__init__.py": "", "gcomp/perf/profile.py": "from gcomp import errors\n",
        "gcomp/registry.py": "", "gcomp/errors.py": "",
    })
    assert violations(root) == []
