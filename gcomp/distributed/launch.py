"""``gcomp run`` and ``gcomp shard``: the logic behind the thin CLI commands.

``gcomp run MODEL --ranks N`` started plainly launches N processes itself with the MPI
that gcomp installs (the ``mpich`` wheel's ``mpiexec`` beside the Python interpreter;
else the first ``mpiexec`` on PATH), each running ``python -m gcomp.distributed.launch``
with the same options; rank 0 prints and writes the outputs. Under an MPI launcher
(``mpiexec -n N gcomp run ...``) it runs this process's rank. ``--simulate`` runs every
rank in this process. Running over MPI needs ``gcomp[distributed]`` (mpi4py, and the
mpich wheel on Linux); without it ``gcomp run`` says so in one line before any process
starts (``--simulate`` and ``gcomp shard`` need no MPI).

Multiple hosts: put the same Python environment and model path on every host, list the
hosts in a hostfile (MPICH: ``host:slots`` per line) and pass ``--hostfile FILE``, or
launch yourself: ``mpiexec -f hosts -n 4 gcomp run model.onnx --shard tp=4``. MPICH's
launcher reaches other hosts over ssh (passwordless); ``--mpi-arg`` passes more options
to ``mpiexec`` (e.g. ``--mpi-arg=-iface --mpi-arg=eth0``).
"""

from __future__ import annotations

__all__ = ["find_mpiexec", "main", "run_command", "shard_command"]

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gcomp.deps import MissingExtraError, require
from gcomp.errors import GcompError, OptionError

_MPI = "running on MPI ranks"
_SIMULATE = "or run every rank in this process with --simulate"


def find_mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise MissingExtraError(
            f"{_MPI} needs mpiexec, which is not installed: pip install 'gcomp[distributed]' (brings the mpich "
            f"wheel's on Linux; elsewhere install an MPI such as MPICH or Open MPI), {_SIMULATE}"
        )
    return found


def _mesh_for(model_path, shard: str | None, ranks: int | None):
    from gcomp import io
    from gcomp.passes.sharding import parse_mesh, read_annotations

    model = io.load(model_path)
    found = None
    if shard:
        mesh = parse_mesh(shard)
    else:
        found = read_annotations(model)
        mesh = found[0] if found else parse_mesh(f"tp={ranks or 2}")
    if ranks is not None and ranks != mesh.size:
        raise OptionError(f"--ranks {ranks} does not match mesh {mesh} ({mesh.size} ranks)")
    # None: plan from the model's own annotations
    return mesh, (shard or (None if found else str(mesh)))


def run_command(params: dict, echo=print) -> int:
    """``gcomp run``; params: model, ranks, shard, inputs, input_shapes, outputs, check,
    simulate, hostfile, mpi_args, threads, tolerance, json, quiet (-q: only the check's
    verdict). Returns the exit code."""
    from gcomp.distributed.runner import under_mpi

    mesh, shard = _mesh_for(params["model"], params.get("shard"), params.get("ranks"))
    if params.get("outputs"):
        out = Path(params["outputs"])
        if out.suffix != ".npz":
            raise OptionError(f"--outputs {out}: expected an .npz path")
        if out.resolve() == Path(params["model"]).resolve():
            raise OptionError("--outputs would overwrite the model")
    if params.get("simulate") or mesh.size == 1:
        return _execute(params, shard, simulate=True, echo=echo)
    require(_MPI, "mpi4py", hint=_SIMULATE)
    if under_mpi():
        return _execute(params, shard, simulate=False, echo=echo)
    _validate(params, shard, mesh)
    return _launch(params, shard, mesh.size)


def _validate(params: dict, shard: str | None, mesh) -> None:
    """Plan once here, so a bad plan or input is one clean error before any process starts."""
    from gcomp.distributed.runner import _load, local_feeds, make_feeds, prepare
    from gcomp.inputs import parse_input_shapes

    model = _load(params["model"])
    feeds = make_feeds(model, mesh, params.get("inputs"), parse_input_shapes(params.get("input_shapes") or ()))
    prepared = prepare(model, shard, feeds)
    for rank in range(mesh.size):
        local_feeds(prepared, feeds, rank)


