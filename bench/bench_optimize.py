"""Benchmark ``gcomp optimize -O1`` (and ``-O3``) against onnxslim, onnxsim and onnxscript's optimizer.

Usage (from the repository root)::

    .venv/bin/python bench/bench_optimize.py                      # whole zoo, 3 repeats
    .venv/bin/python bench/bench_optimize.py --models cnn,light_resnet50 --repeat 1
    .venv/bin/python bench/bench_optimize.py --md bench/results.md --json bench/results.json
    .venv/bin/python bench/bench_optimize.py --big --models big --repeat 1   # the >2 GB model
    .venv/bin/python bench/bench_optimize.py --list               # the model names
    .venv/bin/python bench/bench_optimize.py --models torch_vad --merge --md bench/results.md --json bench/results.json
        # measure some models (or tools) again and merge them into the saved results

Every (tool, model, repeat) measurement runs in a fresh worker process (this script with
``--worker``). The worker imports only the tool under test, then times

* ``load``     reading the model file into the tool's in-memory form,
* ``optimize`` the tool's optimizer call alone,
* ``save``     writing the result,

and reports its own peak resident set size (``VmHWM``) both after the imports and at the
end. The parent also times the whole worker process (interpreter start-up, imports,
load, optimize, save, exit). The headline time is ``load+optimize+save``. A separate
worker (``gcomp-verify``) times ``gcomp.optimize(path, "O1", verify=True)`` to show what
gcomp's own verification costs. ``gcomp`` is pipeline O1; ``gcomp-O3`` is pipeline O3 (the
target ``ort-cpu``), both without verification.

The parent then counts the nodes of every saved output (main graph and all subgraphs,
per op type) and runs each output and the original on ONNX Runtime (CPU,
ORT_DISABLE_ALL) on the same seeded inputs, reporting the largest absolute difference:
an unverified speed-up is worthless (``--no-check`` skips this, for the big model).

This is a benchmark, not a test: it is not collected by the test suite.
"""

from __future__ import annotations

# Only the standard library at module level: the worker must not pay for imports that
# the tool under test does not need.
import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Measured tools, in table order. On request: "noop" (onnx-ir load + save) and
# "gcomp-grow" (O1 with no fold size limit: what gcomp leaves when the file may grow, as
# onnxslim's does, e.g. a "light" model's ConstantOfShape weights materialised).
TOOLS = ("gcomp", "gcomp-O3", "onnxslim", "onnxslim-nofuse", "onnxsim", "onnxscript")
EXTRA_TOOLS = ("noop", "gcomp-grow")
UNLIMITED_FOLD_BYTES = 1 << 40
# The module each tool needs; a tool whose module is missing is skipped with a note.
TOOL_MODULES = {
    "gcomp": "gcomp",
    "gcomp-O3": "gcomp",
    "gcomp-grow": "gcomp",
    "onnxslim": "onnxslim",
    "onnxslim-nofuse": "onnxslim",
    "onnxsim": "onnxsim",
    "onnxscript": "onnxscript",
    "noop": "onnx_ir",
}
INSTALL_HINTS = {
    "onnxslim": "pip install onnxslim, in the bench extra",
    "onnxsim": "pip install onnxsim, in the bench extra",
}
# The worker that times gcomp.optimize(path, "O1", verify=True) (the "verify s" column).
VERIFY_TOOL = "gcomp-verify"
RESULT_MARK = "BENCH_RESULT "
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "gcomp-bench-cache"

# Symbolic dimensions get these sizes when generating inputs (others get 1).
SYMBOLIC_DIMS = {"batch": 2, "seq": 16, "sequence": 16, "N": 2, "batch_size": 2,
                 # the audio and OCR models (models/export_subgraphs.py, models/control_flow.py)
                 "samples": 512, "frames": 64, "width": 128}
# Integer inputs (token ids) are drawn from [0, INT_HIGH), except those named here.
INT_HIGH = 1000
INT_HIGH_BY_NAME = {"token_type_ids": 2, "attention_mask": 2}
# Integer inputs that get one value: the sample rate of the audio models picks the branch
# of their If (16 kHz here; gcomp's own verification, on generated inputs, takes the other).
INT_VALUE_BY_NAME = {"sr": 16000}
# An output "matches" when allclose(out, ref, rtol=RTOL, atol=ATOL).
RTOL, ATOL = 1e-3, 1e-4

# The models exported from PyTorch by models/export_torch.py (zoo names torch_<name>).
TORCH_MODELS = ("bert", "gpt2", "resnet", "vit", "mobilenetv2")
# The exports of models/export_subgraphs.py: work in If/Loop bodies (scripted) or RNNs.
SUBGRAPH_TORCH_MODELS = {
    "vad": "scripted VAD: the whole network in each branch of an If on the sample rate",
    "gru_seqlen": "scripted GRU classifier with an If on the sequence length",
    "rnn_loop": "scripted GRU cell stepped by a Loop over frames",
    "audio_gru": "traced conv+GRU keyword-spotting classifier",
    "crnn": "traced CRNN text recogniser (conv stack, bidirectional LSTM)",
}
# The synthetic model over 2 GB (only with --big): BIG_LAYERS MatMul weights of
# BIG_HIDDEN x BIG_HIDDEN float32, 55.1 MB each, 2.2 GB in all, in a sparse data file.
BIG_LAYERS, BIG_HIDDEN = 40, 3712
BIG_VERSION = 1  # bump when the big model's graph changes (its cache is rebuilt)


# --------------------------------------------------------------------------- worker


