"""Propagate layouts from seeds (weights, inputs) through every node of the main graph.

One sweep in topological order decides each node's output layouts from its inputs by
the op's rule; a second sweep must change nothing (the fixed point is checked, not
assumed). A rule states the layout it *requires* for each input; where that differs
from what arrives, a reshard happens there, and only there:

- constants (initializers) are sliced per rank for free (a bias follows its MatMul);
- a partial sum that meets a non-linear use is all-reduced (Megatron's one per block);
- a split axis that an op must see whole (Softmax's axis, a LayerNorm's, a Gather's
  table axis, a Shape) is all-gathered; a replicated activation that must be split is
  sliced locally (no communication).

The per-op rules live in :mod:`.rules`. Only the main graph is planned; nodes with
subgraphs run replicated.
"""

from __future__ import annotations

__all__ = ["Conversion", "Plan", "collective_steps", "conversions", "element_bytes", "is_const", "propagate", "shape_of"]

import dataclasses

import onnx_ir as ir
from gcomp.passes.sharding.mesh import Layout, Mesh, ShardingError
from gcomp.passes.sharding.rules import Ctx, default_rule, rule_for
from gcomp.passes.sharding.tensors import element_bytes, is_const, shape_of


@dataclasses.dataclass
class Conversion:
    """Input ``index`` of ``node`` arrives as ``src`` and is used as ``dst``."""

    value: ir.Value
    node: ir.Node | None  # None: a graph output
    index: int
    src: Layout
    dst: Layout


@dataclasses.dataclass
class Plan:
    """Every activation's layout, what each node input requires, and the seeds."""

    mesh: Mesh
    seeds: dict[str, Layout]
    layouts: dict[ir.Value, Layout]
    required: dict[tuple[ir.Node, int], Layout]
    output_required: dict[int, Layout]
    split_bias: set[ir.Node]
    vocab_parallel: set[ir.Node] = dataclasses.field(default_factory=set)
    roles: dict[str, str] = dataclasses.field(default_factory=dict)  # weight name -> role
    unplanned: list[dict] = dataclasses.field(default_factory=list)  # [{"layer", "reason"}] left replicated

    def layout(self, v: ir.Value) -> Layout:
        if v in self.layouts:
            return self.layouts[v]
        if v.name in self.seeds:
            return self.seeds[v.name]
        s = shape_of(v)
        return Layout.replicated(len(s) if s is not None else 0)


# --------------------------------------------------------------------------- driver
def propagate(model: ir.Model, mesh: Mesh, seeds: dict[str, Layout], roles: dict[str, str] | None = None) -> Plan:
    """Layouts of every main-graph value from ``seeds`` (by tensor name), checked.

    Raises ShardingError naming the tensor when a seed does not fit the tensor (axis out
    of range, size not divisible, a mesh axis used twice, an unknown mesh axis)."""
    graph = model.graph
    values = {v.name: v for v in _all_values(graph)}
    for name, lay in seeds.items():
        if name not in values:
            raise ShardingError(f"tensor '{name}': no such tensor in the main graph")
        check_layout(values[name], lay, mesh)
    plan = Plan(mesh, dict(seeds), {}, {}, {}, set(), roles=dict(roles or {}))
    for v in graph.inputs:
        if v.name in seeds:
            plan.layouts[v] = seeds[v.name]
    for sweep in range(2):
        changed = _sweep(graph, plan)
        if not changed:
            break
        if sweep == 1:
            raise ShardingError("sharding propagation did not reach a fixed point")  # a rule bug
    for k, v in enumerate(graph.outputs):
        s = shape_of(v)
        plan.output_required[k] = Layout.replicated(len(s) if s is not None else len(plan.layout(v).dims))
    return plan


def _sweep(graph: ir.Graph, plan: Plan) -> bool:
    changed = False
    for node in graph:
        rule = rule_for(node)
        ctx = Ctx(node, plan)
        try:
            req, outs = rule(ctx)
        except (IndexError, TypeError, ValueError, ZeroDivisionError):
            req, outs = default_rule(ctx)
        for i, lay in enumerate(req):
            if i < len(node.inputs) and node.inputs[i] is not None:
                plan.required[(node, i)] = lay
        for o, lay in zip(node.outputs, outs):
            if plan.layouts.get(o) != lay:
                plan.layouts[o] = lay
                changed = True
    return changed


