"""Run a sharded model: specialize, plan, partition, and execute each rank's graph.

A rank's graph is cut at its collective nodes into segments; each segment is an ONNX
model run on a backend (ONNX Runtime), and each collective is done by a communicator
on numpy buffers between segments. Every rank has the same segments in the same order,
so the simulator runs them in lockstep and MPI ranks meet at the same collectives.

The Python API::

    from gcomp.distributed import run
    result = run("gpt2.onnx", shard="tp=2", inputs=feeds, simulate=True, check=True)
    result.outputs["last_hidden_state"], result.max_abs_error

Guarantees: outputs are whole on every rank (dp shards are gathered); ``check`` runs
the unsharded model on ONNX Runtime (optimizations off) on the same inputs and reports
the largest difference. Refuses (GcompError, one line): a batch not divisible by dp, a
mesh that does not match the MPI world, a model whose sharded tensors have no static
shape after specialization, inputs whose shapes differ from the static shapes of the
model (for a model ``gcomp shard`` planned: the shapes it was planned for, and how to
re-plan), before any rank runs.
"""

from __future__ import annotations

__all__ = ["Prepared", "RunResult", "Segment", "check_input_shapes", "prepare", "run", "run_rank", "simulate"]

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from gcomp.errors import GcompError
from gcomp.passes.sharding.mesh import Layout, Mesh, parse_mesh
from gcomp.passes.sharding.partition import DOMAIN, local_slice


@dataclasses.dataclass
class Segment:
    """Nodes between two collectives, as a runnable model, then the collective after them."""

    executable: object | None
    inputs: list[str]
    outputs: list[str]
    collective: tuple[str, dict, str, str] | None  # (op, attrs, input name, output name)


@dataclasses.dataclass
class Prepared:
    """A model specialized to input shapes, planned, and (lazily) partitioned."""

    model: ir.Model
    mesh: Mesh
    plan: object
    input_layouts: dict[str, Layout]

    def rank_model(self, rank: int) -> ir.Model:
        from gcomp.passes.sharding.partition import partition_rank

        return partition_rank(self.model, self.plan, rank)


@dataclasses.dataclass
class RunResult:
    outputs: dict[str, np.ndarray]
    mesh: str
    ranks: int
    max_abs_error: float | None = None
    reference: dict[str, np.ndarray] | None = None
    collectives: int = 0
    feeds: dict[str, np.ndarray] | None = None  # the whole inputs the run used
    providers: list[str] | None = None  # the execution providers rank 0's sessions really use


def _load(model) -> ir.Model:
    from gcomp import io

    if isinstance(model, ir.Model):
        return model
    return io.load(model)


def prepare(model, shard: str | Mesh | None, feeds: Mapping[str, np.ndarray], *, overrides=None) -> Prepared:
    """Fix input shapes to ``feeds``', fold with O1, infer shapes, and plan on the mesh.

    ``shard``: ``tp=N`` etc.; None reads the mesh and seeds from the model's own IR v11
    annotations (``gcomp.passes.sharding.read_annotations``). ``overrides``: ``{tensor:
    "AXIS:MESH,..." | "replicated"}`` replacing the plan's seeds."""
    from gcomp.passes.sharding import plan as make_plan
    from gcomp.passes.sharding import read_annotations
    from gcomp.passes.sharding.annotate import SEEDS_KEY
    from gcomp.passes.sharding.canonical import canonicalize
    from gcomp.passes.sharding.propagate import propagate

    m = _load(model)
    annotated = None
    if shard is None:
        annotated = read_annotations(m)
        if annotated is None:
            raise GcompError("the model has no sharding annotations: give --shard tp=N, dp=N or dp=A,tp=B")
        mesh = annotated[0]
    else:
        mesh = shard if isinstance(shard, Mesh) else parse_mesh(shard)
    planned = annotated is not None or SEEDS_KEY in m.metadata_props
    check_input_shapes(m, feeds, mesh if planned else None)
    m = specialize(m, feeds)
    if annotated is not None:
        canonicalize(m)
        plan = propagate(m, mesh, annotated[1], {})
    else:
        plan = make_plan(m, mesh, overrides=overrides)
    layouts = {v.name: plan.layout(v) for v in m.graph.inputs}
    return Prepared(m, mesh, plan, layouts)