def _peak_rss_kb() -> tuple[int, str]:
    """This process's peak resident set size in KiB, and where it was read from.

    On Linux ``getrusage(RUSAGE_SELF).ru_maxrss`` survives fork+exec: a worker started
    by a parent holding 300 MB reports at least 300 MB. ``VmHWM`` in /proc/self/status is
    the high-water mark of the current address space only, which exec replaces, so it is
    the worker's own peak. ru_maxrss is the fallback elsewhere (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]), "VmHWM"
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak // 1024 if sys.platform == "darwin" else peak), "ru_maxrss"


def _rss_now_kb() -> dict[str, int]:
    """Current anonymous / file-backed resident memory (Linux only; {} elsewhere).

    A memory-mapped weight file counts in RSS as file-backed pages (the kernel can drop
    them), while copies of the weights are anonymous: at the end of a run the split
    tells which kind a tool's peak was made of.
    """
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                for key in ("RssAnon", "RssFile"):
                    if line.startswith(key + ":"):
                        out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def _worker(tool: str, src: str, dst: str, external: bool = False) -> int:
    """Run one tool on one model in this (fresh) process; print one JSON line.

    ``external``: the input keeps its weights in external data (the big model); the
    output is then written with external data too (``<out>.data``), since a model over
    2 GB cannot be one protobuf.
    """
    t_start = time.perf_counter()
    out: dict = {"tool": tool}
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # tools chatter on stdout; keep it for the result line
    data_name = Path(dst).name + ".data"
    try:
        if tool in ("gcomp", "gcomp-O3", "gcomp-grow", VERIFY_TOOL):
            import gcomp
            import gcomp.io
            import gcomp.passes  # the pass registry: import cost belongs to "import", as for the peers
            import gcomp.pipeline

            verify = tool == VERIFY_TOOL
            marks: dict[str, float] = {}

            def progress(name, _round, _stats):
                now = time.perf_counter()
                if name.startswith("verify: running the original"):
                    marks.setdefault("reference", now)
                elif name.startswith("verify: running the optimized"):
                    marks.setdefault("check", now)
                else:
                    marks.setdefault("first_pass", now)

            def load():
                # Time what `gcomp optimize` does: gcomp.optimize(path) loads (and checks)
                # the file itself, which lets it skip re-checking the unchanged model;
                # Result.load_seconds splits load from optimize below.
                return src

            def optimize(path):
                level = "O3" if tool == "gcomp-O3" else "O1"
                grow = {"max_fold_bytes": UNLIMITED_FOLD_BYTES} if tool == "gcomp-grow" else {}
                result = gcomp.optimize(path, pipeline=level, verify=verify, progress=progress, **grow)
                if verify:
                    end = time.perf_counter()
                    v = result.verification
                    out["verification"] = v.status if v is not None else None
                    # The verification's own time: building the reference (ORT on the
                    # original) before the first pass, and checking after the last one.
                    if "reference" in marks and "check" in marks:
                        out["verify_s"] = (
                            marks.get("first_pass", marks["check"]) - marks["reference"]
                        ) + (end - marks["check"])
                return result

            def save(result):
                if not verify:  # the verify worker times optimize(verify=True) only
                    result.save(dst)

        elif tool in ("onnxslim", "onnxslim-nofuse"):
            import onnx
            import onnxslim

            kwargs = {}
            if tool == "onnxslim-nofuse":
                # Every registered pattern (Elimination* and Fusion*): what is left is
                # constant folding, dead-node elimination, CSE, weight tying and shape
                # inference (equivalent to skip_optimizations=["graph_fusion"]).
                from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

                kwargs["skip_fusion_patterns"] = list(DEFAULT_FUSION_PATTERNS)
                out["skipped_patterns"] = len(DEFAULT_FUSION_PATTERNS)

            def load():
                return onnx.load(src)

            def optimize(proto):
                return onnxslim.slim(proto, **kwargs)

            def save(proto):
                _onnx_save(onnx, proto, dst, data_name if external else None)

        elif tool == "onnxsim":
            import inspect

            import onnx
            import onnxsim

            # Over 2 GB a ModelProto cannot be serialized, so the C++ core cannot take
            # one: onnxsim takes the path and writes output_path itself (its documented
            # way for large models; load and save are then inside "optimize").
            by_path = external and "output_path" in inspect.signature(onnxsim.simplify).parameters

            def load():
                return src if by_path else onnx.load(src)

            def optimize(model):
                if by_path:
                    simplified, ok = onnxsim.simplify(model, output_path=dst)
                else:
                    simplified, ok = onnxsim.simplify(model)
                out["onnxsim_check"] = bool(ok)
                return simplified

            def save(proto):
                if not by_path:
                    _onnx_save(onnx, proto, dst, data_name if external else None)

        elif tool in ("onnxscript", "noop"):  # noop: onnx-ir load + save, the I/O floor
            import onnx_ir as ir

            if tool == "onnxscript":
                import onnxscript.optimizer

            def load():
                return ir.load(src)

            def optimize(model):
                if tool == "noop":
                    return model
                # With an ir.Model, optimize() runs optimize_ir in place and returns it.
                return onnxscript.optimizer.optimize(model)

            def save(model):
                if external:
                    ir.save(model, dst, external_data=data_name)
                else:
                    ir.save(model, dst)

        else:
            raise SystemExit(f"unknown tool {tool!r}")

        t_imported = time.perf_counter()
        out["import_s"] = t_imported - t_start
        out["rss_after_import_kb"], out["rss_source"] = _peak_rss_kb()
        t0 = time.perf_counter()
        model = load()
        t1 = time.perf_counter()
        model = optimize(model)
        t2 = time.perf_counter()
        if model is None:
            raise RuntimeError(f"{tool} returned no model")
        save(model)
        t3 = time.perf_counter()
        out.update(load_s=t1 - t0, optimize_s=t2 - t1, save_s=t3 - t2, total_s=t3 - t0)
        inner_load = getattr(model, "load_seconds", None)  # gcomp: load happened inside optimize
        if inner_load:
            out.update(load_s=t1 - t0 + inner_load, optimize_s=t2 - t1 - inner_load)
        out["peak_rss_kb"], _ = _peak_rss_kb()
        out["rss_end_kb"] = _rss_now_kb()
        out["ok"] = True
    except BaseException as e:  # noqa: BLE001  (report, don't crash: the parent shows it)
        out["ok"] = False
        text = str(e).strip().splitlines()
        out["error"] = f"{type(e).__name__}: {text[0] if text else ''}"[:300]
    finally:
        sys.stdout = real_stdout
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


def _onnx_save(onnx, proto, dst: str, data_name: str | None) -> None:
    """``onnx.save``, with every tensor over 1 KiB in ``data_name`` when it is given."""
    if data_name is None:
        onnx.save(proto, dst)
    else:
        onnx.save(
            proto,
            dst,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )


# --------------------------------------------------------------------------- zoo


def _light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


class Skip(Exception):
    """A model that cannot be built here (e.g. torch missing): reported, not fatal."""


# name -> (description, how to produce the file)
def _zoo() -> dict[str, tuple[str, object]]:
    zoo: dict[str, tuple[str, object]] = {
        "mlp": ("models.mlp.build()", ("build", "mlp", {})),
        "cnn": ("models.cnn.build()", ("build", "cnn", {})),
        "transformer": ("models.transformer.build()", ("build", "transformer", {})),
        "transformer_l6_h256": (
            "models.transformer.build(layers=6, hidden=256, heads=4, ffn=1024)",
            ("build", "transformer", {"layers": 6, "hidden": 256, "heads": 4, "ffn": 1024}),
        ),
        "default": ("models/default.onnx", ("file", REPO / "models" / "default.onnx")),
    }
    light = ("light_resnet50", "light_densenet121", "light_inception_v2", "light_shufflenet")
    for name in light:
        zoo[name] = (f"onnx wheel: backend/test/data/light/{name}.onnx", ("light", name))
    for name in light:
        zoo[f"{name}_rw"] = (
            f"{name} with its ConstantOfShape weights replaced by seeded random initializers",
            ("light_rw", name),
        )
    for name in TORCH_MODELS:
        zoo[f"torch_{name}"] = (
            f"models/export_torch.py {name}: TorchScript exporter, opset 17, random weights",
            ("torch", name),
        )
    zoo["control_flow"] = (
        (
            "models.control_flow.build(): If/Loop audio front end built as the TorchScript "
            "exporter writes scripted control flow"
        ),
        ("module", "control_flow", {}),
    )
    for name, what in SUBGRAPH_TORCH_MODELS.items():
        zoo[f"torch_{name}"] = (f"models/export_torch.py {name}: {what}", ("torch", name))
    big_gb = BIG_LAYERS * BIG_HIDDEN * BIG_HIDDEN * 4 / 1e9
    zoo["big"] = (
        (
            f"synthetic, {BIG_LAYERS} x [{BIG_HIDDEN}, {BIG_HIDDEN}] float32 MatMul weights "
            f"(~{big_gb:.1f} GB) in a sparse external data file, decomposed LayerNorms, "
            "Shape/Gather chains (only with --big)"
        ),
        ("big", None),
    )
    return zoo


BIG_MODELS = ("big",)  # left out of the default model list; need --big


def _materialize(name: str, spec, folder: Path, cache: Path, log=None) -> Path:
    kind = spec[0]
    if kind == "build":
        import onnx_ir as ir

        sys.path.insert(0, str(REPO))
        import models

        model = models.build(spec[1], **spec[2])
        path = folder / f"{name}.onnx"
        ir.save(model, path)
        return path
    if kind == "module":  # a models/ builder kept out of models.BUILDERS (models/<name>.py)
        import importlib

        import onnx_ir as ir

        sys.path.insert(0, str(REPO))
        path = folder / f"{name}.onnx"
        ir.save(importlib.import_module(f"models.{spec[1]}").build(**spec[2]), path)
        return path
    if kind == "file":
        return Path(spec[1])
    if kind == "light":
        return _light_dir() / f"{spec[1]}.onnx"
    if kind == "light_rw":
        path = folder / f"{name}.onnx"
        _random_weights(_light_dir() / f"{spec[1]}.onnx", path)
        return path
    if kind == "torch":
        return _torch_model(spec[1], cache / "torch", log)
    if kind == "big":
        return _big_model(cache / "big", log)
    raise ValueError(kind)


# --------------------------------------------------------------------------- torch models


def _torch_stamp() -> dict:
    """What a cached export depends on: the exporter's source and the library versions."""
    from importlib import metadata

    stamp = {
        f"{source}_sha256": hashlib.sha256((REPO / "models" / f"{source}.py").read_bytes()).hexdigest()
        for source in ("export_torch", "export_subgraphs", "_subgraph_nets")
    }
    for dist in ("torch", "transformers", "onnx"):
        try:
            stamp[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            stamp[dist] = None
    return stamp


def _torch_model(name: str, cache: Path, log=None) -> Path:
    """``cache/<name>.onnx``, exported by models/export_torch.py unless already cached.

    The export (and its ONNX Runtime vs PyTorch check) runs in a subprocess so the
    parent never imports torch; it writes into a temporary folder first, so an
    interrupted export leaves no half-written file in the cache. A cached file is
    reused while ``<name>.json`` beside it records the same exporter source and torch /
    transformers / onnx versions.
    """
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    stamp = _torch_stamp()
    path = cache / f"{name}.onnx"
    stamp_path = cache / f"{name}.json"
    if path.exists() and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return path
        except ValueError:
            pass
    if missing:
        raise Skip(
            f"{', '.join(missing)} not installed (pip install torch==2.13.0 transformers, "
            "the export extra)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"  exporting {name} with models/export_torch.py into {cache}")
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=cache) as tmp:
        proc = subprocess.run(
            [sys.executable, str(REPO / "models" / "export_torch.py"), name, "-o", tmp],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"export of {name} failed (exit {proc.returncode}): {tail[0]}")
        if log:
            for line in proc.stdout.strip().splitlines():
                log(f"    {line}")
        os.replace(Path(tmp) / f"{name}.onnx", path)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- big model


def _big_model(cache: Path, log=None) -> Path:
    """``cache/big.onnx`` + ``big.onnx.data``: a >2 GB model whose data file is sparse.

    The data file is created with ``truncate`` (holes read as zeros and take no disk
    space); only a few float32 values per weight are written, on its diagonal at
    offsets that differ from weight to weight, so no two weights are equal (identical
    all-zero weights would be merged by initializer deduplication and leave little to
    measure). Each of the BIG_LAYERS layers is

        y = LayerNorm(h) decomposed: ReduceMean, Sub, Mul, ReduceMean, Add(eps Constant),
            Sqrt, Div, Mul(gamma), Add(beta)
        m = MatMul(y, W_i) * (1 / Sqrt(Cast(Gather(Shape(W_i), 0))))      <- foldable
        m = Reshape(m, Concat(Gather(Shape(h), 0), Gather(Shape(h), 1),
                              Gather(Shape(W_i), 1)))                   <- symbolic + foldable
        h = h + Tanh(m)

    with each Gather index, Unsqueeze axis, epsilon and 1.0 a Constant node of its own
    (duplicates for CSE). Input ``x`` is float32 [batch, seq, BIG_HIDDEN].
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = cache / "big.onnx"
    data_name = "big.onnx.data"
    data_path = cache / data_name
    stamp_path = cache / "big.json"
    hidden, layers = BIG_HIDDEN, BIG_LAYERS
    weight_bytes = hidden * hidden * 4
    stamp = {"version": BIG_VERSION, "layers": layers, "hidden": hidden}
    if path.exists() and data_path.exists() and stamp_path.exists():
        try:
            if (
                json.loads(stamp_path.read_text()) == stamp
                and data_path.stat().st_size == layers * weight_bytes
            ):
                return path
        except ValueError:
            pass
    cache.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"  building big model ({layers * weight_bytes / 1e9:.2f} GB, sparse) in {cache}")
    rng = np.random.default_rng(0)

    # The sparse data file: truncate to size, then a few distinct values per weight.
    data_path.unlink(missing_ok=True)
    with open(data_path, "wb") as f:
        os.truncate(f.fileno(), layers * weight_bytes)
        for i in range(layers):
            base = i * weight_bytes
            for k in range(8):
                row = (k * (hidden // 8) + i) % hidden
                value = np.float32(0.5 + 0.01 * i + 0.001 * k).tobytes()
                os.pwrite(f.fileno(), value, base + (row * hidden + row) * 4)

    nodes, inits = [], []
    counter = Counter()

    def const(value, dtype=np.int64) -> str:
        counter["c"] += 1
        name = f"c{counter['c']}"
        nodes.append(
            helper.make_node(
                "Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype))
            )
        )
        return name

    def node(op, inputs, **attrs) -> str:
        counter[op] += 1
        name = f"{op.lower()}{counter[op]}"
        nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name

    h = "x"
    for i in range(layers):
        w = f"W{i}"
        t = TensorProto(name=w, data_type=TensorProto.FLOAT, dims=[hidden, hidden])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", data_name),
            ("offset", str(i * weight_bytes)),
            ("length", str(weight_bytes)),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        gamma = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        beta = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
        inits.append(numpy_helper.from_array(gamma, f"gamma{i}"))
        inits.append(numpy_helper.from_array(beta, f"beta{i}"))

        # LayerNorm, decomposed (opset 17: ReduceMean takes axes as an attribute).
        mean = node("ReduceMean", [h], axes=[-1], keepdims=1)
        d = node("Sub", [h, mean])
        var = node("ReduceMean", [node("Mul", [d, d])], axes=[-1], keepdims=1)
        std = node("Sqrt", [node("Add", [var, const(1e-5, np.float32)])])
        y = node("Add", [node("Mul", [node("Div", [d, std]), f"gamma{i}"]), f"beta{i}"])

        # MatMul scaled by 1/sqrt(fan_in), the scale computed from Shape(W): foldable.
        w_shape = node("Shape", [w])
        fan_in = node("Cast", [node("Gather", [w_shape, const(0)], axis=0)], to=TensorProto.FLOAT)
        scale = node("Div", [const(1.0, np.float32), node("Sqrt", [fan_in])])
        m = node("Mul", [node("MatMul", [y, w]), scale])

        # Reshape to (batch, seq, out): batch and seq from Shape(h) (symbolic), out from
        # Shape(W) (constant); a no-op reshape only shape reasoning can remove.
        h_shape = node("Shape", [h])
        dims = [
            node("Unsqueeze", [node("Gather", [h_shape, const(0)], axis=0), const([0])]),
            node("Unsqueeze", [node("Gather", [h_shape, const(1)], axis=0), const([0])]),
            node("Unsqueeze", [node("Gather", [w_shape, const(1)], axis=0), const([0])]),
        ]
        m = node("Reshape", [m, node("Concat", dims, axis=0)])
        h = node("Add", [h, node("Tanh", [m])])
    nodes.append(helper.make_node("Identity", [h], ["y"]))

    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # by path: also resolves the external data
    stamp_path.write_text(json.dumps(stamp) + "\n")
    return path


def _random_weights(src: Path, dst: Path, seed: int = 0) -> None:
    """Replace every ``ConstantOfShape(<initializer shape>)`` by a seeded random initializer.

    The "light" models keep their file small by computing every weight as
    ``ConstantOfShape(shape, value=0.02)``. That makes every output constant (a softmax
    of 1000 equal logits), so comparing outputs proves little, and it is not what an
    exported model looks like. This variant stores weights the usual way: 2-D and larger
    tensors ~ N(0, 1/fan_in), 1-D tensors (biases, BN scale/mean/var) ~ U(0.5, 1.5).
    (With 2/fan_in the logits grow so large that the softmax outputs are one-hot.)
    The graph is otherwise unchanged (IR version 3 keeps initializers listed as inputs).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    rng = np.random.default_rng(seed)
    keep, replaced_shapes = [], set()
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = [int(d) for d in numpy_helper.to_array(inits[node.input[0]])]
            if len(shape) >= 2:
                fan_in = int(np.prod(shape[1:])) or 1
                data = rng.normal(0.0, math.sqrt(1.0 / fan_in), size=shape)
            else:
                data = rng.uniform(0.5, 1.5, size=shape)
            value = node.attribute[0].t if node.attribute else None
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.data_type) if value else np.float32
            graph.initializer.append(numpy_helper.from_array(data.astype(dtype), node.output[0]))
            if proto.ir_version < 4:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(
                        node.output[0], onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape
                    )
                )
            replaced_shapes.add(node.input[0])
        else:
            keep.append(node)
    still_used = {i for n in keep for i in n.input}
    dead = replaced_shapes - still_used
    del graph.node[:]
    graph.node.extend(keep)
    for field in (graph.initializer, graph.input):
        alive = [x for x in field if x.name not in dead]
        del field[:]
        field.extend(alive)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))


