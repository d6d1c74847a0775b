"""Tune one kernel of a zoo model with MetaSchedule and report where the time went.

Usage (from the repository root)::

    .venv/bin/python bench/bench_tvm_kernel.py --list                       # the model's kernels
    .venv/bin/python bench/bench_tvm_kernel.py --task fused_conv2d1_add1_relu1 --layout NCHW
    .venv/bin/python bench/bench_tvm_kernel.py --task fused_conv2d1_add1_relu1 --layout NHWC,HWIO

It builds the model as gcomp compiles for TVM (prepare_for_tvm, import, fuse), optionally with
``conv2d`` converted to another layout (``NCHW`` keeps the model's), tunes the one kernel for
``--trials`` candidates in one search round with gcomp's in-process builder and runner, and
prints the best time and GFLOP/s with the seconds spent building, timing and searching. This
is how bench/TVM.md's layout table was measured. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--task", default="fused_conv2d1_add1_relu1")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--layout", default="NHWC,HWIO", help="data,kernel layout for conv2d; NCHW: unchanged")
    parser.add_argument("--list", action="store_true", help="list the kernels and exit")
    args = parser.parse_args()
    os.environ["GCOMP_TVM_LAYOUT"] = "NCHW"  # the backend's own choice off: --layout decides

    import models
    from gcomp.autoselect import prepare_for_tvm
    from gcomp.backends.tvm import lowering, measure, targets, threads, tuning
    from gcomp.backends.tvm.diagnostics import quiet_meta_schedule
    from gcomp.inputs import generate_inputs

    threads.start_pool()
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm.s_tir.meta_schedule.builder import local_builder
    from tvm.s_tir.meta_schedule.runner import local_runner

    model = models.build(args.model, batch=1, size=args.size)
    feeds, _ = generate_inputs(model, seed=0)
    mod, _ = lowering.import_onnx(prepare_for_tvm(model, {k: v.shape for k, v in feeds.items()}))
    tgt = targets.host_target()
    if args.layout.upper() != "NCHW":
        with tgt:
            convert = relax.transform.ConvertLayout({"relax.nn.conv2d": args.layout.split(",")})
            mod = tvm.transform.Sequential([convert, relax.transform.Normalize()])(mod)
    mod, _ = lowering.fuse(mod, tgt)
    quiet_meta_schedule()
    measure.fast_inspect()
    tasks = ms.relax_integration.extract_tasks(mod, tgt)
    if args.list:
        for t in tasks:
            print(f"{t.task_name:45s} calls={int(t.weight)} GFLOP={float(estimate_tir_flops(t.dispatched[0])) / 1e9:.3f}")
        return
    (task,) = [t for t in tasks if t.task_name == args.task] or sys.exit(f"no kernel {args.task!r}; --list shows them")
    flops = float(estimate_tir_flops(task.dispatched[0]))

    spent = {"build": 0.0, "time": 0.0}

    def timed(key, fn):
        def wrapper(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper

    local_builder.default_build = timed("build", local_builder.default_build)
    local_runner._worker_func = timed("time", local_runner._worker_func)
    work = Path(tempfile.mkdtemp(prefix="gcomp-kernel-"))
    builder, runner = measure.in_process_builder_runner(work, tuning.DEFAULT_EVALUATOR)
    db = ms.database.JSONDatabase(work_dir=str(work))
    t0 = time.perf_counter()
    tuning.search_round(ms, task, args.trials, work=work, db=db, builder=builder, runner=runner)
    total = time.perf_counter() - t0
    best = tuning.best_seconds(db, task)
    search = total - spent["build"] - spent["time"]
    print(f"{args.task} layout={args.layout} trials={len(db)}: best {best * 1e3:.3f} ms = {flops / best / 1e9:.1f} GFLOP/s; "
          f"{total:.1f} s (build {spent['build']:.1f}, timing {spent['time']:.1f}, search {search:.1f})")


if __name__ == "__main__":
    main()