def check_input_shapes(model: ir.Model, feeds: Mapping[str, np.ndarray], sharded_for: Mesh | None = None) -> None:
    """Refuse, in one line, feeds whose shapes differ from the model's static input dims.

    ``sharded_for``: the mesh of a model ``gcomp shard`` planned (and so fixed to the shapes
    it planned for); the line then names those shapes and the command that re-plans. A
    model whose inputs are symbolic is specialized to any feeds instead."""
    for v in model.graph.inputs:
        if v.name not in feeds or v.shape is None or v.const_value is not None:
            continue
        got = tuple(np.asarray(feeds[v.name]).shape)
        want = tuple(d if isinstance(d, int) else None for d in v.shape)
        if len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got)):
            continue
        shown = "[" + ", ".join(str(d) if d is not None else "?" for d in want) + "]"
        if sharded_for is None or None in want:  # open dims: a wrong rank or size, no re-plan helps
            raise GcompError(f"input '{v.name}': shape {list(got)} does not fit the model's {shown}")
        planned = " ".join(f"{i.name}={','.join(str(d) for d in i.shape)}" for i in model.graph.inputs
                           if i.const_value is None and i.shape is not None)
        given = " ".join(f"--input-shape {n}={','.join(map(str, np.asarray(a).shape))}" for n, a in feeds.items())
        raise GcompError(
            f"input '{v.name}' has shape {list(got)}, but the model was sharded for {planned}: run it on inputs "
            f"of those shapes, or re-plan the unsharded model for these: gcomp shard UNSHARDED.onnx -o OUT.onnx "
            f"--shard {sharded_for} {given} (without --input-shape, gcomp shard keeps the shapes open)")


def specialize(m: ir.Model, feeds: Mapping[str, np.ndarray] | None) -> ir.Model:
    """Fix input shapes to ``feeds``' (if given), fold with O1, and infer every shape:
    exporters' Shape/Gather/Concat chains become constants the planner can read."""
    from onnx_ir.passes.common import ShapeInferencePass

    from gcomp.pipeline import optimize

    for v in m.graph.inputs:
        if feeds and v.name in feeds and v.const_value is None:
            v.shape = ir.Shape(list(np.asarray(feeds[v.name]).shape))
    m = optimize(m, "O1", verify=False).model
    return ShapeInferencePass()(m).model


def specialize_for_mesh(model: ir.Model, mesh: Mesh) -> ir.Model:
    """``model`` specialized to gcomp's default input shapes for ``mesh`` (a batch
    divisible by dp), folded: what the shard pass plans on."""
    return specialize(model, make_feeds(model, mesh))


def segments(rank_model: ir.Model, *, threads: int | None = None, optimization: str = "all",
             provider: str = "cpu", provider_options: Mapping[str, str] | None = None) -> list[Segment]:
    """Cut ``rank_model`` at its collective nodes; compile each piece on ONNX Runtime, on
    ``provider`` (an execution provider, full or short name) with ``provider_options``."""
    from gcomp.backends import get_backend

    graph = rank_model.graph
    nodes = list(graph)
    cuts = [i for i, n in enumerate(nodes) if n.domain == DOMAIN]
    pieces, start = [], 0
    for c in cuts + [len(nodes)]:
        pieces.append((nodes[start:c], nodes[c] if c < len(nodes) else None))
        start = c + 1
    # which piece (or collective) consumes each value, to know what a piece must output
    produced_in: dict[ir.Value, int] = {}
    for k, (body, coll) in enumerate(pieces):
        for n in body:
            for o in n.outputs:
                produced_in[o] = k
        if coll is not None:
            produced_in[coll.outputs[0]] = k  # available after piece k
    needed_after: dict[int, set[ir.Value]] = {k: set() for k in range(len(pieces))}
    for k, (body, coll) in enumerate(pieces):
        users = list(body) + ([coll] if coll is not None else [])
        for n in users:
            for v in n.inputs:
                if v is not None and v in produced_in and produced_in[v] < k:
                    needed_after[produced_in[v]].add(v)
        if coll is not None and coll.inputs[0] in produced_in and produced_in[coll.inputs[0]] == k:
            needed_after[k].add(coll.inputs[0])
    for v in graph.outputs:
        if v in produced_in:
            needed_after[produced_in[v]].add(v)
    be = get_backend("ort")
    proto = index = inits = None
    out = []
    for k, (body, coll) in enumerate(pieces):
        outputs = [v for v in _ordered_outputs(body) if v in needed_after[k]]
        inputs: list[ir.Value] = []
        made_here = {o for n in body for o in n.outputs}
        seen: set[ir.Value] = set()
        for n in body:
            for v in n.inputs:
                if v is None or v.const_value is not None or v in seen or v in made_here:
                    continue
                seen.add(v)
                inputs.append(v)
        exe = None
        if body and outputs:
            if proto is None:  # once per rank: segments reuse its nodes and initializers
                proto = ir.serde.serialize_model(rank_model)
                index = {id(n): i for i, n in enumerate(rank_model.graph)}
                inits = {t.name: t for t in proto.graph.initializer}
            seg_model = _segment_model(proto, index, inits, body, inputs, outputs, k)
            exe = be.compile(seg_model, provider, optimization=optimization, threads=threads,
                             provider_options=provider_options)
        collective = None
        if coll is not None:
            attrs = {a.name: (list(a.value) if isinstance(a.value, (list, tuple)) else a.value)
                     for a in coll.attributes.values()}
            collective = (coll.op_type, attrs, coll.inputs[0].name, coll.outputs[0].name)
        out.append(Segment(exe, [v.name for v in inputs], [v.name for v in outputs], collective))
    return out