# --------------------------------------------------------------------------- analysis


def count_nodes(path: Path) -> dict:
    """Nodes of the main graph plus all subgraphs (and, apart, of local functions),
    with the count per op type (``domain::op`` outside the default domain)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops: Counter = Counter()

    def walk(graph) -> int:
        total = 0
        for node in graph.node:
            total += 1
            ops[
                f"{node.domain}::{node.op_type}"
                if node.domain not in ("", "ai.onnx")
                else node.op_type
            ] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(walk(g) for g in attr.graphs)
        return total

    function_nodes = sum(len(f.node) for f in proto.functions)
    return {"nodes": walk(proto.graph), "function_nodes": function_nodes, "ops": dict(ops)}


def _external_files(path: Path) -> list[Path]:
    """The external data files a model refers to (main graph and subgraphs)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    files = set()
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                files.add(path.parent / location)
    return sorted(files)


def _file_bytes(path: Path) -> int:
    """The model file plus the external data files it refers to."""
    return path.stat().st_size + sum(f.stat().st_size for f in _external_files(path) if f.exists())


def _remove_model(path: Path) -> None:
    """Delete a tool's output and its external data files."""
    if not path.exists():
        return
    try:
        extra = _external_files(path)
    except Exception:  # noqa: BLE001  (an unreadable output: remove what we can)
        extra = []
    for f in (path, path.with_name(path.name + ".data"), *extra):
        f.unlink(missing_ok=True)


