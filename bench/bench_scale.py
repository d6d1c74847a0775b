"""Scale benchmark: how gcomp's O1 pipeline grows with model size.

Usage (from the repository root)::

    .venv/bin/python bench/bench_scale.py                          # 1k, 10k, 100k nodes
    .venv/bin/python bench/bench_scale.py --sizes 1000,10000 --repeat 3
    .venv/bin/python bench/bench_scale.py --json bench/scale_results.json --md /tmp/scale.md
    .venv/bin/python bench/bench_scale.py --profile 100000         # cProfile of one size
    .venv/bin/python bench/bench_scale.py --big --sizes ''         # only the 2.5 GB model

Part 1 builds synthetic models of exactly N nodes (default 1,000 / 10,000 / 100,000)
out of a repeated block that gives every O1 pass work (see :func:`build_scale_model`)
and runs ``gcomp.optimize(path, "O1", verify=False)`` + ``result.save(out)`` in a fresh
worker process per (size, repeat), reporting load / optimize / save times, the time of
every pass (summed over rounds), the worker's peak RSS (``VmHWM``), nodes before/after,
and whether the saved output loads with ``onnx.load`` and passes
``onnx.checker.check_model(path)`` (checked by the parent, outside the timed worker).

Part 2 (``--big``, off by default) builds a 2.5 GB model whose external data file is
sparse (``truncate``; a few non-zero floats per weight at distinct offsets so
initializer deduplication cannot merge them): 10 chained MatMuls with [7906, 7906]
float32 weights (250 MB each). The worker runs O1 on it and saves it; the parent checks
that every external tensor of the output points at the output's own ``.data`` file,
that the file has the right size, and that the non-zero values are at the right places.
The dense 2.5 GB output is deleted afterwards unless ``--keep``.

This is a benchmark, not a test: pytest does not collect it.
"""

from __future__ import annotations

# Standard library only at module level: the worker's RSS and import time stay gcomp's.
import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "gcomp-scale-cache"
RESULT_MARK = "SCALE_RESULT "
DEFAULT_SIZES = (1_000, 10_000, 100_000)
SCALE_VERSION = 1  # bump when the synthetic graph changes (cached models are rebuilt)
HIDDEN = 16  # feature size of the scale models: 16x16 float32 weights = 1 KiB each
# The big model: BIG_LAYERS weights of BIG_HIDDEN^2 float32 = 250.0 MB each, 2.5 GB.
BIG_LAYERS, BIG_HIDDEN = 10, 7906
BIG_VERSION = 1
GC_MODES = ("on", "off", "freeze")  # see _worker; --gc-compare runs the last two


# --------------------------------------------------------------------------- worker


def _status_kb(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmHWM is this address space's own peak RSS)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


class _GcClock:
    """Time spent in Python's cyclic garbage collector, by phase (``gc.callbacks``).

    The phase is "load" until the first pass starts, then the pass running (from
    gcomp's progress callback), then whatever :meth:`phase` sets ("save")."""

    def __init__(self, freeze_at_first_pass: bool = False) -> None:
        import gc

        self._freeze = freeze_at_first_pass
        self.current = "load"
        self.seconds: dict[str, float] = {}
        self.full: dict[str, int] = {}  # generation-2 (whole heap) collections
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds[self.current] = (
                self.seconds.get(self.current, 0.0) + time.perf_counter() - self._t0
            )
            if info.get("generation") == 2:
                self.full[self.current] = self.full.get(self.current, 0) + 1

    def progress(self, name, _round, stats) -> None:
        if self._freeze:
            import gc

            gc.freeze()
            self._freeze = False
        self.current = name if stats is None else "between passes"

    def phase(self, name: str) -> None:
        self.current = name


def _worker(src: str, dst: str, profile: str | None = None, gc_mode: str = "on") -> int:
    """``gcomp.optimize(src, "O1", verify=False)`` then ``result.save(dst)``; one JSON line.

    ``gc_mode`` (a diagnostic; gcomp itself runs with the default "on"): "off" disables
    Python's cyclic garbage collector for the whole run; "freeze" calls ``gc.freeze()``
    when the first pass starts (after load and check), so the collector no longer scans
    the objects of the loaded model but still collects what the passes drop.
    """
    t_start = time.perf_counter()
    out: dict = {}
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        import gc

        import gcomp.passes

        import gcomp
        import gcomp.pipeline

        out["import_s"] = time.perf_counter() - t_start
        out["rss_after_import_kb"] = _status_kb("VmHWM").get("VmHWM")
        if gc_mode == "off":
            gc.disable()
        out["gc"] = gc_mode
        clock = _GcClock(freeze_at_first_pass=gc_mode == "freeze")
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        result = gcomp.optimize(src, "O1", verify=False, progress=clock.progress)
        t1 = time.perf_counter()
        clock.phase("save")
        out["rss_after_optimize_kb"] = _status_kb("VmHWM").get("VmHWM")
        result.save(dst)
        t2 = time.perf_counter()
        clock.phase("after")
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        passes: dict[str, dict] = {}
        for p in result.passes:
            agg = passes.setdefault(p.name, {"seconds": 0.0, "runs": 0, "modified_runs": 0})
            agg["seconds"] += p.seconds
            agg["runs"] += 1
            agg["modified_runs"] += int(bool(p.modified))
        for name, agg in passes.items():
            agg["gc_s"] = clock.seconds.get(name, 0.0)
        out["gc_s"] = sum(clock.seconds.values())
        out["gc_by_phase_s"] = clock.seconds
        out["gc_full_collections"] = sum(clock.full.values())
        out["gc_full_by_phase"] = clock.full
        out.update(
            load_s=result.load_seconds,
            optimize_s=(t1 - t0) - result.load_seconds,
            save_s=t2 - t1,
            total_s=t2 - t0,
            pass_sum_s=sum(p.seconds for p in result.passes),
            rounds=max((p.round for p in result.passes), default=0),
            passes=passes,
            nodes_before=result.before.nodes,
            nodes_after=result.after.nodes,
            init_bytes_before=result.before.initializer_bytes,
            init_bytes_after=result.after.initializer_bytes,
        )
        st = _status_kb("VmHWM", "RssAnon", "RssFile")
        out["peak_rss_kb"] = st.get("VmHWM")
        out["rss_end_kb"] = {k: v for k, v in st.items() if k != "VmHWM"}
        out["ok"] = True
    except BaseException as e:  # noqa: BLE001  (reported by the parent)
        out["ok"] = False
        text = str(e).strip().splitlines()
        out["error"] = f"{type(e).__name__}: {text[0] if text else ''}"[:300]
    finally:
        sys.stdout = real_stdout
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


def _run_worker(
    src: Path, dst: Path, timeout: float, profile: Path | None = None, gc_mode: str = "on"
) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(src), str(dst)]
    if profile:
        cmd += ["--profile-out", str(profile)]
    if gc_mode != "on":
        cmd += ["--worker-gc", gc_mode]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            out = json.loads(line[len(RESULT_MARK) :])
            out["process_wall_s"] = wall
            out["loadavg_before"] = load_before  # other work on the machine skews the timings
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}