def _launch(params: dict, shard: str | None, n: int) -> int:
    cmd = [find_mpiexec(), "-n", str(n)]
    if params.get("hostfile"):
        hostfile = Path(params["hostfile"])
        if not hostfile.is_file():
            raise OptionError(f"--hostfile {hostfile}: no such file")
        cmd += (["-f", str(hostfile)] if _is_mpich(cmd[0]) else ["--hostfile", str(hostfile)])
    cmd += list(params.get("mpi_args") or ())
    cmd += [sys.executable, "-m", "gcomp.distributed.launch", json.dumps({**params, "shard": shard})]
    env = dict(os.environ)
    # OpenMPI refuses to run as root unless told; harmless for MPICH.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    proc = subprocess.run(cmd, env=env, check=False)
    return proc.returncode


def _is_mpich(mpiexec: str) -> bool:
    return (Path(mpiexec).parent / "mpichversion").exists() or "hydra" in os.path.realpath(mpiexec)


def _execute(params: dict, shard: str | None, *, simulate: bool, echo) -> int:
    from gcomp.distributed.runner import run, save_outputs
    from gcomp.inputs import parse_input_shapes

    result = run(
        params["model"], shard, inputs=params.get("inputs"),
        input_shapes=parse_input_shapes(params.get("input_shapes") or ()),
        simulate=simulate, check=bool(params.get("check")), threads=params.get("threads"),
        provider=params.get("provider") or "cpu", provider_options=params.get("provider_options"),
    )
    rank = 0
    if not simulate:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    if rank != 0:
        return 0
    tol = params.get("tolerance", 1e-4)
    ok = result.max_abs_error is None or result.max_abs_error <= tol
    if params.get("outputs"):
        save_outputs(result.outputs, params["outputs"])
    doc = {
        "mesh": result.mesh, "ranks": result.ranks, "simulated": simulate,
        "collectives": result.collectives, "providers": result.providers,
        "outputs": {k: list(v.shape) for k, v in result.outputs.items()},
        "max_abs_error": result.max_abs_error, "tolerance": tol if params.get("check") else None,
        "check": None if result.max_abs_error is None else ("passed" if ok else "failed"),
    }
    quiet = params.get("quiet")  # -q: only the check's verdict
    if params.get("json"):
        echo(json.dumps(doc, indent=2))
    else:
        how = "simulated in one process" if simulate else "MPI processes"
        if not quiet:
            echo(f"ran on mesh {result.mesh}: {result.ranks} ranks ({how}), {result.collectives} collectives, "
                 f"on {', '.join(result.providers or [])}")
            for k, v in result.outputs.items():
                echo(f"  output {k}: {v.dtype} {list(v.shape)}")
        if result.max_abs_error is not None:
            echo(f"check against the unsharded model: max abs error {result.max_abs_error:.3g} "
                 f"(tolerance {tol:g}): {'passed' if ok else 'FAILED'}")
        if params.get("outputs") and not quiet:
            echo(f"wrote {params['outputs']}")
    return 0 if ok else 1