def _warm(path: Path) -> None:
    """Read the model and its data once, so the first tool timed does not pay the disk."""
    for f in (path, *_external_files(path)):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def make_inputs(path: Path, seed: int = 0) -> dict:
    """Seeded inputs for the graph inputs that are not initializers."""
    import numpy as np
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else SYMBOLIC_DIMS.get(d.dim_param, 1)
            for d in tt.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer) and inp.name in INT_VALUE_BY_NAME:
            feeds[inp.name] = np.full(shape, INT_VALUE_BY_NAME[inp.name], dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            high = INT_HIGH_BY_NAME.get(inp.name, INT_HIGH)
            feeds[inp.name] = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values))


def compare(ref: dict, got: dict) -> dict:
    import numpy as np

    worst = 0.0
    ok = True
    problems = []
    for name, r in ref.items():
        if name not in got:
            ok = False
            problems.append(f"output {name!r} missing")
            continue
        g = got[name]
        if g.shape != r.shape:
            ok = False
            problems.append(f"{name}: shape {g.shape} != {r.shape}")
            continue
        if r.size == 0:
            continue
        if np.issubdtype(r.dtype, np.floating):
            err = float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64))))
            if not np.allclose(g, r, rtol=RTOL, atol=ATOL, equal_nan=True):
                ok = False
        else:
            err = float(np.max(np.abs(g.astype(np.int64) - r.astype(np.int64))))
            ok = ok and err == 0
        worst = max(worst, err)
    # A reference whose every output is constant (the light models' softmax of equal
    # logits) proves little: say so next to the match.
    constant = all(r.size == 0 or bool(np.all(r == r.flat[0])) for r in ref.values())
    return {"match": ok, "max_abs_err": worst, "problems": problems, "constant_reference": constant}


# --------------------------------------------------------------------------- driver


def run_worker(tool: str, src: Path, dst: Path, timeout: float, external: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(src), str(dst)]
    if external:
        cmd.append("--external-data")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
        )
    except subprocess.TimeoutExpired:
        return {"tool": tool, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK) :])
            res["process_wall_s"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"tool": tool, "ok": False, "error": f"worker exit {proc.returncode}: {tail[0][:300]}"}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def tool_availability(tools) -> dict[str, str | None]:
    """None for a tool that can run here, else why not (its module is not installed)."""
    out = {}
    for tool in tools:
        module = TOOL_MODULES[tool]
        if importlib.util.find_spec(module) is None:
            hint = INSTALL_HINTS.get(module, f"pip install {module}")
            out[tool] = f"{module} not installed ({hint})"
        else:
            out[tool] = None
    return out