# --------------------------------------------------------------------------- scale models


def _block_nodes() -> int:
    return len(_block(0, "h", {}))


def _block(i: int, h: str, shared: dict) -> list:
    """One block: the nodes of layer ``i`` reading ``h``; its output is named ``res{i}``.

    Work it gives each O1 pass:

    * fold-constants: ``1/Sqrt(Cast(Shape(W)[0]))`` computed from the weight's shape,
      and the ``Shape(W)[1]`` part of the Reshape target;
    * infer-shapes + symbolic folding: ``Reshape(a, Concat(Shape(h)[0], Shape(h)[1],
      Shape(W)[1]))`` is a no-op only symbolic dims prove (batch, seq are symbolic);
    * simplify: ``Mul(x, 1.0)``, a ``Cast`` to the same type, that no-op Reshape;
    * eliminate-identity: an ``Identity`` after the activation;
    * cse: the Gather-index / axes / scalar ``Constant`` nodes are repeated in every
      block, and ``Mul(r, 0.5)`` is computed twice (``t + t``);
    * dedup-initializers: every 8th block's weight is a byte-identical copy of the
      previous block's, under another name;
    * remove-unused-nodes: a dead ``Shape -> Gather`` whose output nothing reads.

    The weights are 16x16 float32 (1 KiB) and 16-float biases, seeded.
    """
    from onnx import TensorProto, helper

    nodes = []
    k = [0]

    def n(op, inputs, **attrs) -> str:
        k[0] += 1
        name = f"b{i}_{op.lower()}{k[0]}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(key) -> str:
        k[0] += 1
        name = f"b{i}_c{k[0]}"
        attrs = {"value": shared[key]} if shared else {}  # no values when only counting nodes
        nodes.append(helper.make_node("Constant", [], [name], name=name, **attrs))
        return name

    w, b = f"W{i}", f"B{i}"
    acts = ("Relu", "Tanh", "Sigmoid")
    # The Reshape target (exporter style).
    h_shape = n("Shape", [h])
    w_shape = n("Shape", [w])
    d0 = n("Unsqueeze", [n("Gather", [h_shape, const("i0")], axis=0), const("ax0")])
    d1 = n("Unsqueeze", [n("Gather", [h_shape, const("i1")], axis=0), const("ax0")])
    d2 = n("Unsqueeze", [n("Gather", [w_shape, const("i1")], axis=0), const("ax0")])
    target = n("Concat", [d0, d1, d2], axis=0)
    # A foldable scale from the weight's shape.
    fan_in = n("Cast", [n("Gather", [w_shape, const("i0")], axis=0)], to=TensorProto.FLOAT)
    scale = n("Div", [const("one"), n("Sqrt", [fan_in])])
    # MatMul + Add + activation, with an Identity and a no-op Reshape.
    mm = n("Mul", [n("MatMul", [h, w]), scale])
    a = n(acts[i % 3], [n("Add", [mm, b])])
    r = n("Reshape", [n("Identity", [a]), target])
    # A duplicated subexpression, an exact x*1 and a no-op Cast.
    t = n("Add", [n("Mul", [r, const("half")]), n("Mul", [r, const("half")])])
    t = n("Cast", [n("Mul", [t, const("one")])], to=TensorProto.FLOAT)
    # Dead code.
    n("Gather", [n("Shape", [t]), const("i0")], axis=0)
    # Residual; named so the next block can find it.
    nodes.append(helper.make_node("Add", [h, t], [f"res{i}"], name=f"b{i}_res"))
    return nodes