def _ordered_outputs(body):
    for n in body:
        yield from n.outputs


def _segment_model(proto, index, inits, body, inputs, outputs, k) -> ir.Model:
    """A standalone model of ``body`` (a serialize/deserialize copy: nodes belong to one graph)."""
    import onnx

    keep = {index[id(n)] for n in body}
    names_used = {i for n in body for i in (v.name for v in n.inputs if v is not None)}
    g = onnx.helper.make_graph(
        [proto.graph.node[i] for i in sorted(keep)],
        f"segment{k}",
        [_vinfo(v) for v in inputs],
        [_vinfo(v) for v in outputs],
        [inits[n] for n in sorted(names_used) if n in inits],
    )
    m = onnx.helper.make_model(g, opset_imports=[op for op in proto.opset_import if op.domain != DOMAIN])
    m.ir_version = proto.ir_version
    return ir.serde.deserialize_model(m)


def _vinfo(v: ir.Value):
    import onnx

    elem = v.type.dtype.value if v.type is not None else onnx.TensorProto.FLOAT
    shape = [d if isinstance(d, int) else None for d in v.shape] if v.shape is not None else None
    return onnx.helper.make_tensor_value_info(v.name, elem, shape)


def local_feeds(prepared: Prepared, feeds: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    mesh = prepared.mesh
    coords, sizes = mesh.coords(rank), dict(mesh.axes)
    out = {}
    for name, arr in feeds.items():
        lay = prepared.input_layouts.get(name)
        if lay is None:
            continue
        for a, d in enumerate(lay.dims):
            if d is not None and np.asarray(arr).shape[a] % (d.parts(mesh) * d.blocks):
                raise GcompError(
                    f"input '{name}': axis {a} of size {np.asarray(arr).shape[a]} is not divisible by "
                    f"{d.mesh}={sizes[d.mesh]}"
                )
        out[name] = local_slice(arr, lay, coords, sizes) if not lay.is_replicated else np.asarray(arr)
    return out


def run_rank(segs: list[Segment], feeds: Mapping[str, np.ndarray], comm, outputs: list[str]) -> dict[str, np.ndarray]:
    """Run one rank's segments with an MPI communicator (``comm.collective(op, attrs, x)``)."""
    env = dict(feeds)
    for seg in segs:
        if seg.executable is not None:
            env.update(seg.executable.run({n: env[n] for n in seg.inputs}))
        if seg.collective is not None:
            op, attrs, src, dst = seg.collective
            env[dst] = comm.collective(op, attrs, env[src])
    return {n: env[n] for n in outputs}


def simulate(prepared: Prepared, feeds: Mapping[str, np.ndarray], *, threads: int | None = None,
             provider: str = "cpu", provider_options: Mapping[str, str] | None = None):
    """Every rank in this process, in lockstep; returns (rank 0's outputs, collectives run)."""
    from gcomp.distributed.comm import SimulatedWorld

    mesh = prepared.mesh
    world = SimulatedWorld(mesh)
    ranks = list(range(mesh.size))
    models = [prepared.rank_model(r) for r in ranks]
    segs = [segments(m, threads=threads, provider=provider, provider_options=provider_options) for m in models]
    envs = [local_feeds(prepared, feeds, r) for r in ranks]
    for k in range(len(segs[0])):
        for r in ranks:
            seg = segs[r][k]
            if seg.executable is not None:
                envs[r].update(seg.executable.run({n: envs[r][n] for n in seg.inputs}))
        coll = segs[0][k].collective
        if coll is not None:
            op, attrs, _, _ = coll
            results = world.collective(op, attrs, [envs[r][segs[r][k].collective[2]] for r in ranks])
            for r in ranks:
                envs[r][segs[r][k].collective[3]] = results[r]
    names = [v.name for v in models[0].graph.outputs]
    return {n: envs[0][n] for n in names}, world.calls


def reference_outputs(model, feeds) -> dict[str, np.ndarray]:
    """The unsharded model on ONNX Runtime with its optimizations off."""
    from gcomp.backends import get_backend

    exe = get_backend("ort").compile(_load(model), "cpu", optimization="disable")
    return exe.run({n: feeds[n] for n in exe.input_names if n in feeds})


def max_abs_error(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> float:
    err = 0.0
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            raise GcompError(f"output '{name}': shape {list(g.shape)} differs from the unsharded {list(r.shape)}")
        if r.size:
            err = max(err, float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))))
    return err


