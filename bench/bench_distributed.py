"""Forward latency and per-rank weights of sharded runs vs the unsharded model (ratios).

Usage::

    .venv/bin/python bench/bench_distributed.py [MODEL.onnx ...] --shape NAME=D1,D2 ... \
        --meshes tp=2,dp=2 --iters 30 --md bench/DISTRIBUTED.md --json bench/distributed.json

For each model: the unsharded model on ONNX Runtime (all optimizations) with 1 thread and
with as many threads as ranks, then each mesh under ``mpiexec`` (the ``mpich`` wheel's),
one ORT thread per rank, every forward started after a barrier; the median over
``--iters`` runs. Collective time is measured inside the same runs (time spent in the
communicator). Default model: the 2-layer transformer builder; the torch-exported GPT-2
and BERT are used when ``/tmp/gcomp-bench-cache/torch`` holds them.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = Path("/tmp/gcomp-bench-cache/torch")


def _feeds(model_path: str, shapes: dict, mesh: str):
    from gcomp.passes.sharding import parse_mesh

    from gcomp import io
    from gcomp.distributed.runner import make_feeds

    return make_feeds(io.load(model_path), parse_mesh(mesh), None, shapes)


def _unsharded(model_path: str, feeds: dict, threads: int, iters: int) -> float:
    from gcomp.backends import get_backend

    exe = get_backend("ort").compile(model_path, "cpu", optimization="all", threads=threads)
    for _ in range(3):
        exe.run(feeds)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        exe.run(feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


class _Timed:
    """A communicator wrapper that adds up the time spent in collectives."""

    def __init__(self, comm):
        self.comm, self.seconds = comm, 0.0

    def collective(self, op, attrs, x):
        t = time.perf_counter()
        out = self.comm.collective(op, attrs, x)
        self.seconds += time.perf_counter() - t
        return out


def _worker(args) -> None:
    from gcomp.passes.sharding import summarize
    from mpi4py import MPI

    from gcomp import io
    from gcomp.distributed.comm import MpiCommunicator
    from gcomp.distributed.runner import local_feeds, prepare, run_rank, segments

    shapes = {k: tuple(v) for k, v in json.loads(args.shapes_json).items()}
    feeds = _feeds(args.model, shapes, args.mesh)
    prepared = prepare(io.load(args.model), args.mesh, feeds)
    comm = _Timed(MpiCommunicator(prepared.mesh))
    rank = MPI.COMM_WORLD.Get_rank()
    rank_model = prepared.rank_model(rank)
    segs = segments(rank_model, threads=1)
    mine = local_feeds(prepared, feeds, rank)
    names = [v.name for v in rank_model.graph.outputs]
    for _ in range(3):
        run_rank(segs, mine, comm, names)
    times, comm_times = [], []
    for _ in range(args.iters):
        MPI.COMM_WORLD.Barrier()
        comm.seconds = 0.0
        t = time.perf_counter()
        run_rank(segs, mine, comm, names)
        times.append(time.perf_counter() - t)
        comm_times.append(comm.seconds)
    worst = MPI.COMM_WORLD.gather((statistics.median(times), statistics.median(comm_times)), root=0)
    if rank == 0:
        s = summarize(prepared.model, prepared.plan)
        print(json.dumps({
            "latency_ms": max(w[0] for w in worst) * 1e3,
            "collective_ms": max(w[1] for w in worst) * 1e3,
            "collectives": s["all_reduces"] + s["all_gathers"],
            "bytes_per_rank": s["parameter_bytes_per_rank"],
            "bytes": s["parameter_bytes"],
        }))


def _models(paths: list[str]) -> list[tuple[str, str, dict]]:
    if paths:
        return [(Path(p).stem, p, {}) for p in paths]
    from gcomp import io
    from models.transformer import build

    out = []
    block = Path("/tmp/gcomp-bench-cache/distributed/block.onnx")
    block.parent.mkdir(parents=True, exist_ok=True)
    if not block.exists():
        io.save(build(layers=2, hidden=256, heads=4, ffn=1024, vocab=8192), block)
    out.append(("transformer block (2 layers, 256)", str(block), {"input_ids": (2, 128)}))
    for name in ("gpt2", "bert"):
        path = CACHE / f"{name}.onnx"
        if path.exists():
            shapes = {"input_ids": (2, 128), "attention_mask": (2, 128)}
            if name == "bert":
                shapes["token_type_ids"] = (2, 128)
            out.append((f"{name} (torch export, 4 layers, 256)", str(path), shapes))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--meshes", default="tp=2,dp=2")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", help=argparse.SUPPRESS)
    parser.add_argument("--shapes-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    from gcomp.passes.sharding import parse_mesh

    from gcomp.distributed.launch import find_mpiexec

    rows = []
    for label, path, shapes in _models(args.models):
        for mesh in args.meshes.split(";") if ";" in args.meshes else args.meshes.split(","):
            n = parse_mesh(mesh).size
            feeds = _feeds(path, shapes, mesh)
            base1 = _unsharded(path, feeds, 1, args.iters)
            base_n = _unsharded(path, feeds, n, args.iters)
            cmd = [find_mpiexec(), "-n", str(n), sys.executable, __file__, "--worker", "--model", path,
                   "--mesh", mesh, "--shapes-json", json.dumps({k: list(v.shape) for k, v in feeds.items()}),
                   "--iters", str(args.iters)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"model": label, "mesh": mesh, "ranks": n, "unsharded_1t_ms": base1, f"unsharded_{n}t_ms": base_n,
                   **got, "speedup_vs_1t": base1 / got["latency_ms"], "speedup_vs_nt": base_n / got["latency_ms"],
                   "weights_per_rank_ratio": got["bytes_per_rank"] / got["bytes"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "iters": args.iters}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.md:
        lines = [f"Measured {meta['when']} on {meta['cpus']} CPUs ({meta['machine']}), median of {args.iters} forwards.",
                 "",
                 ("| model | mesh | ranks | unsharded ms (1 thread / ranks threads) | sharded ms | in collectives ms "
                  "| speed-up vs 1 thread / vs same threads | collectives | weights per rank |"),
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            n = r["ranks"]
            lines.append(
                f"| {r['model']} | {r['mesh']} | {n} | {r['unsharded_1t_ms']:.2f} / {r[f'unsharded_{n}t_ms']:.2f} | "
                f"{r['latency_ms']:.2f} | {r['collective_ms']:.2f} | {r['speedup_vs_1t']:.2f}x / "
                f"{r['speedup_vs_nt']:.2f}x | {r['collectives']} | {r['weights_per_rank_ratio']:.2f} |")
        args.md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
