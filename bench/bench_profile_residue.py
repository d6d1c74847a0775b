"""How close do per-op times sum to the measured per-run latency on ONNX Runtime, and where
does the rest go? A study, not a test (pytest only collects tests/).

For every zoo model and ORT optimization level (all, disable), in one process:

- ``wall``: median wall time of ``session.run`` on a plain session (what gcomp profile
  reports as latency);
- ``wall_prof``: the same on a session with ORT's profiling on (gcomp's per-op source);
- from that session's trace, per run: ``model_run`` (ORT's span of the run),
  ``execute`` (its SequentialExecutor span) and ``kernels`` (sum of the kernel events).

The residue ``wall - kernels`` splits into: executor gaps (``model_run - kernels``:
allocation, scheduling and bookkeeping between kernels), the Python binding
(``wall_prof - model_run``: feeding numpy arrays, fetching outputs), and profiling's own
cost (``wall_prof - wall``). Minimums over the runs (the least disturbed on a shared
machine), and the in-run ratio ``kernels / model_run`` as the median of per-run ratios;
all times in ms.

    .venv/bin/python bench/bench_profile_residue.py --md bench/PROFILE_RESIDUE.md --json bench/profile_residue.json
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = Path(os.environ.get("GCOMP_BENCH_CACHE", "/tmp/gcomp-bench-cache")) / "torch"


def zoo(work: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (model path, input shapes). Builders always; torch exports when cached."""
    from gcomp import io
    from models import build

    out = {"default": (REPO / "models" / "default.onnx", {"input_ids": (1, 128)})}
    for name, kwargs, shapes in (
        ("cnn", {}, {"input": (1, 3, 32, 32)}),
        ("mlp", {}, None),
        ("resnet18", {}, {"input": (1, 3, 224, 224)}),
    ):
        path = work / f"{name}.onnx"
        io.save(build(name, **kwargs), path)
        out[name] = (path, shapes or {})
    text = {"input_ids": (1, 128), "attention_mask": (1, 128), "token_type_ids": (1, 128)}
    for name, shapes in (
        ("bert", text),
        ("gpt2", {k: v for k, v in text.items() if k != "token_type_ids"}),
        ("resnet", {"pixel_values": (1, 3, 224, 224)}),
        ("vit", {"pixel_values": (1, 3, 224, 224)}),
        ("mobilenetv2", {"pixel_values": (1, 3, 224, 224)}),
    ):
        path = CACHE / f"{name}.onnx"
        if path.exists():
            out[f"torch_{name}"] = (path, shapes)
    return out


def measure(path: Path, shapes: dict, optimization: str, iters: int) -> dict:
    import onnxruntime as ort

    from gcomp import io
    from gcomp.inputs import generate_inputs

    feeds, _ = generate_inputs(io.load(path), shapes=shapes)
    level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = level[optimization]
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        sp = ort.SessionOptions()
        sp.graph_optimization_level = level[optimization]
        sp.enable_profiling = True
        sp.profile_file_prefix = str(Path(tmp) / "p")
        prof = ort.InferenceSession(str(path), sp, providers=["CPUExecutionProvider"])
        for s in (plain, prof):
            for _ in range(3):
                s.run(None, feeds)
        wall, wall_prof = [], []
        for _ in range(iters):  # interleaved so both sessions see the same machine load
            t0 = time.perf_counter()
            plain.run(None, feeds)
            wall.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            prof.run(None, feeds)
            wall_prof.append((time.perf_counter() - t0) * 1e3)
        events = json.loads(Path(prof.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][
        -iters:
    ]
    execs = [
        e
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "SequentialExecutor::Execute"
    ][-iters:]
    kernels = [
        e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
    ]
    per_run_kernels = []
    for run in runs:
        lo, hi = run["ts"], run["ts"] + run["dur"]
        per_run_kernels.append(sum(e["dur"] for e in kernels if lo <= e["ts"] <= hi) / 1e3)
    # Other processes on the machine stretch some runs by several times, so every split is
    # taken within one run (or one interleaved pair of runs), then the median over runs.
    med = statistics.median
    model_runs = [r["dur"] / 1e3 for r in runs]
    return {
        "kernels_per_run": len(
            [e for e in kernels if runs[-1]["ts"] <= e["ts"] <= runs[-1]["ts"] + runs[-1]["dur"]]
        ),
        "wall": min(wall),
        "wall_p50": med(wall),
        "wall_prof": med(wall_prof),
        "model_run": med(model_runs),
        "execute": med(e["dur"] / 1e3 for e in execs),
        "kernels": med(per_run_kernels),
        "in_run_coverage": med(k / m for k, m in zip(per_run_kernels, model_runs) if m > 0),
        "kernels_over_wall_prof": med(k / w for k, w in zip(per_run_kernels, wall_prof)),
        "executor_gaps": med(m - k for k, m in zip(per_run_kernels, model_runs)),
        "binding": med(w - m for w, m in zip(wall_prof, model_runs)),
        "profiling_cost": med(p - w for p, w in zip(wall_prof, wall)),
        "profiling_cost_per_kernel_us": 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--models", default=None, help="comma-separated subset")
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        models = zoo(Path(work))
        wanted = args.models.split(",") if args.models else list(models)
        for name in wanted:
            path, shapes = models[name]
            for optimization in ("all", "disable"):
                r = measure(path, shapes, optimization, args.iters)
                r.update(model=name, optimization=optimization)
                r["profiling_cost_per_kernel_us"] = (
                    r["profiling_cost"] * 1e3 / max(r["kernels_per_run"], 1)
                )
                rows.append(r)
                print(
                    f"{name:18} {optimization:8} wall {r['wall_p50']:8.3f}  kernels {r['kernels']:8.3f} "
                    f"({r['in_run_coverage'] * 100:5.1f}% of model_run)  gaps {r['executor_gaps']:6.3f}  "
                    f"binding {r['binding']:6.3f}",
                    file=sys.stderr,
                )
    from gcomp.perf import environment

    env = environment()
    header = (
        "| model | ORT opt | kernels/run | wall ms (min / p50) | Σ kernels ms | Σ kernels / model_run | "
        "Σ kernels / wall (same session) | executor gaps ms | binding ms | profiling cost ms (per kernel µs) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['optimization']} | {r['kernels_per_run']} | {r['wall']:.3f} / {r['wall_p50']:.3f} | "
        f"{r['kernels']:.3f} | {r['in_run_coverage'] * 100:.1f}% | {r['kernels_over_wall_prof'] * 100:.1f}% | "
        f"{r['executor_gaps']:.3f} | {r['binding']:.3f} | {r['profiling_cost']:+.3f} "
        f"({r['profiling_cost_per_kernel_us']:+.1f}) |"
        for r in rows
    ]
    md = (
        f"Measured {env['timestamp']} on {env['cpu']}, {env['cores']} cores, onnxruntime "
        f"{env['versions'].get('onnxruntime') or env['versions'].get('onnxruntime-gpu')}; {args.iters} interleaved "
        "runs per session, medians of per-run figures (other processes were loading the machine).\n\n"
        + header
        + "\n".join(lines)
        + "\n"
    )
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(
            json.dumps({"environment": env, "iters": args.iters, "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