def shard_command(params: dict, echo=print) -> int:
    """``gcomp shard``: plan on a copy specialized to the input shapes and folded (O1),
    annotate (IR v11), print the summary, optionally write per-rank graphs.

    With ``--input-shape``, the written model is the specialized one: fixed to those shapes
    (``gcomp run`` refuses others in one line, naming them). Without, the model keeps its
    own input shapes and only gains the annotations, so ``gcomp run`` re-specializes it to
    whatever inputs it gets (unless the plan names a tensor only the folded copy has)."""
    from gcomp import io
    from gcomp.distributed.runner import make_feeds, specialize
    from gcomp.inputs import parse_input_shapes
    from gcomp.passes.sharding import (
        annotate,
        annotate_seeds,
        parse_mesh,
        partition,
        plan,
        summarize,
    )

    source = Path(params["model"])
    output = Path(params["output"])
    io.check_writable(output, source=source)
    original = io.load(source)
    # Plans are made on static shapes (exporters compute reshape targets from Shape chains
    # that only fold when the dims are known); without --input-shape, gcomp's defaults.
    input_shapes = parse_input_shapes(params.get("input_shapes") or ())
    feeds = make_feeds(original, parse_mesh(params["shard"]), None, input_shapes)
    model = specialize(io.load(source), feeds)
    overrides = dict(o.split("=", 1) for o in params.get("overrides") or ())
    p = plan(model, params["shard"], overrides=overrides)
    summary = summarize(model, p)
    ranks_dir = params.get("ranks_dir")
    rank_models = partition(model, p) if ranks_dir else []
    kept_open = not input_shapes and annotate_seeds(original, p)
    if not kept_open:
        annotate(model, p)
    io.save(original if kept_open else model, output)
    if ranks_dir:
        folder = Path(ranks_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for r, m in enumerate(rank_models):
            io.save(m, folder / f"rank{r}.onnx")
    if params.get("json"):
        echo(json.dumps({**summary, "input_shapes": _shapes(feeds), "shapes_fixed": not kept_open}, indent=2))
        return 0
    if not input_shapes:
        shapes = " ".join(f"--input-shape {k}={','.join(map(str, v))}" for k, v in _shapes(feeds).items())
        echo(f"note: planned for the input shapes {shapes}" + (
            "; the written model keeps its own input shapes (gcomp run re-plans it for its inputs)" if kept_open
            else "; the written model is fixed to them"))
    echo(format_summary(summary))
    echo(f"wrote {output}" + (f" and {len(rank_models)} rank graphs in {ranks_dir}" if ranks_dir else ""))
    return 0


def _shapes(feeds) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in feeds.items()}


def format_summary(summary: dict) -> str:
    """A short plain-text table of :func:`gcomp.passes.sharding.summarize`'s result."""
    from gcomp.report import human_bytes

    lines = [
        f"mesh {summary['mesh']} ({summary['ranks']} ranks)",
        (
            f"parameters: {human_bytes(summary['parameter_bytes'])} "
            f"(split {human_bytes(summary['sharded_parameter_bytes'])}, "
            f"replicated {human_bytes(summary['replicated_parameter_bytes'])}); "
            f"per rank {human_bytes(summary['parameter_bytes_per_rank'])}"
        ),
        (
            f"collectives per forward: {summary['all_reduces']} all-reduce "
            f"({summary['row_parallel_all_reduces']} after row-parallel layers), "
            f"{summary['all_gathers']} all-gather"
        ),
    ]
    for c in summary["collectives"]:
        b = human_bytes(c["bytes"]) if c["bytes"] is not None else "?"
        lines.append(f"  {c['kind']:<9} over {','.join(c['mesh_axes']):<3} {b:>10}  {c['tensor']}  ({c['reason']})")
    for u in summary.get("unplanned", ()):
        lines.append(f"  not split: {u['layer']}: {u['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Worker entry under mpiexec: ``python -m gcomp.distributed.launch '<json params>'``."""
    args = sys.argv[1:] if argv is None else argv
    params = json.loads(args[0])
    try:
        code = _execute(params, params["shard"], simulate=False, echo=print)
    except GcompError as e:
        print(f"gcomp: error: {e}", file=sys.stderr, flush=True)
        _abort(1)
        code = 1
    except Exception as e:  # noqa: BLE001  (a bug: still one line per rank, no rank left waiting)
        print(f"gcomp: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        _abort(3)
        code = 3
    sys.stdout.flush()
    sys.exit(code)


def _abort(code: int) -> None:
    try:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(code)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
