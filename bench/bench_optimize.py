"""Benchmark ``gcomp optimize -O1`` against onnxslim and onnxscript's optimizer.

Usage (from the repository root)::

    .venv/bin/python bench/bench_optimize.py                      # whole zoo, 3 repeats
    .venv/bin/python bench/bench_optimize.py --models cnn,light_resnet50 --repeat 1
    .venv/bin/python bench/bench_optimize.py --md bench/results.md --json bench/results.json
    .venv/bin/python bench/bench_optimize.py --list               # the model names

Every (tool, model, repeat) measurement runs in a fresh worker process (this script with
``--worker``). The worker imports only the tool under test, then times

* ``load``     reading the model file into the tool's in-memory form,
* ``optimize`` the tool's optimizer call alone,
* ``save``     writing the result,

and reports its own ``ru_maxrss`` (peak resident set size) both after the imports and
at the end. The parent also times the whole worker process (interpreter start-up,
imports, load, optimize, save, exit). The headline time is ``load+optimize+save``.

The parent then counts the nodes of every saved output (main graph and all subgraphs)
and runs each output and the original on ONNX Runtime (CPU, ORT_DISABLE_ALL) on the same
seeded inputs, reporting the largest absolute difference: an unverified speed-up is
worthless.

This is a benchmark, not a test: it is not collected by the test suite.
"""

from __future__ import annotations

# Only the standard library at module level: the worker must not pay for imports that
# the tool under test does not need.
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("gcomp", "onnxslim", "onnxscript")
RESULT_MARK = "BENCH_RESULT "

# Symbolic dimensions get these sizes when generating inputs (others get 1).
SYMBOLIC_DIMS = {"batch": 2, "seq": 16, "sequence": 16, "N": 2, "batch_size": 2}
# Integer inputs (token ids) are drawn from [0, INT_HIGH).
INT_HIGH = 1000
# An output "matches" when allclose(out, ref, rtol=RTOL, atol=ATOL).
RTOL, ATOL = 1e-3, 1e-4


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


def _worker(tool: str, src: str, dst: str) -> int:
    """Run one tool on one model in this (fresh) process; print one JSON line."""
    t_start = time.perf_counter()
    out: dict = {"tool": tool}
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # tools chatter on stdout; keep it for the result line
    try:
        if tool == "gcomp":
            import gcomp
            import gcomp.io
            import gcomp.pipeline  # import cost belongs to "import", not "optimize"

            def load():
                # Time what `gcomp optimize` does: gcomp.optimize(path) loads (and checks)
                # the file itself, which lets it skip re-checking the unchanged model;
                # Result.load_seconds splits load from optimize below.
                return src

            def optimize(path):
                return gcomp.optimize(path, pipeline="O1", verify=False)

            def save(result):
                result.save(dst)

        elif tool == "onnxslim":
            import onnx
            import onnxslim

            def load():
                return onnx.load(src)

            def optimize(proto):
                return onnxslim.slim(proto)

            def save(proto):
                onnx.save(proto, dst)

        elif tool == "onnxscript":
            import onnx_ir as ir
            import onnxscript.optimizer

            def load():
                return ir.load(src)

            def optimize(model):
                # With an ir.Model, optimize() runs optimize_ir in place and returns it.
                return onnxscript.optimizer.optimize(model)

            def save(model):
                ir.save(model, dst)

        elif tool == "noop":  # load + save with onnx-ir, no optimization: the I/O floor
            import onnx_ir as ir

            def load():
                return ir.load(src)

            def optimize(model):
                return model

            def save(model):
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
        out["ok"] = True
    except BaseException as e:  # noqa: BLE001  (report, don't crash: the parent shows it)
        out["ok"] = False
        text = str(e).strip().splitlines()
        out["error"] = f"{type(e).__name__}: {text[0] if text else ''}"[:300]
    finally:
        sys.stdout = real_stdout
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


# --------------------------------------------------------------------------- zoo


def _light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


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
    return zoo


def _materialize(name: str, spec, folder: Path) -> Path:
    kind = spec[0]
    if kind == "build":
        import onnx_ir as ir

        sys.path.insert(0, str(REPO))
        import models

        model = models.build(spec[1], **spec[2])
        path = folder / f"{name}.onnx"
        ir.save(model, path)
        return path
    if kind == "file":
        return Path(spec[1])
    if kind == "light":
        return _light_dir() / f"{spec[1]}.onnx"
    if kind == "light_rw":
        path = folder / f"{name}.onnx"
        _random_weights(_light_dir() / f"{spec[1]}.onnx", path)
        return path
    raise ValueError(kind)


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


