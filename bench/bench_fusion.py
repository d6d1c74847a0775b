"""Benchmark gcomp's fusion pipelines (O2, O3 for ONNX Runtime) against ORT's own optimizer.

Usage (from the repository root)::

    .venv/bin/python bench/bench_fusion.py                          # the zoo, 30 timed runs each
    .venv/bin/python bench/bench_fusion.py --models torch_bert,cnn --runs 50
    .venv/bin/python bench/bench_fusion.py --md bench/FUSION.md --json bench/fusion_results.json

For every model, in one process and one run, on ONNX Runtime's CPU provider with
``ORT_ENABLE_ALL`` and ``--threads`` intra-op threads (2 by default, the CI machine):

* ``original``   the model as exported / built, optimized online by ORT alone (the baseline);
* ``gcomp-O2``   ``gcomp.optimize(model, "O2")``: portable fusions (standard ONNX ops);
* ``gcomp-O3``   ``gcomp.optimize(model, "O3", target="ort-cpu")``: plus com.microsoft ops;
* ``ort-transformers`` (transformer models only) ``onnxruntime.transformers.optimizer``'s output.

Timing happens in a fresh process that imports only ONNX Runtime (in the process that
ran gcomp every variant measured ~3x slower). Sessions are created once; timed runs are
interleaved in blocks (each round runs every
variant once untimed, then 5 timed runs; ``--runs`` timed runs in all, after ``--warmup``
rounds) so that machine noise hits all variants alike, while no session is timed against
the still-spinning thread pool of the one before it. The figure is the median latency; ratios are original / variant (above 1:
faster than ORT alone). Every variant's outputs are compared with the original's on
``ORT_DISABLE_ALL`` (max abs difference). It also counts nodes after O2 against onnxslim's
default output, and fused ops against the transformers optimizer's.

This is a benchmark, not a test: it is not collected by the test suite.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_optimize as common  # noqa: E402  (zoo, exports, seeded inputs)

DEFAULT_MODELS = (
    "mlp", "cnn", "transformer", "transformer_l6_h256", "default",
    "torch_bert", "torch_gpt2", "torch_vit", "torch_resnet", "torch_mobilenetv2",
)
TRANSFORMERS = {  # model -> (onnxruntime.transformers model_type, num_heads, hidden_size)
    "transformer": ("bert", 4, 128), "transformer_l6_h256": ("bert", 4, 256), "default": ("bert", 4, 128),
    "torch_bert": ("bert", 4, 256), "torch_gpt2": ("gpt2", 4, 256), "torch_vit": ("vit", 3, 192),
}
HEADLINE = ("torch_bert", "torch_gpt2", "torch_vit")  # the transformer geomean
FUSED_OPS = (
    "Attention", "MultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "EmbedLayerNormalization",
    "Gelu", "FastGelu", "BiasGelu", "FusedConv", "FusedMatMul", "Gemm",
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _session(path: Path, threads: int, level: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _op_counts(path: Path) -> tuple[int, collections.Counter]:
    """All nodes (main graph and subgraphs), and the count per op type whatever its domain
    (a com.microsoft Gelu counts as a Gelu fusion); bench_optimize's counter walks the graphs."""
    counted = common.count_nodes(path)
    by_type: collections.Counter = collections.Counter()
    for op, n in counted["ops"].items():
        by_type[op.split("::")[-1]] += n
    return counted["nodes"], by_type


def _gcomp(src: Path, dst: Path, level: str) -> dict:
    import gcomp

    t0 = time.perf_counter()
    options = {"target": "ort-cpu"} if level == "O3" else {}
    result = gcomp.optimize(src, level, **options)
    seconds = time.perf_counter() - t0
    if not result.verification.passed:
        raise RuntimeError(f"gcomp {level} did not verify: {result.verification.summary()}")
    result.save(dst)
    return {"seconds": seconds, "verification": result.verification.summary()}