def build_scale_model(path: Path, target_nodes: int, seed: int = 0) -> dict:
    """Write a model with exactly ``target_nodes`` nodes (blocks, then an Identity tail)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    shared = {
        "i0": numpy_helper.from_array(np.array(0, np.int64)),
        "i1": numpy_helper.from_array(np.array(1, np.int64)),
        "ax0": numpy_helper.from_array(np.array([0], np.int64)),
        "one": numpy_helper.from_array(np.array(1.0, np.float32)),
        "half": numpy_helper.from_array(np.array(0.5, np.float32)),
    }
    per_block = _block_nodes()
    blocks = max(1, (target_nodes - 1) // per_block)
    nodes, inits = [], []
    h = "x"
    prev_w = None
    for i in range(blocks):
        if i % 8 == 7 and prev_w is not None:
            w = prev_w.copy()  # dedup-initializers merges it with the previous one
        else:
            w = (rng.standard_normal((HIDDEN, HIDDEN)) / math.sqrt(HIDDEN)).astype(np.float32)
        prev_w = w
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        inits.append(
            numpy_helper.from_array((0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), f"B{i}")
        )
        nodes.extend(_block(i, h, shared))
        h = f"res{i}"
    # Exact size: an Identity tail (eliminate-identity removes all but the output's).
    while len(nodes) < target_nodes - 1:
        out = f"tail{len(nodes)}"
        nodes.append(helper.make_node("Identity", [h], [out], name=out))
        h = out
    nodes.append(helper.make_node("Identity", [h], ["y"], name="output"))
    assert len(nodes) == target_nodes, (len(nodes), target_nodes)
    graph = helper.make_graph(
        nodes,
        f"scale{target_nodes}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return {
        "nodes": len(nodes),
        "blocks": blocks,
        "nodes_per_block": per_block,
        "initializers": len(inits),
        "bytes": path.stat().st_size,
    }


def _scale_model(cache: Path, size: int, log) -> tuple[Path, dict]:
    path = cache / f"scale{size}.onnx"
    stamp_path = cache / f"scale{size}.json"
    want = {"version": SCALE_VERSION, "nodes": size, "hidden": HIDDEN}
    if path.exists() and stamp_path.exists():
        try:
            stamp = json.loads(stamp_path.read_text())
            if stamp.get("key") == want:
                return path, stamp["info"]
        except ValueError:
            pass
    cache.mkdir(parents=True, exist_ok=True)
    log(f"  building scale{size}.onnx ...")
    t0 = time.perf_counter()
    info = build_scale_model(path, size)
    info["build_s"] = time.perf_counter() - t0
    stamp_path.write_text(json.dumps({"key": want, "info": info}) + "\n")
    return path, info


def _check_output(path: Path, src: Path) -> dict:
    """Load the saved output with onnx and run the checker by path (external data too).

    When the checker fails, it is run again on a copy whose graph outputs
    that lost their type get the input model's declared type back: ``check_retyped``
    then tells whether a missing output type is the only problem.
    """
    import onnx

    out: dict = {}
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        out["check"] = f"FAILED to load: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        return out
    out["nodes_saved"] = len(proto.graph.node)
    out["ops_saved"] = {}
    for node in proto.graph.node:
        out["ops_saved"][node.op_type] = out["ops_saved"].get(node.op_type, 0) + 1
    out["untyped_outputs"] = [o.name for o in proto.graph.output if not o.HasField("type")]
    try:
        onnx.checker.check_model(str(path))
        out["check"] = "ok"
    except Exception as e:  # noqa: BLE001
        out["check"] = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        if out["untyped_outputs"]:
            declared = {
                o.name: o.type for o in onnx.load(str(src), load_external_data=False).graph.output
            }
            for o in proto.graph.output:
                if not o.HasField("type") and o.name in declared:
                    o.type.CopyFrom(declared[o.name])
            # Beside the output, so that its external data (if any) resolves; checked by path.
            retyped = path.parent / (path.stem + ".retyped.onnx")
            try:
                onnx.save(proto, str(retyped))
                onnx.checker.check_model(str(retyped))
                out["check_retyped"] = "ok"
            except Exception as e2:  # noqa: BLE001
                out["check_retyped"] = (
                    f"FAILED: {type(e2).__name__}: {str(e2).strip().splitlines()[0][:200]}"
                )
            finally:
                retyped.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- big model


def _big_model(cache: Path, log) -> Path:
    """``cache/big25.onnx`` + ``big25.onnx.data`` (2.5 GB, sparse).

    BIG_LAYERS layers of ``h = Tanh(Identity(MatMul(h, W_i) + B_i))``, plus per layer a
    foldable ``Shape(W_i)[0]`` scale, a duplicated ``Constant`` and a no-op Reshape to
    ``Shape(h)`` pieces (so O1 has work and touches the weights' metadata). Each W_i is
    [BIG_HIDDEN, BIG_HIDDEN] float32 in the sparse data file; 4 diagonal entries per
    weight are non-zero, at rows that differ between weights.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = cache / "big25.onnx"
    data_name = "big25.onnx.data"
    data_path = cache / data_name
    stamp_path = cache / "big25.json"
    hidden, layers = BIG_HIDDEN, BIG_LAYERS
    wbytes = hidden * hidden * 4
    stamp = {"version": BIG_VERSION, "layers": layers, "hidden": hidden}
    if path.exists() and data_path.exists() and stamp_path.exists():
        try:
            if (
                json.loads(stamp_path.read_text()) == stamp
                and data_path.stat().st_size == layers * wbytes
            ):
                return path
        except ValueError:
            pass
    cache.mkdir(parents=True, exist_ok=True)
    log(f"  building big25.onnx ({layers * wbytes / 1e9:.2f} GB external data, sparse) in {cache}")
    data_path.unlink(missing_ok=True)
    with open(data_path, "wb") as f:
        os.truncate(f.fileno(), layers * wbytes)
        for i, row, value in _big_nonzeros():
            os.pwrite(
                f.fileno(), np.float32(value).tobytes(), i * wbytes + (row * hidden + row) * 4
            )

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    cnt = [0]

    def n(op, inputs, **attrs) -> str:
        cnt[0] += 1
        name = f"{op.lower()}{cnt[0]}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(value, dtype) -> str:
        cnt[0] += 1
        name = f"c{cnt[0]}"
        nodes.append(
            helper.make_node(
                "Constant",
                [],
                [name],
                name=name,
                value=numpy_helper.from_array(np.array(value, dtype)),
            )
        )
        return name

    h = "x"
    for i in range(layers):
        w = f"W{i}"
        t = TensorProto(name=w, data_type=TensorProto.FLOAT, dims=[hidden, hidden])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", data_name),
            ("offset", str(i * wbytes)),
            ("length", str(wbytes)),
        ):
            e = t.external_data.add()
            e.key, e.value = key, value
        inits.append(t)
        inits.append(
            numpy_helper.from_array(
                (0.01 * rng.standard_normal(hidden)).astype(np.float32), f"B{i}"
            )
        )
        w_shape = n("Shape", [w])
        fan = n("Cast", [n("Gather", [w_shape, const(0, np.int64)], axis=0)], to=TensorProto.FLOAT)
        scale = n("Div", [const(1.0, np.float32), n("Sqrt", [fan])])
        a = n("Add", [n("Mul", [n("MatMul", [h, w]), scale]), f"B{i}"])
        h_shape = n("Shape", [h])
        target = n(
            "Concat",
            [
                n(
                    "Unsqueeze",
                    [n("Gather", [h_shape, const(0, np.int64)], axis=0), const([0], np.int64)],
                ),
                n(
                    "Unsqueeze",
                    [n("Gather", [w_shape, const(1, np.int64)], axis=0), const([0], np.int64)],
                ),
            ],
            axis=0,
        )
        h = n("Tanh", [n("Reshape", [n("Identity", [a]), target])])
    nodes.append(helper.make_node("Identity", [h], ["y"], name="output"))
    graph = helper.make_graph(
        nodes,
        "big25",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    stamp_path.write_text(json.dumps(stamp) + "\n")
    return path


def _big_nonzeros():
    """(layer, diagonal row, value) of every non-zero float in the big model's weights."""
    for i in range(BIG_LAYERS):
        for k in range(4):
            row = (k * (BIG_HIDDEN // 4) + 97 * i) % BIG_HIDDEN
            yield i, row, 0.5 + 0.01 * i + 0.001 * k


def _check_big_output(src: Path, out: Path) -> dict:
    """The output's external tensors all point at ``<out>.data``, which has the right size
    and holds each weight's non-zero values where the input had them."""
    import numpy as np
    import onnx

    res: dict = {}
    proto = onnx.load(str(out), load_external_data=False)
    res["nodes_saved"] = len(proto.graph.node)
    own = out.name + ".data"
    data_path = out.parent / own
    locations, ends, ext = set(), [], {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            locations.add(info["location"])
            off, length = int(info.get("offset", 0)), int(info["length"])
            ends.append(off + length)
            ext[t.name] = (off, length)
    res["external_tensors"] = len(ext)
    res["locations"] = sorted(locations)
    res["own_data_file"] = locations == {own}
    res["input_data_file_referenced"] = (src.name + ".data") in locations
    res["data_bytes"] = data_path.stat().st_size if data_path.exists() else None
    res["data_expected_min"] = BIG_LAYERS * BIG_HIDDEN * BIG_HIDDEN * 4
    res["data_bytes_end_of_last_tensor"] = max(ends) if ends else 0
    res["data_size_ok"] = bool(
        res["data_bytes"] is not None
        and res["data_bytes"] == res["data_bytes_end_of_last_tensor"]
        and res["data_bytes"] >= res["data_expected_min"]
    )
    # Values: each weight is found (by name; dedup must not have merged any) and its
    # non-zeros are where the input has them. Read only those floats (memmap).
    wbytes = BIG_HIDDEN * BIG_HIDDEN * 4
    ok = True
    if res["data_bytes"]:
        mm = np.memmap(data_path, dtype=np.uint8, mode="r")
        for i, row, value in _big_nonzeros():
            name = f"W{i}"
            if name not in ext or ext[name][1] != wbytes:
                ok = False
                break
            pos = ext[name][0] + (row * BIG_HIDDEN + row) * 4
            got = np.frombuffer(mm[pos : pos + 4].tobytes(), np.float32)[0]
            if got != np.float32(value):
                ok = False
                break
        # A zero next to a non-zero stays zero.
        i, row, _ = next(_big_nonzeros())
        if ok and f"W{i}" in ext:
            pos = ext[f"W{i}"][0] + (row * BIG_HIDDEN + row + 1) * 4
            ok = np.frombuffer(mm[pos : pos + 4].tobytes(), np.float32)[0] == 0
        del mm
    res["values_ok"] = bool(ok)
    res["sum_of_tensor_lengths"] = sum(length for _, length in ext.values())
    # The checker by path (resolves the external data); see _check_output.
    res.update({k: v for k, v in _check_output(out, src).items() if k != "nodes_saved"})
    return res


# --------------------------------------------------------------------------- report


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _summarize(runs: list[dict]) -> dict:
    """Median of every figure over the repeats (passes: median per pass)."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": runs[0].get("error") if runs else "no run"}
    s = {"ok": True, "repeats": len(ok)}
    for key in (
        "import_s",
        "load_s",
        "optimize_s",
        "save_s",
        "total_s",
        "pass_sum_s",
        "process_wall_s",
        "gc_s",
        "gc_full_collections",
    ):
        s[key] = _median([r.get(key) for r in ok])
    for key in ("peak_rss_kb", "rss_after_import_kb", "rss_after_optimize_kb"):
        s[key] = _median([r.get(key) for r in ok])
    for key in ("nodes_before", "nodes_after", "init_bytes_before", "init_bytes_after", "rounds"):
        s[key] = ok[0].get(key)
    names = list(ok[0]["passes"])
    s["passes"] = {
        name: {
            "seconds": _median([r["passes"].get(name, {}).get("seconds") for r in ok]),
            "gc_s": _median([r["passes"].get(name, {}).get("gc_s") for r in ok]),
            "runs": ok[0]["passes"][name]["runs"],
            "modified_runs": ok[0]["passes"][name]["modified_runs"],
        }
        for name in names
    }
    return s


def _check_cell(c: dict) -> str:
    text = f"checker {c.get('check')}; {c.get('nodes_saved')} nodes"
    if c.get("untyped_outputs"):
        text += (
            f"; graph output(s) {', '.join(c['untyped_outputs'])} saved without a type; "
            f"with the declared type put back: checker {c.get('check_retyped')}"
        )
    return text


def _fmt_s(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _slope(x0, y0, x1, y1):
    """Exponent k in y ~ x^k between two points (1 = linear)."""
    if not (x0 and x1 and y0 and y1) or x0 == x1:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def _bar(value, vmax, width=40) -> str:
    if not vmax:
        return ""
    return "█" * max(1, round(width * value / vmax))


def render_md(results: dict) -> str:
    lines: list[str] = []
    env = results["env"]
    lines.append(
        f"Python {env['python']}, onnx {env['onnx']}, onnx-ir {env['onnx_ir']}; "
        f"{env['cpus']} CPUs; {env['date']}."
    )
    loads = [
        r.get("loadavg_before")
        for e in results.get("scale", [])
        for k, v in e.items()
        if k == "runs" or k.startswith("gc_")
        for r in (v if isinstance(v, list) else [v])
    ]
    loads = [x for x in loads if x is not None]
    if loads:
        lines.append(
            f"1-minute load average when each worker started: {min(loads):.2f}–{max(loads):.2f} "
            f"(on {env['cpus']} CPUs; above ~1 other work was competing with the benchmark)."
        )
    lines.append("")
    scale = [r for r in results.get("scale", []) if r["summary"].get("ok")]
    failed = [r for r in results.get("scale", []) if not r["summary"].get("ok")]
    if scale:
        lines.append(
            "### Time and memory by model size (median of "
            f"{scale[0]['summary']['repeats']} fresh process(es))"
        )
        lines.append("")
        lines.append(
            "| nodes in | nodes out | MB in | load s | optimize s | save s | load+opt+save s "
            "| µs/node (total) | µs/node (optimize) | rounds | peak RSS MB | RSS after import MB | saved output |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in scale:
            s, n = r["summary"], r["model"]["nodes"]
            lines.append(
                f"| {n:,} | {s['nodes_after']:,} | {r['model']['bytes'] / 1e6:.1f} | {_fmt_s(s['load_s'])} "
                f"| {_fmt_s(s['optimize_s'])} | {_fmt_s(s['save_s'])} | {_fmt_s(s['total_s'])} "
                f"| {1e6 * s['total_s'] / n:.0f} | {1e6 * s['optimize_s'] / n:.0f} | {s['rounds']} "
                f"| {s['peak_rss_kb'] / 1024:.0f} | {s['rss_after_import_kb'] / 1024:.0f} "
                f"| {_check_cell(r['check'])} |"
            )
        lines.append("")
        if len(scale) > 1:
            lines.append(
                "### Growth exponent k (time ∝ nodes^k between consecutive sizes; 1 = linear)"
            )
            lines.append("")
            head = (
                "| figure | "
                + " | ".join(
                    f"{a['model']['nodes']:,}→{b['model']['nodes']:,}"
                    for a, b in itertools.pairwise(scale)
                )
                + " |"
            )
            lines.append(head)
            lines.append("|---|" + "---:|" * (len(scale) - 1))
            for key, label in (
                ("load_s", "load"),
                ("optimize_s", "optimize"),
                ("save_s", "save"),
                ("total_s", "load+opt+save"),
                ("peak_rss_kb", "peak RSS"),
            ):
                cells = []
                for a, b in itertools.pairwise(scale):
                    k = _slope(
                        a["model"]["nodes"],
                        a["summary"][key],
                        b["model"]["nodes"],
                        b["summary"][key],
                    )
                    cells.append("—" if k is None else f"{k:.2f}")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        # Per pass.
        names = []
        for r in scale:
            for name in r["summary"]["passes"]:
                if name not in names:
                    names.append(name)
        lines.append("### Per pass: seconds (summed over rounds) and µs per input node")
        lines.append("")
        lines.append(
            "| pass | runs (modified) | "
            + " | ".join(f"{r['model']['nodes']:,} s" for r in scale)
            + " | "
            + " | ".join(f"{r['model']['nodes']:,} µs/node" for r in scale)
            + " |"
        )
        big_n = scale[-1]["model"]["nodes"]
        lines[-1] = lines[-1] + f" GC s at {big_n:,} |"
        lines.append("|---|---|" + "---:|" * (2 * len(scale) + 1))
        for name in names:
            secs = [r["summary"]["passes"].get(name, {}).get("seconds") for r in scale]
            p0 = scale[-1]["summary"]["passes"].get(name, {})
            lines.append(
                f"| {name} | {p0.get('runs', '—')} ({p0.get('modified_runs', '—')}) | "
                + " | ".join(_fmt_s(s) for s in secs)
                + " | "
                + " | ".join(
                    "—" if s is None else f"{1e6 * s / r['model']['nodes']:.1f}"
                    for s, r in zip(secs, scale)
                )
                + f" | {_fmt_s(p0.get('gc_s'))} |"
            )
        lines.append("")
        lines.append(
            "(runs (modified): at the largest size. GC s: time in Python's cyclic garbage "
            "collector while the pass ran, from `gc.callbacks`, included in its seconds.)"
        )
        lines.append("")
        lines.append("### Python's cyclic garbage collector")
        lines.append("")
        lines.append(
            "GC s: time inside the collector (`gc.callbacks`) during load+optimize+save; "
            "full: generation-2 collections (each scans every tracked object)."
        )
        lines.append("")
        modes = [m for m in GC_MODES[1:] if any(r.get(f"gc_{m}", {}).get("ok") for r in scale)]
        head = "| nodes | GC on: optimize s | GC s | GC share | full |"
        for m in modes:
            head += f" GC {m}: optimize s | µs/node | GC s | peak RSS MB |"
        lines.append(head)
        lines.append("|" + "---:|" * (head.count("|") - 1))
        for r in scale:
            s = r["summary"]
            row = (
                f"| {r['model']['nodes']:,} | {_fmt_s(s['optimize_s'])} | {_fmt_s(s.get('gc_s'))} "
                f"| {100 * (s.get('gc_s') or 0) / s['total_s']:.0f} % | {s.get('gc_full_collections')} |"
            )
            for m in modes:
                o = r.get(f"gc_{m}", {})
                row += (
                    f" {_fmt_s(o.get('optimize_s'))} | {1e6 * o['optimize_s'] / r['model']['nodes']:.0f} "
                    f"| {_fmt_s(o.get('gc_s'))} | {o['peak_rss_kb'] / 1024:.0f} |"
                    if o.get("ok")
                    else " — | — | — | — |"
                )
            lines.append(row)
        if len(scale) > 1:
            lines.append("")
            for m in ("on",) + tuple(modes):
                ks = []
                for a, b in itertools.pairwise(scale):
                    oa = a["summary"] if m == "on" else a.get(f"gc_{m}", {})
                    ob = b["summary"] if m == "on" else b.get(f"gc_{m}", {})
                    if oa.get("ok") and ob.get("ok"):
                        k = _slope(
                            a["model"]["nodes"],
                            oa["optimize_s"],
                            b["model"]["nodes"],
                            ob["optimize_s"],
                        )
                        ks.append(f"{a['model']['nodes']:,}→{b['model']['nodes']:,}: {k:.2f}")
                if ks:
                    lines.append(f"- growth exponent of optimize, GC {m}: " + ", ".join(ks))
        lines.append("")
        lines.append("### The curve: µs per node (load+optimize+save); flat bars = linear time")
        lines.append("")
        lines.append("```")
        per_node = [1e6 * r["summary"]["total_s"] / r["model"]["nodes"] for r in scale]
        vmax = max(per_node)
        for r, v in zip(scale, per_node):
            lines.append(f"{r['model']['nodes']:>8,} nodes {v:7.0f} µs/node {_bar(v, vmax)}")
        lines.append("```")
        lines.append("")
        lines.append("```")
        lines.append("seconds (load+optimize+save), log-log: each row is 10x the nodes")
        for r in scale:
            t = r["summary"]["total_s"]
            width = max(1, round(8 * (math.log10(max(t, 1e-3)) + 2)))  # 0.01 s -> 0 cols
            lines.append(f"{r['model']['nodes']:>8,} nodes {t:8.2f} s {'█' * width}")
        lines.append("```")
        lines.append("")
    for r in failed:
        lines.append(f"**{r['model']['nodes']:,} nodes: FAILED**: {r['summary'].get('error')}")
        lines.append("")
    big = results.get("big")
    if big:
        lines.append("### The 2.5 GB model (external data, sparse input)")
        lines.append("")
        s = big.get("run", {})
        if not s.get("ok"):
            lines.append(f"FAILED: {s.get('error')}")
        else:
            gb = big["data_bytes_in"] / 1e9
            lines.append(
                "| nodes in | nodes out | data GB in | load s | optimize s | save s | load+opt+save s "
                "| process wall s | peak RSS MB | peak RSS / size | RSS after import MB |"
            )
            lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            lines.append(
                f"| {s['nodes_before']} | {s['nodes_after']} | {gb:.2f} | {_fmt_s(s['load_s'])} "
                f"| {_fmt_s(s['optimize_s'])} | {_fmt_s(s['save_s'])} | {_fmt_s(s['total_s'])} "
                f"| {_fmt_s(s['process_wall_s'])} | {s['peak_rss_kb'] / 1024:.0f} "
                f"| {s['peak_rss_kb'] * 1024 / big['data_bytes_in']:.3f}× "
                f"| {s['rss_after_import_kb'] / 1024:.0f} |"
            )
            lines.append("")
            lines.append(
                f"Input: `big25.onnx` + `big25.onnx.data`, {big['data_bytes_in']:,} bytes apparent, "
                f"{big['data_bytes_allocated_in'] / 1e6:.1f} MB allocated on disk (sparse); the output's "
                "data file is written dense."
            )
            lines.append("")
            c = big["check"]
            end = s.get("rss_end_kb", {})
            lines.append(
                f"Output check: {_check_cell(c)}; {c.get('external_tensors')} external tensors "
                f"({c.get('sum_of_tensor_lengths'):,} bytes in all), "
                f"locations {c.get('locations')} (own data file: {c.get('own_data_file')}, input's "
                f"referenced: {c.get('input_data_file_referenced')}); data file {c.get('data_bytes'):,} bytes "
                f"= end of last tensor {c.get('data_bytes_end_of_last_tensor'):,} "
                f"(weights {c.get('data_expected_min'):,}): size ok {c.get('data_size_ok')}; "
                f"non-zero values in place: {c.get('values_ok')}. "
                f"RSS at the end: anon {end.get('RssAnon', 0) / 1024:.0f} MB, file-backed "
                f"{end.get('RssFile', 0) / 1024:.0f} MB."
            )
            lines.append("")
            lines.append("| pass | runs (modified) | seconds |")
            lines.append("|---|---|---:|")
            for name, p in s["passes"].items():
                lines.append(
                    f"| {name} | {p['runs']} ({p['modified_runs']}) | {_fmt_s(p['seconds'])} |"
                )
            lines.append("")
    prof = results.get("profile")
    if prof:
        lines.append(
            f"### cProfile of the {prof['nodes']:,}-node run (load+optimize+save, profiled)"
        )
        lines.append("")
        for key in ("tottime", "cumulative"):
            lines.append(f"Top by {key}:")
            lines.append("")
            lines.append("```")
            lines.extend(prof[key])
            lines.append("```")
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _profile_text(path: Path, key: str, limit: int) -> list[str]:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.strip_dirs().sort_stats(key).print_stats(limit)
    text = buf.getvalue().splitlines()
    # Drop pstats' header lines up to the column titles.
    for i, line in enumerate(text):
        if "ncalls" in line:
            return [l for l in text[i:] if l.strip()]
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        default=",".join(str(s) for s in DEFAULT_SIZES),
        help="comma-separated node counts (default 1000,10000,100000; '' for none)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="fresh processes per size (median reported)"
    )
    p.add_argument("--big", action="store_true", help="also run the 2.5 GB external-data model")
    p.add_argument(
        "--profile",
        type=int,
        metavar="NODES",
        help="also run one cProfile'd worker on the model of this many nodes",
    )
    p.add_argument("--profile-top", type=int, default=30)
    p.add_argument(
        "--gc-compare",
        action="store_true",
        help="also run each size once with Python's cyclic GC disabled and once with "
        "gc.freeze() after load (a diagnostic)",
    )
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"built models (default {DEFAULT_CACHE})"
    )
    p.add_argument("--keep", action="store_true", help="keep the outputs (in --cache/out)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--md", type=Path, help="write the Markdown tables")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-gc", default="on", choices=GC_MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(*args.worker, profile=args.profile_out, gc_mode=args.worker_gc)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import platform

    import onnx
    import onnx_ir

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results: dict = {
        "env": {
            "python": platform.python_version(),
            "onnx": onnx.__version__,
            "onnx_ir": onnx_ir.__version__,
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
            "platform": platform.platform(),
        },
        "scale": [],
    }
    outdir = args.cache / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    status = 0
    for size in sizes:
        src, info = _scale_model(args.cache, size, log)
        _ = src.read_bytes()  # warm the page cache: the first run does not pay for the disk
        dst = outdir / f"scale{size}.opt.onnx"
        runs = []
        for rep in range(args.repeat):
            log(f"  {size:,} nodes, run {rep + 1}/{args.repeat} ...")
            r = _run_worker(src, dst, args.timeout)
            if r.get("ok"):
                log(
                    f"    load {r['load_s']:.2f} s, optimize {r['optimize_s']:.2f} s, save {r['save_s']:.2f} s, "
                    f"peak RSS {r['peak_rss_kb'] / 1024:.0f} MB, nodes {r['nodes_before']} -> {r['nodes_after']}"
                )
            else:
                log(f"    FAILED: {r.get('error')}")
            runs.append(r)
        check = _check_output(dst, src) if dst.exists() else {"check": "no output"}
        summary = _summarize(runs)
        if (
            not summary.get("ok")
            or check.get("check") != "ok"
            or check.get("nodes_saved") != summary.get("nodes_after")
        ):
            status = 1
        entry = {"model": info, "runs": runs, "summary": summary, "check": check}
        if args.gc_compare:
            for mode in GC_MODES[1:]:
                log(f"  {size:,} nodes, GC {mode} ...")
                r = _run_worker(src, outdir / f"scale{size}.gc.onnx", args.timeout, gc_mode=mode)
                (outdir / f"scale{size}.gc.onnx").unlink(missing_ok=True)
                if r.get("ok"):
                    log(
                        f"    optimize {r['optimize_s']:.2f} s, GC {r['gc_s']:.2f} s, "
                        f"peak RSS {r['peak_rss_kb'] / 1024:.0f} MB"
                    )
                entry[f"gc_{mode}"] = r
        results["scale"].append(entry)
        if not args.keep:
            dst.unlink(missing_ok=True)
    if args.profile:
        src, info = _scale_model(args.cache, args.profile, log)
        prof_path = args.cache / f"scale{args.profile}.prof"
        log(f"  profiling {args.profile:,} nodes -> {prof_path} ...")
        r = _run_worker(
            src, outdir / f"scale{args.profile}.prof.onnx", args.timeout, profile=prof_path
        )
        (outdir / f"scale{args.profile}.prof.onnx").unlink(missing_ok=True)
        if r.get("ok"):
            results["profile"] = {
                "nodes": info["nodes"],
                "path": str(prof_path),
                "total_s_profiled": r["total_s"],
                "tottime": _profile_text(prof_path, "tottime", args.profile_top),
                "cumulative": _profile_text(prof_path, "cumulative", args.profile_top),
            }
        else:
            log(f"    profile run FAILED: {r.get('error')}")
    if args.big:
        src = _big_model(args.cache / "big", log)
        data_in = src.parent / (src.name + ".data")
        dst = outdir / "big25.opt.onnx"
        log("  big model (2.5 GB) ...")
        r = _run_worker(src, dst, args.timeout)
        big = {
            "data_bytes_in": data_in.stat().st_size,
            "data_bytes_allocated_in": data_in.stat().st_blocks * 512,
            "run": r,
        }
        if r.get("ok"):
            log(
                f"    load {r['load_s']:.2f} s, optimize {r['optimize_s']:.2f} s, save {r['save_s']:.2f} s, "
                f"peak RSS {r['peak_rss_kb'] / 1024:.0f} MB"
            )
            big["check"] = _check_big_output(src, dst)
            c = big["check"]
            if not (
                c["own_data_file"]
                and c["data_size_ok"]
                and c["values_ok"]
                and c.get("check") == "ok"
            ):
                status = 1
        else:
            log(f"    FAILED: {r.get('error')}")
            status = 1
        results["big"] = big
        if not args.keep:
            dst.unlink(missing_ok=True)
            (outdir / (dst.name + ".data")).unlink(missing_ok=True)
    md = render_md(results)
    print(md)
    if args.md:
        args.md.write_text(md + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