def make_feeds(model: ir.Model, mesh: Mesh, inputs=None, input_shapes=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from a file or generated (gcomp.inputs); a generated batch is made divisible by dp."""
    from gcomp.inputs import generate_inputs, load_inputs

    given = load_inputs(inputs, model) if inputs is not None and not isinstance(inputs, Mapping) else inputs
    feeds, _ = generate_inputs(model, shapes=input_shapes or {}, given=dict(given) if given else None, seed=seed)
    dp = mesh.axis_size("dp")
    if dp > 1 and not input_shapes and not given:
        shapes = {n: (a.shape[0] * dp,) + a.shape[1:] for n, a in feeds.items() if a.ndim and a.shape[0] % dp}
        if shapes:
            feeds, _ = generate_inputs(model, shapes=shapes, seed=seed)
    return feeds


def run(model, shard: str | None = None, *, inputs=None, input_shapes=None, simulate: bool = True,
        check: bool = False, threads: int | None = None, overrides=None, provider: str = "cpu",
        provider_options: Mapping[str, str] | None = None) -> RunResult:
    """Run ``model`` sharded on ``shard`` (all ranks in this process when ``simulate``).

    Under an MPI launch (``mpiexec -n N``), ``simulate=False`` runs this process's rank;
    every rank returns the whole outputs. Each rank's pieces run on ONNX Runtime's
    ``provider`` with ``provider_options`` (the same for every rank); the check's
    unsharded run stays on the reference (the CPU)."""
    from gcomp.backends.ort_providers import resolve_provider, session_request

    original = _load(model)
    src_bytes = ir.serde.serialize_model(original).SerializeToString()
    mesh0 = parse_mesh(shard) if shard else _annotated_mesh(original)
    feeds = make_feeds(original, mesh0, inputs, input_shapes)
    work = ir.serde.deserialize_model(_parse(src_bytes))
    prepared = prepare(work, shard, feeds, overrides=overrides)
    if simulate:
        outs, calls = simulate_fn(prepared, feeds, threads=threads, provider=provider,
                                  provider_options=provider_options)
        ncoll = len(calls)
    else:
        from gcomp.distributed.comm import MpiCommunicator

        comm = MpiCommunicator(prepared.mesh)
        rank_model = prepared.rank_model(comm.rank)
        segs = segments(rank_model, threads=threads or 1, provider=provider, provider_options=provider_options)
        outs = run_rank(segs, local_feeds(prepared, feeds, comm.rank), comm,
                        [v.name for v in rank_model.graph.outputs])
        ncoll = sum(1 for s in segs if s.collective)
    result = RunResult(outs, str(prepared.mesh), prepared.mesh.size, collectives=ncoll)
    # Every session was checked to use the provider (gcomp.backends.ort_providers.check_session).
    result.providers = session_request(resolve_provider(provider, what="provider"), None)[0]
    if check:
        ref = reference_outputs(ir.serde.deserialize_model(_parse(src_bytes)), feeds)
        result.reference = ref
        result.max_abs_error = max_abs_error(outs, ref)
    result.feeds = feeds
    return result


simulate_fn = simulate


def _parse(data: bytes):
    import onnx

    p = onnx.ModelProto()
    p.ParseFromString(data)
    return p


def _annotated_mesh(model: ir.Model) -> Mesh:
    from gcomp.passes.sharding import read_annotations

    found = read_annotations(model)
    if found is None:
        raise GcompError("the model has no sharding annotations: give --shard tp=N, dp=N or dp=A,tp=B")
    return found[0]


def under_mpi() -> bool:
    """Whether this process was started by an MPI launcher (MPICH/Hydra, OpenMPI, PMIx)."""
    return any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_SIZE"))


def save_outputs(outputs: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write outputs to an .npz atomically (temp file, then rename)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise GcompError(f"--outputs {path}: expected an .npz path")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **outputs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
