"""What folding a model's computed weights costs and buys: gcomp's size-limited O1 against
O1 with the limit lifted and onnxslim's default output, on the onnx wheel's "light" models.

Those models compute every weight at run time (``ConstantOfShape(shape, value)``), so a
folder that materializes them makes the file grow from kilobytes to the model's real size;
gcomp's O1 refuses a folded output that is bigger than its inputs and over
``max_fold_bytes`` (1 KiB), onnxslim and onnxsim materialize everything. This measures, per
model and variant, in one run:

* nodes left and the file's size;
* the optimizer's wall time and peak RSS (one child process each);
* ONNX Runtime's session creation time and the peak RSS of a process that creates the
  session and runs one inference (ORT_ENABLE_ALL, the CPU provider, 2 threads): the cost
  a deployment pays for what the file leaves computed.

Variants run interleaved, ``--rounds`` rounds (median reported), each in a fresh process.

Run::

    .venv/bin/python bench/bench_fold_limit.py --md bench/FOLD_LIMIT.md --json bench/fold_limit.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet50", "densenet121", "inception_v2", "shufflenet", "vgg19", "bvlc_alexnet")
VARIANTS = ("original", "gcomp-O1", "gcomp-O1-grow", "onnxslim")
UNLIMITED = 1 << 40

# The child's own peak RSS: VmHWM starts afresh at exec, where ru_maxrss keeps the high-water
# mark of the parent it was forked from (this script, which reads the grown files).
_PEAK = r"""
def _peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""

# One child process per optimization: wall time and peak RSS of that job alone.
_OPTIMIZE = _PEAK + r"""
import sys, time
src, dst, variant = sys.argv[1:4]
t = time.perf_counter()
if variant == "onnxslim":
    import onnx, onnxslim
    onnx.save(onnxslim.slim(onnx.load(src)), dst)
else:
    import gcomp
    options = {"max_fold_bytes": %d} if variant == "gcomp-O1-grow" else {}
    gcomp.optimize(src, "O1", verify=False, **options).save(dst)
print(time.perf_counter() - t, _peak())
""" % UNLIMITED

# One child process per session: creation time, then one run, then the peak RSS.
_LOAD = _PEAK + r"""
import sys, time
import numpy as np
import onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 2
options.log_severity_level = 3
t = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t
feed = {i.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in session.get_inputs()}
t = time.perf_counter()
session.run(None, feed)
print(load, time.perf_counter() - t, _peak())
"""


def _light(name: str) -> Path:
    import onnx

    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _child(code: str, *args: str) -> list[float]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return [float(x) for x in proc.stdout.split()]


def measure(models, rounds: int, work: Path) -> list[dict]:
    rows = []
    for name in models:
        src = _light(name)
        files = {"original": src}
        optimize: dict[str, list[list[float]]] = {v: [] for v in VARIANTS[1:]}
        for r in range(rounds):  # interleaved: each round runs every variant once
            for variant in VARIANTS[1:]:
                dst = work / f"{name}.{variant}.onnx"
                optimize[variant].append(_child(_OPTIMIZE, str(src), str(dst), variant))
                files[variant] = dst
        loads: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for variant in VARIANTS:
                loads[variant].append(_child(_LOAD, str(files[variant])))
        for variant in VARIANTS:
            row = {"model": f"light_{name}", "variant": variant, "nodes": _nodes(files[variant]),
                   "file_bytes": files[variant].stat().st_size,
                   "load_s": statistics.median(x[0] for x in loads[variant]),
                   "run_s": statistics.median(x[1] for x in loads[variant]),
                   "ort_peak_rss_bytes": statistics.median(x[2] for x in loads[variant])}
            if variant in optimize:
                row["optimize_s"] = statistics.median(x[0] for x in optimize[variant])
                row["optimize_peak_rss_bytes"] = statistics.median(x[1] for x in optimize[variant])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _mb(n: float | None) -> str:
    return "—" if n is None else (f"{n / 1e6:.1f}" if n >= 1e5 else f"{n / 1e6:.3f}")


def markdown(rows: list[dict], command: str, env: dict) -> str:
    lines = [
        "# Folding computed weights: what it costs and buys",
        "",
        f"`{command}` ({env['when']}; {env['cpu']}, {env['cores']} cores; onnxruntime {env['onnxruntime']}, "
        f"onnxslim {env['onnxslim']}). Medians of {env['rounds']} interleaved rounds, each in a fresh process.",
        "",
        "`gcomp-O1-grow` is O1 with `--set max_fold_bytes=1099511627776`. Session = ONNX Runtime's "
        "`InferenceSession` creation (ORT_ENABLE_ALL, CPU, 2 threads); its peak RSS is that of a process "
        "that creates the session and runs one inference.",
        "",
        "| model | variant | nodes | file MB | optimize s | optimize peak MB | session s | first run s | "
        "session peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['nodes']} | {_mb(r['file_bytes'])} | "
            f"{r['optimize_s']:.2f} | {_mb(r['optimize_peak_rss_bytes'])} | " if "optimize_s" in r else
            f"| {r['model']} | {r['variant']} | {r['nodes']} | {_mb(r['file_bytes'])} | — | — | "
        )
        lines[-1] += f"{r['load_s']:.3f} | {r['run_s']:.3f} | {_mb(r['ort_peak_rss_bytes'])} |"
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import onnxruntime
    import onnxslim

    env = {"when": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
           "cores": len(__import__("os").sched_getaffinity(0)), "onnxruntime": onnxruntime.__version__,
           "onnxslim": onnxslim.__version__, "rounds": args.rounds}
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with tempfile.TemporaryDirectory() as work:
        rows = measure(args.models.split(","), args.rounds, Path(work))
    command = "python bench/bench_fold_limit.py " + " ".join(sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps({"env": env, "command": command, "rows": rows}, indent=1) + "\n")
    if args.md:
        args.md.write_text(markdown(rows, command, env))
    else:
        print(markdown(rows, command, env))


if __name__ == "__main__":
    main()