def _all_values(graph: ir.Graph):
    seen = set()
    for v in list(graph.inputs) + list(graph.initializers.values()):
        if v not in seen:
            seen.add(v)
            yield v
    for node in graph:
        for v in list(node.inputs) + list(node.outputs):
            if v is not None and v not in seen:
                seen.add(v)
                yield v


def check_layout(v: ir.Value, lay: Layout, mesh: Mesh) -> None:
    s = shape_of(v)
    if s is None:
        if not lay.is_replicated:
            raise ShardingError(f"tensor '{v.name}': shape unknown, cannot be split")
        return
    if len(lay.dims) != len(s):
        raise ShardingError(f"tensor '{v.name}': layout has {len(lay.dims)} axes, tensor has rank {len(s)}")
    seen = set()
    for a, d in enumerate(lay.dims):
        if d is None:
            continue
        if d.mesh not in mesh.names():
            raise ShardingError(f"tensor '{v.name}': axis {a} split over '{d.mesh}', not an axis of mesh {mesh}")
        if d.mesh in seen:
            raise ShardingError(f"tensor '{v.name}': mesh axis '{d.mesh}' splits two axes")
        seen.add(d.mesh)
        if d.repeat < 1 or mesh.axis_size(d.mesh) % d.repeat:
            raise ShardingError(f"tensor '{v.name}': axis {a} repeated over {d.repeat} ranks, which does not divide "
                                f"{d.mesh}={mesh.axis_size(d.mesh)}")
        n = d.parts(mesh) * d.blocks
        if isinstance(s[a], int) and s[a] % n:
            raise ShardingError(
                f"tensor '{v.name}': axis {a} of size {s[a]} is not divisible by {d.mesh}={mesh.axis_size(d.mesh)}"
                + (f" / {d.repeat} repeats" if d.repeat > 1 else "") + (f" x {d.blocks} blocks" if d.blocks > 1 else "")
            )


# --------------------------------------------------------------------------- reshards
def conversions(model: ir.Model, plan: Plan) -> list[Conversion]:
    """Every place an activation is used in another layout than it arrives in (constants excluded)."""
    out = []
    for node in model.graph:
        for i, v in enumerate(node.inputs):
            if v is None or is_const(v):
                continue
            dst = plan.required.get((node, i))
            src = plan.layout(v)
            if dst is not None and dst != src:
                out.append(Conversion(v, node, i, src, dst))
    for k, v in enumerate(model.graph.outputs):
        src, dst = plan.layout(v), plan.output_required[k]
        if src != dst:
            out.append(Conversion(v, None, k, src, dst))
    return out


def collective_steps(src: Layout, dst: Layout) -> list[tuple[str, dict]]:
    """The steps that turn ``src`` into ``dst``: all-reduce, all-gather, local slice.

    A ``Slice`` step's ``src`` is the shard the rank holds before (None: whole) and ``dst``
    the one it takes; a shard held by a group of ranks narrowed to one rank's part (a KV
    head repeated on its query group, then used per query head) is such a local slice."""
    steps: list[tuple[str, dict]] = []
    if src.partial - dst.partial:
        steps.append(("AllReduce", {"mesh_axes": sorted(src.partial - dst.partial)}))
    if dst.partial - src.partial:
        raise ShardingError("a rule asked for a partial sum that does not exist")  # a rule bug
    for a, (s, d) in enumerate(zip(src.dims, dst.dims)):
        if s == d:
            continue
        if s is not None and d is not None and d.refines(s):
            steps.append(("Slice", {"axis": a, "mesh_axis": d.mesh, "blocks": d.blocks, "src": s, "dst": d}))
            continue
        if s is not None:
            info = {"axis": a, "mesh_axis": s.mesh, "blocks": s.blocks}
            steps.append(("AllGather", {**info, "repeat": s.repeat} if s.repeat > 1 else info))
        if d is not None:
            steps.append(("Slice", {"axis": a, "mesh_axis": d.mesh, "blocks": d.blocks, "src": None, "dst": d}))
    return steps
