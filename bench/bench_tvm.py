"""Benchmark the TVM backend against ONNX Runtime: untuned TVM, tuned TVM, ORT_ENABLE_ALL.

Usage (from the repository root)::

    .venv/bin/python bench/bench_tvm.py                                  # mlp, cnn, transformer
    .venv/bin/python bench/bench_tvm.py --models cnn --trials 256 --minutes 10
    .venv/bin/python bench/bench_tvm.py --md bench/TVM.md --json bench/tvm_results.json

For every model (built by ``models.build`` with static shapes, batch 1) it measures, in
this one process and on the same seeded inputs:

* ``ort``: ONNX Runtime, ORT_ENABLE_ALL, default threads, median of ``--iters`` runs;
* ``tvm untuned``: gcomp's TVM backend without a tuning database (fused kernels with
  dlight's CPU rules where they apply, the rest unscheduled);
* ``tvm tuned``: MetaSchedule with ``--trials`` trials (and at most ``--minutes``),
  records in ``--cache`` (default: a fresh folder per run, so the tuning time is real).

Every TVM output is checked against ORT with optimizations off (fp32 tolerances); the
table gives latency, the ratio ORT/TVM (> 1: TVM faster), the tuning time and trials,
and the three slowest tuned kernels (which ONNX nodes are behind).
This is a benchmark, not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {
    "mlp": {"batch": 1},
    "cnn": {"batch": 1, "size": 64},
    "transformer": {"seq": 128, "layers": 2},
    "resnet18": {"batch": 1, "size": 224},
}


def _median_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def bench_model(name: str, args) -> dict:
    import numpy as np
    from gcomp.backends.ort import OrtBackend
    from gcomp.backends.tvm import TvmBackend

    import models
    from gcomp.autoselect import prepare_for_tvm
    from gcomp.inputs import generate_inputs
    from gcomp.verify import TOLERANCES, compare_outputs

    model = models.build(name, **SIZES.get(name, {}))
    feeds, _ = generate_inputs(model, seed=0)
    shapes = {k: v.shape for k, v in feeds.items()}
    row: dict = {"model": name, "input_shapes": {k: list(v) for k, v in shapes.items()}}
    ref = OrtBackend().compile(model, "cpu", optimization="disable").run(feeds)
    ort = OrtBackend().compile(model, "cpu", optimization="all")
    row["ort_ms"] = _median_ms(lambda: ort.run(feeds), args.iters)

    def tvm_row(label: str, **kw):
        t0 = time.perf_counter()
        exe = TvmBackend().compile(prepare_for_tvm(model, shapes, target="llvm"), "llvm", **kw)
        compile_s = time.perf_counter() - t0
        checks = compare_outputs(ref, exe.run(feeds), TOLERANCES)
        ok = all(c.ok for c in checks)
        ms = _median_ms(lambda: exe.run(feeds), args.iters)
        entry = {"ms": ms, "compile_s": compile_s, "verified": ok,
                 "max_abs_error": max(c.max_abs_error for c in checks), "ratio_vs_ort": row["ort_ms"] / ms}
        if exe.tuning is not None:
            entry["tuning"] = exe.tuning.to_dict()
        prof = exe.profile(feeds, iters=3, warmup=1, profile_runs=3)
        entry["top_kernels"] = [
            {"node": o.node, "op_type": o.op_type, "kernel": o.provider, "ms": o.time_ms, "share": o.share}
            for o in prof.ops[:3]
        ]
        row[label] = entry
        print(f"{name}: {label} {ms:.3f} ms (ORT {row['ort_ms']:.3f} ms, ratio {entry['ratio_vs_ort']:.2f}, "
              f"verified {ok})", file=sys.stderr)

    tvm_row("tvm_untuned", cache_dir=args.cache_untuned)
    if args.trials > 0:
        tvm_row("tvm_tuned", tune_trials=args.trials, tune_seconds=args.minutes * 60 if args.minutes else None,
                cache_dir=args.cache, progress=lambda m: print(f"{name}: {m}", file=sys.stderr))
    del np
    return row


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# TVM backend vs ONNX Runtime (CPU)",
        "",
        f"`{meta['command']}` — {meta['cpu']}, {meta['cores']} cores, {meta['date']}; tuning budget "
        f"{meta['trials']} trials" + (f", at most {meta['minutes']} min" if meta["minutes"] else "") + " per model; "
        f"TVM kernels on {meta.get('tvm_threads', '?')} threads, ORT on its default intra-op threads.",
        "Ratio = ORT ms / TVM ms (above 1: TVM is faster). Latency: median of "
        f"{meta['iters']} runs, inputs from numpy each run (as for ORT).",
        "",
        "| model | ORT_ENABLE_ALL ms | TVM untuned ms | ratio | TVM tuned ms | ratio | tuning s | trials "
        "| kernels tuned/reused/left | verified |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        u, t = r.get("tvm_untuned", {}), r.get("tvm_tuned")
        tun = (t or {}).get("tuning") or {}
        lines.append(
            f"| {r['model']} | {r['ort_ms']:.3f} | {u.get('ms', float('nan')):.3f} | {u.get('ratio_vs_ort', 0):.2f} | "
            + (f"{t['ms']:.3f} | {t['ratio_vs_ort']:.2f} | {tun.get('seconds', 0):.0f} | {tun.get('trials', 0)} | "
               f"{tun.get('tuned', 0)}/{tun.get('reused', 0)}/{tun.get('skipped', 0)} | " if t else "- | - | - | - | - | ")
            + ("yes" if u.get("verified") and (t is None or t.get("verified")) else "NO") + " |"
        )
    lines += ["", "Slowest kernels after tuning (ONNX node they produce, fused op types, share of kernel time):", ""]
    for r in rows:
        t = r.get("tvm_tuned") or r.get("tvm_untuned")
        tops = "; ".join(f"{k['node']} ({k['op_type']}) {k['ms']:.3f} ms {k['share'] * 100:.0f}%"
                         for k in t["top_kernels"])
        lines.append(f"- {r['model']}: {tops}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--trials", type=int, default=128, help="tuning trials per model (0: untuned only)")
    ap.add_argument("--minutes", type=float, default=None, help="tuning time budget per model")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cache", default=None, help="tuning database root (default: a fresh temp folder)")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.cache = args.cache or tempfile.mkdtemp(prefix="gcomp-bench-tvm-")
    args.cache_untuned = tempfile.mkdtemp(prefix="gcomp-bench-tvm-empty-")  # no records: truly untuned
    rows = [bench_model(name, args) for name in args.models.split(",") if name]
    meta = {
        "command": "python bench/bench_tvm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "trials": args.trials,
        "minutes": args.minutes, "iters": args.iters,
    }
    from gcomp.backends.tvm import runtime_threads

    meta["tvm_threads"] = runtime_threads()  # the pool the rows ran on (started by then)
    try:
        from gcomp.perf import environment

        meta["cpu"] = environment()["cpu"]
    except Exception:  # the figure stands without the CPU's name
        pass
    md = to_markdown(rows, meta)
    print(md)
    if args.md:
        Path(args.md).write_text(md, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    return 0 if all(r["tvm_untuned"]["verified"] and r.get("tvm_tuned", {"verified": True})["verified"]
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
