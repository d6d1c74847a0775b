"""Check each planned block after propagation; leave broken ones replicated, saying why.

A block (an attention block or an MLP) is planned by seeding its weights: the projections
column-parallel, the last one row-parallel. That pays only if the split survives from the
first projections to the row-parallel one: every op in between must take the split axis
as it comes. Where propagation has to all-gather or all-reduce inside a block (an op the
rules do not know; features laid out head-minor, so the column split cuts the head size,
not the heads), the block would cost a collective and save little; :func:`settle` then
drops the block's seeds, propagates again, and records the layer and the op that broke it. The result is the plan plus ``unplanned``:
``[{"layer", "reason"}]``, which ``gcomp shard`` prints (and ``--json`` lists) together
with the layers :mod:`.heads` could not plan at all.
"""

from __future__ import annotations

__all__ = ["settle"]

import dataclasses

import onnx_ir as ir
from gcomp.passes.sharding.heads import Unplanned
from gcomp.passes.sharding.mesh import Mesh
from gcomp.passes.sharding.propagate import Plan, collective_steps, conversions, propagate


def settle(model: ir.Model, mesh: Mesh, found) -> Plan:
    """Propagate ``found`` (:class:`.megatron.Seeds`), dropping blocks whose split breaks."""
    seeds, roles = dict(found.seeds), dict(found.roles)
    blocks = list(found.blocks)
    unplanned = list(found.unplanned)
    while True:
        plan = propagate(model, mesh, seeds, roles)
        broken = _broken(model, plan, blocks)
        if not broken:
            break
        for block, reason in broken:
            blocks.remove(block)
            unplanned.append(Unplanned(block[0], reason))
            for name in block[1]:
                if roles.get(name) != "override":
                    seeds.pop(name, None)
                    roles.pop(name, None)
    plan.unplanned = [dataclasses.asdict(u) for u in unplanned]
    return plan


def _reshards(model: ir.Model, plan: Plan) -> dict[ir.Node, str]:
    """Nodes that need an input all-gathered or all-reduced, with what they need."""
    out: dict[ir.Node, str] = {}
    for c in conversions(model, plan):
        if c.node is None or c.node in out:
            continue
        for step, info in collective_steps(c.src, c.dst):
            where = f"{c.node.op_type} '{c.node.name or c.node.outputs[0].name}'"
            if step == "AllGather":
                out[c.node] = f"the split is undone inside it: {where} needs axis {info['axis']} of '{c.value.name}' whole"
                break
            if step == "AllReduce":
                out[c.node] = (f"the split is undone inside it: {where} needs '{c.value.name}' all-reduced (the "
                               "split axis is contracted before the block's last projection)")
                break
    return out


def _broken(model: ir.Model, plan: Plan, blocks: list) -> list[tuple[tuple, str]]:
    gathers = _reshards(model, plan)
    if not gathers:
        return []
    order = {n: i for i, n in enumerate(model.graph)}
    broken = []
    for block in blocks:
        hit = [n for n in _region(model.graph, set(block[1]), block[2]) if n in gathers]
        if hit:
            broken.append((block, gathers[min(hit, key=order.__getitem__)]))
    return broken


def _region(graph: ir.Graph, weights: set[str], end: ir.Node, limit: int = 4096) -> set[ir.Node]:
    """The nodes on a path from a user of ``weights`` to ``end`` (both included)."""
    starts = [n for n in graph if any(i is not None and i.name in weights for i in n.inputs)]
    forward: set[ir.Node] = set()
    stack = list(starts)
    while stack and len(forward) < limit:
        node = stack.pop()
        if node in forward:
            continue
        forward.add(node)
        if node is end:
            continue
        for o in node.outputs:
            stack.extend(user for user, _ in o.uses())
    region: set[ir.Node] = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if node in region or node not in forward:
            continue
        region.add(node)
        stack.extend(i.producer() for i in node.inputs if i is not None and i.producer() is not None)
    return region