def _summarize_runs(runs: list[dict]) -> dict:
    good = [r for r in runs if r["ok"]]
    t: dict = {"runs": runs, "ok": bool(runs) and len(good) == len(runs)}
    if not t["ok"]:
        t["error"] = next((r["error"] for r in runs if not r["ok"]), "no run")
    if good:
        for key in (
            "import_s",
            "load_s",
            "optimize_s",
            "save_s",
            "total_s",
            "process_wall_s",
            "verify_s",
        ):
            t[key] = _median([r.get(key) for r in good])
        t["peak_rss_mb"] = _median([r["peak_rss_kb"] / 1024 for r in good])
        t["rss_after_import_mb"] = _median([r["rss_after_import_kb"] / 1024 for r in good])
        for key in ("RssAnon", "RssFile"):
            t[f"end_{key}_mb"] = _median([r.get("rss_end_kb", {}).get(key, 0) / 1024 for r in good])
    return t


def bench(
    model_names,
    tools,
    repeat,
    timeout,
    workdir: Path,
    seed: int,
    log,
    *,
    cache: Path = DEFAULT_CACHE,
    check: bool = True,
    verify_cost: bool = True,
    keep_outputs: bool = False,
) -> dict:
    zoo = _zoo()
    available = tool_availability(tools)
    results = {
        "meta": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "repeat": repeat,
            "tools": list(tools),
            "unavailable_tools": {t: why for t, why in available.items() if why},
            "versions": _versions(),
            "tolerance": {"rtol": RTOL, "atol": ATOL},
            "timed_unit": "load + optimize + save, in a fresh process per measurement",
            "check": check,
            "verify_cost": verify_cost and check and "gcomp" in tools,
        },
        "models": [],
    }
    for tool, why in available.items():
        if why:
            log(f"{tool}: skipped, {why}")
    for name in model_names:
        desc, spec = zoo[name]
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            src = _materialize(name, spec, folder, cache, log)
        except Skip as e:
            log(f"[{name}] skipped: {e}")
            results["models"].append(
                {"model": name, "source": desc, "skipped": str(e), "tools": {}}
            )
            continue
        external = bool(_external_files(src))
        entry = {
            "model": name,
            "source": desc,
            "input_path": str(src),
            "input_bytes": _file_bytes(src),
            "external_data": external,
            **{f"input_{k}": v for k, v in count_nodes(src).items()},
            "tools": {},
        }
        log(f"[{name}] {entry['input_nodes']} nodes, {entry['input_bytes'] / 1e6:.2f} MB")
        _warm(src)
        feeds = make_inputs(src, seed)
        reference = None
        entry["reference_error"] = None
        if check:
            try:
                reference = run_ort(src, feeds)
            except Exception as e:  # noqa: BLE001  (any ORT failure: report it, skip verification)
                entry["reference_error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
                log(f"  original does not run on ORT: {entry['reference_error']}")
        for tool in tools:
            if available[tool]:
                entry["tools"][tool] = {"ok": False, "skipped": available[tool]}
                continue
            dst = folder / f"{name}.{tool}.onnx"
            runs = []
            for _ in range(repeat):
                _remove_model(dst)
                res = run_worker(tool, src, dst, timeout, external)
                runs.append(res)
                if not res["ok"]:
                    break
            t = _summarize_runs(runs)
            if not t["ok"]:
                log(f"  {tool:<15} FAILED: {t['error']}")
            if t["ok"] and dst.exists():
                t["output_bytes"] = _file_bytes(dst)
                t.update(count_nodes(dst))
                if reference is not None:
                    try:
                        t["verify"] = compare(reference, run_ort(dst, feeds))
                    except Exception as e:  # noqa: BLE001  (an output ORT rejects is a mismatch)
                        t["verify"] = {
                            "match": False,
                            "max_abs_err": None,
                            "problems": [f"ORT: {type(e).__name__}: {str(e).strip()[:200]}"],
                        }
                msg = f"  {tool:<15} {t['total_s']:.3f} s (optimize {t['optimize_s']:.3f} s), "
                msg += f"{t['peak_rss_mb']:.0f} MB, {t['nodes']} nodes"
                if "verify" in t:
                    v = t["verify"]
                    msg += f", match={v['match']} err={v['max_abs_err']}"
                log(msg)
            elif t["ok"]:
                t["ok"] = False
                t["error"] = "no output file written"
                log(f"  {tool:<15} FAILED: {t['error']}")
            if not keep_outputs:
                _remove_model(dst)
            entry["tools"][tool] = t
        if results["meta"]["verify_cost"] and not available.get("gcomp"):
            runs = []
            for _ in range(repeat):
                res = run_worker(VERIFY_TOOL, src, folder / "unused.onnx", timeout, external)
                runs.append(res)
                if not res["ok"]:
                    break
            v = _summarize_runs(runs)
            v["verification"] = next((r.get("verification") for r in runs if r["ok"]), None)
            entry["gcomp_verify"] = v
            if v["ok"]:
                log(
                    f"  {'gcomp verify':<15} optimize(verify=True) {v['optimize_s']:.3f} s, "
                    f"of which verification {_f(v.get('verify_s'))} s, "
                    f"{v['peak_rss_mb']:.0f} MB, {v['verification']}"
                )
            else:
                log(f"  {'gcomp verify':<15} FAILED: {v['error']}")
        results["models"].append(entry)
    _ratios(results)
    return results


def _ratios(results: dict) -> None:
    """Peer time / gcomp time and peer nodes vs gcomp nodes, per model, plus geometric means."""
    per_tool: dict[str, dict[str, list[float]]] = {}
    for entry in results["models"]:
        base = entry["tools"].get("gcomp")
        for tool, t in entry["tools"].items():
            if tool == "gcomp" or not base or not base.get("ok") or not t.get("ok"):
                continue
            r = {}
            for key in ("total_s", "optimize_s", "process_wall_s", "peak_rss_mb"):
                if t.get(key) and base.get(key):
                    r[key] = t[key] / base[key]
            if "nodes" in t and "nodes" in base:
                r["nodes_diff"] = t["nodes"] - base["nodes"]
                r["nodes"] = t["nodes"] / base["nodes"] if base["nodes"] else None
            t["vs_gcomp"] = r
            acc = per_tool.setdefault(tool, {})
            for key, v in r.items():
                if key != "nodes_diff" and v:
                    acc.setdefault(key, []).append(v)
    results["geomean_vs_gcomp"] = {
        tool: {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in acc.items()}
        for tool, acc in per_tool.items()
    }


def _run_meta(results: dict) -> dict:
    meta = results["meta"]
    return {
        "command": meta.get("command"),
        "repeat": meta["repeat"],
        "tools": list(meta["tools"]),
        "models": [e["model"] for e in results["models"]],
        "bench_seconds": meta.get("bench_seconds"),
        "unavailable_tools": dict(meta.get("unavailable_tools", {})),
    }


def merge_results(old: dict, new: dict, order: list[str]) -> dict:
    """``new``'s measurements put into ``old``: each model measured again gets the cells of
    the tools measured now (and its verification cost, when measured now) replaced; other
    cells and models stay, and so does a cell of a tool that could not run now. Models follow the zoo's order; ``meta["runs"]`` lists every run
    that made the cells (command, repeats, tools, models); ratios are computed again."""
    by_name = {e["model"]: e for e in old["models"]}
    for e in new["models"]:
        kept = by_name.get(e["model"])
        if kept is None or kept.get("skipped"):
            by_name[e["model"]] = e
        elif not e.get("skipped"):
            fields = {k: v for k, v in e.items() if k != "tools"}
            # A tool that could not run now (not installed) keeps its earlier cell.
            fresh = {t: x for t, x in e["tools"].items() if not x.get("skipped") or t not in kept["tools"]}
            by_name[e["model"]] = {**kept, **fields, "tools": {**kept["tools"], **fresh}}
    names = [n for n in order if n in by_name] + [n for n in by_name if n not in order]
    measured = {t for e in by_name.values() for t in e["tools"]}
    ran = {t for e in by_name.values() for t, x in e["tools"].items() if not x.get("skipped")}
    missing = {**old["meta"].get("unavailable_tools", {}), **new["meta"].get("unavailable_tools", {})}
    meta = {
        **old["meta"],
        **{k: new["meta"][k] for k in ("python", "platform", "cpus", "versions")},
        "tools": [t for t in (*TOOLS, *EXTRA_TOOLS) if t in measured],
        # Missing from every run only; a run's own gaps are listed with the run.
        "unavailable_tools": {t: why for t, why in missing.items() if t not in ran},
        "runs": [*(old["meta"].get("runs") or [_run_meta(old)]), _run_meta(new)],
    }
    merged = {"meta": meta, "models": [by_name[n] for n in names]}
    _ratios(merged)
    return merged


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in (
        "gcomp",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxslim",
        "onnxsim",
        "onnxruntime-gpu",
        "onnxruntime",
        "numpy",
        "torch",
        "transformers",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- report


def _f(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def _match_cell(t: dict) -> str:
    if not t:  # a tool measured on other models only (e.g. gcomp-grow, asked for on a few)
        return "—"
    if t.get("skipped"):
        return "n/a"
    if not t.get("ok"):
        return "error"
    v = t.get("verify")
    if v is None:
        return "unchecked"
    if v["max_abs_err"] is None:
        return "✗ " + "; ".join(v["problems"])[:60]
    mark = "✓" if v["match"] else "✗"
    extra = (" " + "; ".join(v["problems"])[:60]) if v["problems"] else ""
    if v.get("constant_reference"):
        extra += " (const ref)"
    return f"{mark} {v['max_abs_err']:.1e}{extra}"


def _cell_status(x: dict) -> str | None:
    """'—' for a tool not run on this model, 'n/a' for a skipped tool, 'error' for a failed one,
    None when there are figures."""
    if not x:
        return "—"
    if x.get("skipped"):
        return "n/a"
    if not x.get("ok"):
        return "error"
    return None


def _table(lines: list[str], head: list[str], rows: list[list[str]], left: int = 1) -> None:
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|")
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")


def _op_diff(base_ops: dict, ops: dict) -> list[tuple[str, int, int]]:
    """(op, gcomp count, peer count) for every op type whose counts differ."""
    keys = set(base_ops) | set(ops)
    diff = [
        (k, base_ops.get(k, 0), ops.get(k, 0)) for k in keys if base_ops.get(k, 0) != ops.get(k, 0)
    ]
    return sorted(diff, key=lambda d: (d[2] - d[1], d[0]))


def _against_onnxslim(lines: list[str], measured: list[dict]) -> None:
    """Nodes after gcomp O1 and O3 next to onnxslim's default output, per model; and, where
    measured (``--tools gcomp-grow``), O1 with no fold size limit."""
    lines.append("### gcomp O1 and O3 against onnxslim's default output (nodes left)")
    lines.append("")
    grow = any("nodes" in e["tools"].get("gcomp-grow", {}) for e in measured)
    tools = ("gcomp", "gcomp-O3", "gcomp-grow") if grow else ("gcomp", "gcomp-O3")
    rows, above = [], {t: [] for t in tools}
    for e in measured:
        slim = e["tools"].get("onnxslim", {}).get("nodes")
        row = [e["model"], str(e["input_nodes"]), "—" if slim is None else str(slim)]
        for tool in tools:
            n = e["tools"].get(tool, {}).get("nodes")
            if n is None or slim is None:
                row += ["—" if n is None else str(n), "—"]
                continue
            row += [str(n), f"{n - slim:+d}"]
            if n > slim:
                above[tool].append(f"{e['model']} ({n - slim:+d})")
        rows.append(row)
    head = ["model", "nodes in", "onnxslim", "gcomp O1", "O1 − onnxslim", "gcomp O3", "O3 − onnxslim"]
    if grow:
        head += ["O1, no size limit", "− onnxslim"]
    _table(lines, head, rows)
    labels = {"gcomp": "O1", "gcomp-O3": "O3", "gcomp-grow": "O1 with no fold size limit"}
    for tool in tools:
        lines.append(f"* {labels[tool]} above onnxslim: " + (", ".join(above[tool]) or "none") + ".")
    lines.append("")
    lines.append("(— : not measured; O3 figures come from runs with `--tools gcomp-O3`, the last two columns from "
                 f"`--tools gcomp-grow`: O1 with `--set max_fold_bytes={UNLIMITED_FOLD_BYTES}`, so a folded output may "
                 "grow the file, as onnxslim's folding does.)")
    lines.append("")


def markdown(results: dict, command: str | None = None) -> str:
    meta = results["meta"]
    tools = meta["tools"]
    peers = [t for t in tools if t != "gcomp"]
    models = results["models"]
    measured = [e for e in models if not e.get("skipped")]
    lines = []
    vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    runs = meta.get("runs", [])
    if len(runs) > 1:
        lines.append(
            f"Cells from {len(runs)} runs of the bench (each cell: the median of its run's "
            f"fresh-process repeats); {meta['cpus']} CPUs; Python {meta['python']}; {vers}."
        )
        lines.append("")
        for run in runs:
            gaps = "".join(f"; {t} not measured: {why}" for t, why in run.get("unavailable_tools", {}).items())
            lines.append(
                f"* `{run['command']}`: {run['repeat']} repeat(s); tools {', '.join(run['tools'])}; "
                f"models {', '.join(run['models'])}{gaps}"
            )
    else:
        lines.append(
            f"Median of {meta['repeat']} fresh-process run(s) per cell; {meta['cpus']} CPUs; "
            f"Python {meta['python']}; {vers}."
        )
        if command:
            lines.append(f"Command: `{command}`")
    lines.append("")
    notes = [f"`{t}` not measured: {why}." for t, why in meta.get("unavailable_tools", {}).items()]
    notes += [f"`{e['model']}` skipped: {e['skipped']}." for e in models if e.get("skipped")]
    if not meta.get("check", True):
        notes.append(
            "Outputs not run on ONNX Runtime (`--no-check`): the match columns say 'unchecked'."
        )
    for note in notes:
        lines.append(f"* {note}")
    if notes:
        lines.append("")

    def tool_cells(e, fn):
        return [_cell_status(e["tools"].get(t, {})) or fn(e["tools"][t], t) for t in tools]

    # Time.
    has_verify = any("gcomp_verify" in e for e in measured)
    lines.append("### Time: load+optimize+save, seconds (median)")
    lines.append("")
    head = ["model", "nodes in", "MB in"] + [f"{t} s" for t in tools]
    if has_verify:
        head.append("gcomp verify s")
    rows = []
    for e in measured:

        def time_cell(x, t):
            cell = _f(x.get("total_s"))
            r = x.get("vs_gcomp", {}).get("total_s")
            return cell + (f" ({r:.2f}×)" if r else "")

        row = [e["model"], str(e["input_nodes"]), f"{e['input_bytes'] / 1e6:.1f}"]
        row += tool_cells(e, time_cell)
        if has_verify:
            v = e.get("gcomp_verify")
            row.append(_f(v.get("verify_s")) if v and v.get("ok") else ("error" if v else "—"))
        rows.append(row)
    _table(lines, head, rows)
    text = "`(N×)` = peer time / gcomp time (above 1: gcomp is faster). "
    if has_verify:
        text += (
            "**gcomp verify s** = what `verify=True` adds: the time gcomp.optimize(path, "
            '"O1", verify=True) spends building the reference on ONNX Runtime and checking '
            "the result (separate worker; see *Verification cost* below)."
        )
    lines.append(text)
    lines.append("")

    # Nodes.
    lines.append("### Nodes left (main graph and subgraphs)")
    lines.append("")
    head = ["model", "nodes in"] + list(tools)
    rows = []
    for e in measured:
        base = e["tools"].get("gcomp", {})

        def node_cell(x, t, base=base):
            if "nodes" not in x:
                return "—"
            cell = str(x["nodes"])
            if t != "gcomp" and "nodes" in base:
                cell += f" ({x['nodes'] - base['nodes']:+d})"
            return cell

        rows.append([e["model"], str(e["input_nodes"])] + tool_cells(e, node_cell))
    _table(lines, head, rows)
    lines.append(
        "`(±N)` = peer nodes − gcomp nodes (negative: the peer's output is smaller). "
        "Per-op differences: *Where a peer leaves fewer nodes* below. Nodes are counted in "
        "the main graph and, recursively, in every If/Loop/Scan body (`count_nodes`); "
        "the nodes of model-local functions are counted apart."
    )
    lines.append("")
    if "gcomp-O3" in tools and "onnxslim" in tools:
        _against_onnxslim(lines, measured)

    # Memory.
    lines.append("### Peak RSS of the worker, MB (VmHWM: interpreter and imports included)")
    lines.append("")
    head = ["model", "MB in"] + list(tools)
    if has_verify:
        head.append("gcomp verify=True")
    rows = []
    for e in measured:

        def mem_cell(x, t, e=e):
            cell = _f(x.get("peak_rss_mb"), "{:.0f}")
            if e["input_bytes"] > 100e6:
                cell += f" ({x['peak_rss_mb'] * 2**20 / e['input_bytes']:.2f}× size)"
            return cell

        row = [e["model"], f"{e['input_bytes'] / 1e6:.1f}"] + tool_cells(e, mem_cell)
        if has_verify:
            v = e.get("gcomp_verify")
            row.append(_f(v.get("peak_rss_mb"), "{:.0f}") if v and v.get("ok") else "—")
        rows.append(row)
    _table(lines, head, rows)
    lines.append(
        "`(N× size)` (inputs over 100 MB) = peak RSS / model size on disk (weights included)."
    )
    lines.append("")

    # Match.
    lines.append(
        f"### Match against the original on ONNX Runtime (ORT_DISABLE_ALL), "
        f"allclose(rtol={RTOL:g}, atol={ATOL:g}), largest absolute difference"
    )
    lines.append("")
    head = ["model"] + list(tools)
    rows = [[e["model"]] + [_match_cell(e["tools"].get(t, {})) for t in tools] for e in measured]
    _table(lines, head, rows)

    # Verification cost.
    if has_verify:
        lines.append("### Verification cost (gcomp)")
        lines.append("")
        head = [
            "model",
            "O1 verify=False: optimize s",
            "O1 verify=True: optimize s",
            "of which verification s",
            "verification / O1",
            "peak RSS MB, verify=False",
            "peak RSS MB, verify=True",
            "status",
        ]
        rows = []
        for e in measured:
            v, g = e.get("gcomp_verify"), e["tools"].get("gcomp", {})
            if not v:
                continue
            if not v.get("ok"):
                rows.append([e["model"]] + ["—"] * 6 + [f"error: {v.get('error', '?')[:60]}"])
                continue
            plain = g.get("optimize_s")
            vs = v.get("verify_s")
            rows.append(
                [
                    e["model"],
                    _f(plain),
                    _f(v.get("optimize_s")),
                    _f(vs),
                    _f(vs / plain if vs and plain else None, "{:.1f}×"),
                    _f(g.get("peak_rss_mb"), "{:.0f}"),
                    _f(v.get("peak_rss_mb"), "{:.0f}"),
                    str(v.get("verification")),
                ]
            )
        _table(lines, head, rows)
        lines.append(
            'optimize s = the `gcomp.optimize(path, "O1", ...)` call less its load (no save). '
            "Verification = building the reference (ORT session on the original, run on "
            "generated inputs) before the first pass plus checking the optimized model after "
            "the last one (measured from gcomp's progress callback)."
        )
        lines.append("")

    # Where the peers leave fewer nodes.
    lines.append("### Where a peer leaves fewer nodes than gcomp (op type: gcomp → peer)")
    lines.append("")
    any_diff = False
    for e in measured:
        base = e["tools"].get("gcomp", {})
        if "ops" not in base:
            continue
        for t in peers:
            x = e["tools"].get(t, {})
            if t.startswith("gcomp") or "ops" not in x or x["nodes"] >= base["nodes"]:
                continue
            diff = _op_diff(base["ops"], x["ops"])
            fewer = [f"{op} {a}→{b}" for op, a, b in diff if b < a]
            more = [f"{op} {a}→{b}" for op, a, b in diff if b > a]
            text = f"* **{e['model']}**, {t} ({x['nodes'] - base['nodes']:+d}): " + ", ".join(fewer)
            if more:
                text += "; more: " + ", ".join(more)
            lines.append(text)
            any_diff = True
    if not any_diff:
        lines.append("None: gcomp leaves the fewest nodes on every model.")
    lines.append("")

    # Detailed long table.
    lines.append("### Details (medians, seconds)")
    lines.append("")
    head = [
        "model",
        "tool",
        "import",
        "load",
        "optimize",
        "save",
        "load+opt+save",
        "process wall",
        "× gcomp (l+o+s)",
        "× gcomp (opt)",
        "RSS after import MB",
        "peak RSS MB",
        "peak / size",
        "end anon / file MB",
        "nodes",
        "out MB",
        "match (max abs err)",
    ]
    rows = []
    for e in measured:
        for t in tools:
            x = e["tools"].get(t, {})
            r = x.get("vs_gcomp", {})
            if x.get("skipped"):
                continue
            if not x.get("ok") and "total_s" not in x:
                rows.append(
                    [e["model"], t]
                    + ["—"] * (len(head) - 3)
                    + [f"error: {x.get('error', '?')[:80]}"]
                )
                continue
            rows.append(
                [
                    e["model"],
                    t,
                    _f(x.get("import_s")),
                    _f(x.get("load_s")),
                    _f(x.get("optimize_s")),
                    _f(x.get("save_s")),
                    _f(x.get("total_s")),
                    _f(x.get("process_wall_s")),
                    _f(r.get("total_s"), "{:.2f}") if t != "gcomp" else "1",
                    _f(r.get("optimize_s"), "{:.2f}") if t != "gcomp" else "1",
                    _f(x.get("rss_after_import_mb"), "{:.0f}"),
                    _f(x.get("peak_rss_mb"), "{:.0f}"),
                    _f(
                        x["peak_rss_mb"] * 2**20 / e["input_bytes"]
                        if x.get("peak_rss_mb") and e["input_bytes"] > 100e6
                        else None,
                        "{:.2f}",
                    ),
                    f"{_f(x.get('end_RssAnon_mb'), '{:.0f}')} / {_f(x.get('end_RssFile_mb'), '{:.0f}')}",
                    str(x.get("nodes", "—"))
                    + (
                        f" (+{x['function_nodes']} in functions)" if x.get("function_nodes") else ""
                    ),
                    _f(x["output_bytes"] / 1e6 if "output_bytes" in x else None, "{:.2f}"),
                    _match_cell(x),
                ]
            )
    _table(lines, head, rows, left=2)
    lines.append(
        "peak / size = peak RSS / model size on disk (inputs over 100 MB only). "
        "end anon / file = anonymous and file-backed resident memory at the end of the run "
        "(after the save): memory-mapped weights count as file-backed."
    )
    lines.append("")

    gm = results.get("geomean_vs_gcomp", {})
    if gm:
        lines.append("### Geometric mean over models, peer / gcomp (O1)")
        lines.append("")
        head = ["tool", "load+opt+save", "optimize", "process wall", "peak RSS", "nodes"]
        rows = []
        for t in peers:
            g = gm.get(t, {})
            if not g:
                continue
            keys = ("total_s", "optimize_s", "process_wall_s", "peak_rss_mb", "nodes")
            rows.append([t] + [_f(g.get(k), "{:.2f}×") for k in keys])
        _table(lines, head, rows)
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        rest = argv[1:]
        external = "--external-data" in rest
        rest = [a for a in rest if a != "--external-data"]
        if len(rest) != 3:
            raise SystemExit("usage: bench_optimize.py --worker TOOL IN OUT [--external-data]")
        return _worker(*rest, external=external)

    zoo = _zoo()
    default_models = [m for m in zoo if m not in BIG_MODELS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        help="comma-separated model names (see --list); default: every model but 'big' "
        "(and 'big' too with --big)",
    )
    p.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help="comma-separated: " + ", ".join(TOOLS) + ", noop (onnx-ir load+save floor)",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="fresh-process runs per cell; the median is reported"
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    p.add_argument("--md", type=Path, help="also write the Markdown report here")
    p.add_argument("--json", type=Path, help="write all measurements as JSON here")
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep built models and every tool's output here (default: a temp dir, "
        "outputs deleted once measured)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where exported torch models and the big model are kept between runs "
        f"(default: {DEFAULT_CACHE})",
    )
    p.add_argument(
        "--big",
        action="store_true",
        help="allow the >2 GB model 'big' (writes ~2.2 GB per tool; default off)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="do not run the original and the outputs on ONNX Runtime (nor time gcomp's "
        "verify=True): for the big model",
    )
    p.add_argument(
        "--no-verify-cost",
        action="store_true",
        help="do not time gcomp.optimize(verify=True) (the 'gcomp verify s' column)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge into the results saved in --json: the models measured now replace their "
        "cells of the tools measured now; every other cell stays (--md then reports all)",
    )
    p.add_argument(
        "--md-only",
        action="store_true",
        help="measure nothing: write --md from the results saved in --json",
    )
    p.add_argument("--list", action="store_true", help="list the model names and exit")
    args = p.parse_args(argv)

    if args.list:
        for name, (desc, _) in zoo.items():
            print(f"{name:<22} {desc}")
        return 0
    if args.md_only:
        if args.json is None or args.md is None or not args.json.is_file():
            p.error("--md-only needs --json FILE (saved results) and --md FILE")
        saved = json.loads(args.json.read_text())
        args.md.write_text(markdown(saved, saved["meta"].get("command")) + "\n")
        return 0
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        names = default_models + (list(BIG_MODELS) if args.big else [])
    unknown = [m for m in names if m not in zoo]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(zoo)}")
    big = [m for m in names if m in BIG_MODELS]
    if big and not args.big:
        p.error(f"{', '.join(big)}: over 2 GB, written once per tool and repeat; add --big")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in (*TOOLS, *EXTRA_TOOLS)]
    if bad:
        p.error(f"unknown tool(s) {', '.join(bad)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.merge and (args.json is None or not args.json.is_file()):
        p.error("--merge needs --json FILE holding earlier results")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    exe = Path(sys.executable)
    exe_text = os.path.relpath(exe, REPO) if exe.is_relative_to(REPO) else "python"
    command = " ".join([exe_text, "bench/bench_optimize.py", *argv])
    options = {
        "cache": args.cache,
        "check": not args.no_check,
        "verify_cost": not args.no_verify_cost,
        "keep_outputs": args.workdir is not None,
    }
    t0 = time.perf_counter()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = bench(
            names, tools, args.repeat, args.timeout, args.workdir, args.seed, log, **options
        )
    else:
        with tempfile.TemporaryDirectory(prefix="gcomp-bench-") as tmp:
            results = bench(
                names, tools, args.repeat, args.timeout, Path(tmp), args.seed, log, **options
            )
    results["meta"]["bench_seconds"] = time.perf_counter() - t0
    results["meta"]["command"] = command
    log(f"bench finished in {results['meta']['bench_seconds']:.0f} s")
    if args.merge:
        results = merge_results(json.loads(args.json.read_text()), results, list(zoo))

    md = markdown(results, command)
    print(md)
    if args.md:
        args.md.write_text(md + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    # Exit 1 only when gcomp itself failed or its output does not match; the peers'
    # failures and mismatches are results, shown in the table.
    failed = any(
        not t.get("ok") or (t.get("verify") and not t["verify"]["match"])
        for e in results["models"]
        for name, t in e["tools"].items()
        if name.startswith("gcomp")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