def count_nodes(path: Path) -> dict[str, int]:
    """Nodes of the main graph plus all subgraphs (and, apart, of local functions)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def walk(graph) -> int:
        total = 0
        for node in graph.node:
            total += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(walk(g) for g in attr.graphs)
        return total

    function_nodes = sum(len(f.node) for f in proto.functions)
    return {"nodes": walk(proto.graph), "function_nodes": function_nodes}


def _file_bytes(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


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
        if np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(0, INT_HIGH, size=shape).astype(dtype)
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


def run_worker(tool: str, src: Path, dst: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(src), str(dst)]
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


def bench(model_names, tools, repeat, timeout, workdir: Path, seed: int, log) -> dict:
    zoo = _zoo()
    results = {
        "meta": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "repeat": repeat,
            "tools": list(tools),
            "versions": _versions(),
            "tolerance": {"rtol": RTOL, "atol": ATOL},
            "timed_unit": "load + optimize + save, in a fresh process per measurement",
        },
        "models": [],
    }
    for name in model_names:
        desc, spec = zoo[name]
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        src = _materialize(name, spec, folder)
        entry = {
            "model": name,
            "source": desc,
            "input_bytes": _file_bytes(src),
            **{f"input_{k}": v for k, v in count_nodes(src).items()},
            "tools": {},
        }
        log(f"[{name}] {entry['input_nodes']} nodes, {entry['input_bytes'] / 1e6:.2f} MB")
        feeds = make_inputs(src, seed)
        try:
            reference = run_ort(src, feeds)
            entry["reference_error"] = None
        except Exception as e:  # noqa: BLE001  (any ORT failure: report it, skip verification)
            reference = None
            entry["reference_error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
            log(f"  original does not run on ORT: {entry['reference_error']}")
        for tool in tools:
            dst = folder / f"{name}.{tool}.onnx"
            runs = []
            for i in range(repeat):
                for stale in (dst, dst.with_name(dst.name + ".data")):
                    stale.unlink(missing_ok=True)
                res = run_worker(tool, src, dst, timeout)
                runs.append(res)
                if not res["ok"]:
                    break
            good = [r for r in runs if r["ok"]]
            t: dict = {"runs": runs, "ok": len(good) == len(runs)}
            if not t["ok"]:
                t["error"] = next(r["error"] for r in runs if not r["ok"])
                log(f"  {tool:<11} FAILED: {t['error']}")
            if good:
                for key in (
                    "import_s",
                    "load_s",
                    "optimize_s",
                    "save_s",
                    "total_s",
                    "process_wall_s",
                ):
                    t[key] = _median([r.get(key) for r in good])
                t["peak_rss_mb"] = _median([r["peak_rss_kb"] / 1024 for r in good])
                t["rss_after_import_mb"] = _median([r["rss_after_import_kb"] / 1024 for r in good])
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
                msg = f"  {tool:<11} {t['total_s']:.3f} s (optimize {t['optimize_s']:.3f} s), "
                msg += f"{t['peak_rss_mb']:.0f} MB, {t['nodes']} nodes"
                if "verify" in t:
                    v = t["verify"]
                    msg += f", match={v['match']} err={v['max_abs_err']}"
                log(msg)
            entry["tools"][tool] = t
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


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in (
        "gcomp",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxslim",
        "onnxruntime-gpu",
        "onnxruntime",
        "numpy",
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
    if not t.get("ok"):
        return "error"
    v = t.get("verify")
    if v is None:
        return "unverified"
    if v["max_abs_err"] is None:
        return "✗ " + "; ".join(v["problems"])[:60]
    mark = "✓" if v["match"] else "✗"
    extra = (" " + "; ".join(v["problems"])[:60]) if v["problems"] else ""
    if v.get("constant_reference"):
        extra += " (const ref)"
    return f"{mark} {v['max_abs_err']:.1e}{extra}"


def markdown(results: dict, command: str | None = None) -> str:
    meta = results["meta"]
    tools = meta["tools"]
    peers = [t for t in tools if t != "gcomp"]
    lines = []
    vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines.append(
        f"Median of {meta['repeat']} fresh-process run(s) per cell; {meta['cpus']} CPUs; "
        f"Python {meta['python']}; {vers}."
    )
    if command:
        lines.append(f"Command: `{command}`")
    lines.append("")

    # Side-by-side summary: one row per model.
    lines.append("### Side by side (time = load+optimize+save, median)")
    lines.append("")
    head = ["model", "nodes in"]
    head += [f"{t} s" for t in tools]
    head += [f"{t} MB" for t in tools]
    head += [f"{t} nodes" for t in tools]
    head += [f"{t} match" for t in tools]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for e in results["models"]:
        row = [e["model"], str(e["input_nodes"])]
        base = e["tools"].get("gcomp", {})
        for t in tools:
            x = e["tools"].get(t, {})
            cell = _f(x.get("total_s"))
            r = x.get("vs_gcomp", {}).get("total_s")
            if r:
                cell += f" ({r:.2f}×)"
            row.append(cell if x.get("ok") else "error")
        for t in tools:
            x = e["tools"].get(t, {})
            row.append(_f(x.get("peak_rss_mb"), "{:.0f}"))
        for t in tools:
            x = e["tools"].get(t, {})
            if "nodes" not in x:
                row.append("—")
                continue
            cell = str(x["nodes"])
            if t != "gcomp" and "nodes" in base:
                d = x["nodes"] - base["nodes"]
                cell += f" ({d:+d})"
            row.append(cell)
        for t in tools:
            row.append(_match_cell(e["tools"].get(t, {})))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "`(N×)` after a peer's time = peer time / gcomp time (above 1: gcomp is faster). "
        "`(±N)` after a peer's node count = peer nodes − gcomp nodes (negative: the peer's "
        "output is smaller). MB = peak RSS of the worker process (VmHWM), interpreter and "
        "imports included. "
        f"match = allclose(rtol={RTOL:g}, atol={ATOL:g}) against the original on ONNX Runtime "
        "(ORT_DISABLE_ALL), with the largest absolute difference."
    )
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
        "nodes",
        "out MB",
        "match (max abs err)",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
    for e in results["models"]:
        for t in tools:
            x = e["tools"].get(t, {})
            r = x.get("vs_gcomp", {})
            if not x.get("ok") and "total_s" not in x:
                lines.append(
                    f"| {e['model']} | {t} | "
                    + " | ".join(["—"] * (len(head) - 3))
                    + f" | error: {x.get('error', '?')[:80]} |"
                )
                continue
            row = [
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
                str(x.get("nodes", "—"))
                + (f" (+{x['function_nodes']} in functions)" if x.get("function_nodes") else ""),
                _f(x["output_bytes"] / 1e6 if "output_bytes" in x else None, "{:.2f}"),
                _match_cell(x),
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    gm = results.get("geomean_vs_gcomp", {})
    if gm:
        lines.append("### Geometric mean over models, peer / gcomp")
        lines.append("")
        lines.append("| tool | load+opt+save | optimize | process wall | peak RSS | nodes |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for t in peers:
            g = gm.get(t, {})
            keys = ("total_s", "optimize_s", "process_wall_s", "peak_rss_mb", "nodes")
            cells = [_f(g.get(k), "{:.2f}×") for k in keys]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        if len(argv) != 4:
            raise SystemExit("usage: bench_optimize.py --worker TOOL IN OUT")
        return _worker(*argv[1:])

    zoo = _zoo()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default=",".join(zoo), help="comma-separated model names (see --list)"
    )
    p.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help="comma-separated: gcomp, onnxslim, onnxscript, noop (onnx-ir load+save floor)",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="fresh-process runs per cell; the median is reported"
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds per worker process")
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    p.add_argument("--md", type=Path, help="also write the Markdown report here")
    p.add_argument("--json", type=Path, help="write all measurements as JSON here")
    p.add_argument(
        "--workdir", type=Path, help="keep models and outputs here (default: a temp dir)"
    )
    p.add_argument("--list", action="store_true", help="list the model names and exit")
    args = p.parse_args(argv)

    if args.list:
        for name, (desc, _) in zoo.items():
            print(f"{name:<22} {desc}")
        return 0
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in zoo]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(zoo)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in (*TOOLS, "noop")]
    if bad:
        p.error(f"unknown tool(s) {', '.join(bad)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    exe = Path(sys.executable)
    exe_text = os.path.relpath(exe, REPO) if exe.is_relative_to(REPO) else "python"
    command = " ".join([exe_text, "bench/bench_optimize.py", *argv])
    t0 = time.perf_counter()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = bench(names, tools, args.repeat, args.timeout, args.workdir, args.seed, log)
    else:
        with tempfile.TemporaryDirectory(prefix="gcomp-bench-") as tmp:
            results = bench(names, tools, args.repeat, args.timeout, Path(tmp), args.seed, log)
    results["meta"]["bench_seconds"] = time.perf_counter() - t0
    results["meta"]["command"] = command
    log(f"bench finished in {results['meta']['bench_seconds']:.0f} s")

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
        if name == "gcomp"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