def _transformers_optimizer(src: Path, dst: Path, spec: tuple[str, int, int]) -> dict:
    """ORT's offline transformer optimizer, told the architecture (it fails to detect it)."""
    from onnxruntime.transformers import optimizer

    model_type, heads, hidden = spec
    t0 = time.perf_counter()
    model = optimizer.optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden)
    model.save_model_to_file(str(dst))
    return {"seconds": time.perf_counter() - t0}


def _onnxslim_nodes(src: Path) -> int | None:
    try:
        import onnx
        import onnxslim
    except ImportError:
        return None
    slimmed = onnxslim.slim(onnx.load(str(src)))
    return sum(1 for _ in slimmed.graph.node)


def bench_model(name: str, folder: Path, cache: Path, runs: int, warmup: int, threads: int) -> dict:
    zoo = common._zoo()
    src = common._materialize(name, zoo[name][1], folder, cache, _log)
    variants: dict[str, Path] = {"original": src}
    row: dict = {"model": name, "source": zoo[name][0], "variants": {}}
    for level in ("O2", "O3"):
        dst = folder / f"{name}.{level}.onnx"
        info = _gcomp(src, dst, level)
        variants[f"gcomp-{level}"] = dst
        row["variants"][f"gcomp-{level}"] = info
    if name in TRANSFORMERS:
        dst = folder / f"{name}.ort-transformers.onnx"
        try:
            row["variants"]["ort-transformers"] = _transformers_optimizer(src, dst, TRANSFORMERS[name])
            variants["ort-transformers"] = dst
        except Exception as e:  # noqa: BLE001  (a peer failing is a result, not a crash)
            row["variants"]["ort-transformers"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    row["variants"].setdefault("original", {})

    feeds = common.make_inputs(src)
    reference = common.run_ort(src, feeds)
    for key, path in variants.items():
        check = common.compare(reference, common.run_ort(path, feeds))
        row["variants"][key]["matches"] = check["match"]
        row["variants"][key]["max_abs_diff"] = math.inf if check["problems"] else check["max_abs_err"]
        nodes, counts = _op_counts(path)
        row["variants"][key]["nodes"] = nodes
        row["variants"][key]["fused_ops"] = {op: counts[op] for op in FUSED_OPS if counts.get(op)}
    timed = _time_in_fresh_process(variants, feeds, folder / f"{name}.feeds.npz", runs, warmup, threads)
    base_min, base_med = timed["original"]
    for key, (fastest, med) in timed.items():
        row["variants"][key]["min_ms"] = fastest
        row["variants"][key]["median_ms"] = med
        row["variants"][key]["speedup"] = base_min / fastest
        row["variants"][key]["speedup_median"] = base_med / med
    row["onnxslim_nodes"] = _onnxslim_nodes(src)
    return row


def _time_in_fresh_process(variants: dict, feeds: dict, feeds_path: Path, runs: int, warmup: int,
                           threads: int) -> dict[str, list[float]]:
    """[min, median] latency per variant, timed by a fresh Python process that imports only ORT.

    The parent has run gcomp (verification sessions, thread pools, a large heap); timed in
    the same process, every variant ran ~3x slower than in a clean one.
    """
    import subprocess

    import numpy as np

    np.savez(feeds_path, **feeds)
    job = {"variants": {k: str(v) for k, v in variants.items()}, "feeds": str(feeds_path), "runs": runs,
           "warmup": warmup, "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--time-worker", json.dumps(job)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"timing worker failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time_worker(job: dict) -> None:
    import numpy as np

    data = np.load(job["feeds"])
    feeds = {k: data[k] for k in data.files}
    sessions = {}
    for key, path in job["variants"].items():
        sess = _session(Path(path), job["threads"])
        wanted = {i.name for i in sess.get_inputs()}
        sessions[key] = (sess, {k: v for k, v in feeds.items() if k in wanted})
    # Interleaved in blocks: ORT's intra-op threads spin for a while after a run, so a
    # session timed right after another one competes with its spinning threads. Each block
    # first runs its session once untimed.
    samples = {key: [] for key in sessions}
    block = 5
    for round_ in range(job["warmup"] + max(1, job["runs"] // block)):
        for key, (sess, f) in sessions.items():
            sess.run(None, f)
            for _ in range(block):
                t0 = time.perf_counter()
                sess.run(None, f)
                if round_ >= job["warmup"]:
                    samples[key].append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({key: [min(v), statistics.median(v)] for key, v in samples.items()}))


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def render_md(rows: list[dict], args) -> str:
    import platform

    lines = [
        "# Fusion: gcomp O2 / O3 vs ONNX Runtime's own optimizer",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/bench_fusion.py', *sys.argv[1:]])}` — "
        f"{platform.processor() or platform.machine()}, {args.threads} intra-op threads, "
        f"{args.runs} runs per variant, interleaved in blocks of 5 in a fresh process, after {args.warmup} warm-up rounds. Every variant runs "
        "with ORT_ENABLE_ALL. Each cell: min / median ms (speed-up on min / on median; >1: faster "
        "than ORT alone). The VM's latency is noisy at ±10 % with bursts: the min is the reproducible figure.",
        "",
        "| model | original ms (min / median) | gcomp O2 | gcomp O3 | ORT transformers optimizer | nodes orig / O2 / onnxslim | max abs diff O3 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | |")
            continue
        v = r["variants"]

        def cell(key):
            x = v.get(key)
            if not x or "median_ms" not in x:
                return "—" if not x else f"error: {x.get('error', '?')[:40]}"
            return f"{x['min_ms']:.2f} / {x['median_ms']:.2f} ({x['speedup']:.2f}x / {x['speedup_median']:.2f}x)"

        lines.append(
            f"| {r['model']} | {v['original']['min_ms']:.2f} / {v['original']['median_ms']:.2f} | "
            f"{cell('gcomp-O2')} | {cell('gcomp-O3')} | "
            f"{cell('ort-transformers')} | {v['original']['nodes']} / {v['gcomp-O2']['nodes']} / "
            f"{r.get('onnxslim_nodes') if r.get('onnxslim_nodes') is not None else '—'} | "
            f"{v['gcomp-O3']['max_abs_diff']:.1e} |"
        )
    ok = [r for r in rows if "error" not in r]
    heads = [r["variants"]["gcomp-O3"]["speedup"] for r in ok if r["model"] in HEADLINE]
    g = _geomean(heads)
    g_med = _geomean([r["variants"]["gcomp-O3"]["speedup_median"] for r in ok if r["model"] in HEADLINE])
    lines += ["", f"Geomean O3 speed-up on {', '.join(HEADLINE)}: "
              + (f"**{g:.3f}x** on min, {g_med:.3f}x on median" if g else "n/a"),
              "Minimum O3 speed-up over all models: "
              + (f"**{min(r['variants']['gcomp-O3']['speedup'] for r in ok):.3f}x**" if ok else "n/a"), ""]
    lines += ["## Fused ops (O3 vs ORT's transformers optimizer)", "",
              "| model | gcomp O3 | ORT transformers optimizer |", "|---|---|---|"]
    for r in ok:
        if r["model"] not in TRANSFORMERS:
            continue
        o3 = r["variants"]["gcomp-O3"]["fused_ops"]
        peer = r["variants"].get("ort-transformers", {}).get("fused_ops", {})
        lines.append(f"| {r['model']} | {_fmt_ops(o3)} | {_fmt_ops(peer)} |")
    return "\n".join(lines) + "\n"


def _fmt_ops(ops: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "—"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--time-worker"]:
        _time_worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gcomp-fusion-bench-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            _log(f"{name} ...")
            try:
                rows.append(bench_model(name, Path(tmp), args.cache, args.runs, args.warmup, args.threads))
            except common.Skip as e:
                rows.append({"model": name, "error": f"skipped: {e}"})
            except Exception as e:  # noqa: BLE001
                rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            r = rows[-1]
            if "error" in r:
                _log(f"  {r['error']}")
            else:
                _log("  " + ", ".join(f"{k} {v['min_ms']:.2f}/{v['median_ms']:.2f} ms ({v['speedup']:.2f}x)"
                                      for k, v in r["variants"].items() if "median_ms" in v))
    md = render_md(rows, args)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
