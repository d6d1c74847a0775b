"""Seeds for a mesh: Megatron's plan for tensor parallelism, the batch axis for data parallelism.

Tensor parallelism (``tp``), after Shoeybi et al. 2019 (Megatron-LM):

- attention: the blocks :mod:`.heads` finds (from each ``Softmax`` back to the scores
  ``MatMul(Q, K^T)``, on to ``MatMul(probs, V)``, the head merge and the output projection;
  Q, K and V back to their weight projections through whatever the exporter wrote in
  between). The Q, K and V projection weights are split by output columns (a fused QKV
  weight followed by a 3-way ``Split`` is split per block, so rank r holds q_r, k_r,
  v_r), so each rank owns ``heads / tp`` heads; the output projection is split by input
  rows. The head count must divide by tp, otherwise the plan refuses, naming the tensor.
  Grouped-query attention (fewer KV heads than heads): K and V split by KV heads where tp
  divides them; else, where the KV heads divide tp, each KV head is held by the tp / KV
  ranks of its query group (``Shard.repeat``), and each rank takes its query heads' share
  locally; otherwise K and V stay replicated (said in the summary).
- MLP: a ``MatMul``/``Gemm`` with a weight whose output reaches, through elementwise ops
  only (bias, activation), exactly one other weight ``MatMul``/``Gemm``: the first is
  column-parallel, the second row-parallel. A projection of the same input that the chain
  multiplies in (SwiGLU's up projection beside the gate) is column-parallel too.

- embeddings: a token table (``Gather`` on a constant by computed ids) is split by
  vocabulary rows when it holds at least a quarter of all weight bytes ("where it pays":
  it costs one all-reduce of the embeddings per forward); each rank looks up its rows
  and zeros the rest. Smaller tables, position tables and tied tables stay replicated.
- LM head: a weight ``MatMul``/``Gemm`` whose output is a graph output (through layout
  ops or a bias) and whose weight is at least a quarter of all weight bytes is split by
  vocabulary columns; the logits are all-gathered once at the output.

Biases are not seeded: propagation slices a column-parallel bias with its output, and
adds a row-parallel bias once after the all-reduce. Data parallelism (``dp``) splits axis 0 of every
graph input. Overrides replace any seed by tensor name.
"""

from __future__ import annotations

__all__ = ["Seeds", "parse_override", "seed_plan"]

import dataclasses

import onnx_ir as ir
from gcomp.passes.sharding.heads import AttentionBlock, Unplanned, find_attention, label, weight_of
from gcomp.passes.sharding.mesh import Layout, Mesh, Shard, ShardingError
from gcomp.passes.sharding.tensors import is_const, shape_of

_PASS = {"Transpose", "Reshape", "Identity", "Dropout", "Cast", "Squeeze", "Unsqueeze", "Flatten"}
_SCALE = {"Add", "Sub", "Mul", "Div", "Where"}
_NONLINEAR = {"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "FastGelu", "BiasGelu", "Softplus", "Exp",
              "HardSwish", "Mish", "LeakyRelu", "Elu", "Selu", "QuickGelu", "HardSigmoid", "Pow"}
_ELEMENTWISE = _NONLINEAR | _SCALE | {"Neg", "Identity", "Dropout", "Cast", "Reshape", "Sqrt", "Reciprocal"}
_weight = weight_of


@dataclasses.dataclass
class Seeds:
    """What :func:`seed_plan` found: the seeds, each weight's role, the blocks it split
    (for the check after propagation) and the layers it left replicated, with why."""

    seeds: dict[str, Layout]
    roles: dict[str, str]
    blocks: list[tuple[str, list[str], ir.Node]] = dataclasses.field(default_factory=list)  # (label, weights, end)
    unplanned: list[Unplanned] = dataclasses.field(default_factory=list)


def _kv_shard(block: AttentionBlock, tp: int) -> Shard | None:
    """K/V split: by KV heads where tp divides them; else each KV head on its query group's
    ranks (tp / KV heads of them); None (replicated) where neither divides the other."""
    kv = block.kv_heads
    if kv % tp == 0:
        return Shard("tp")
    if tp % kv == 0 and kv > 1:
        return Shard("tp", 1, tp // kv)
    return None


def _seed_attention(graph: ir.Graph, tp: int, found: Seeds, taken: set[ir.Node]) -> None:
    blocks, unplanned = find_attention(graph)
    found.unplanned.extend(unplanned)
    for block in blocks:
        if block.heads % tp:
            raise ShardingError(
                f"tensor '{block.context.name}': {block.heads} attention heads are not divisible by tp={tp}")
        kv = _kv_shard(block, tp)
        names = []
        if block.packed is not None:  # com.microsoft.Attention: Q/K/V blocks of its own weight
            found.seeds[block.packed.name] = _column(block.packed, 1, 3)
            found.roles[block.packed.name] = "attention qkv (column)"
            names.append(block.packed.name)
        for proj, role in ((block.q, "q"), (block.k, "k"), (block.v, "v")) if block.packed is None else ():
            w, col, _ = _weight(proj.node)
            shard = Shard("tp", proj.blocks) if role == "q" or proj.blocks > 1 else kv
            names.append(w.name)
            taken.add(proj.node)
            if shard is None:
                found.roles.setdefault(w.name, f"attention {role} (replicated: {block.kv_heads} KV heads for tp={tp})")
                continue
            found.seeds[w.name] = _column(w, col, shard)
            what = "qkv" if proj.blocks > 1 else role
            grouped = f", each KV head on {shard.repeat} ranks" if shard.repeat > 1 else ""
            found.roles.setdefault(w.name, f"attention {what} (column{grouped})")
        w, _, row = _weight(block.out)
        found.seeds[w.name] = _column(w, row)
        found.roles[w.name] = "attention output (row)"
        taken.add(block.out)
        found.blocks.append((block.label, names + [w.name], block.out))
        if kv is None and block.kv_heads > 1:  # one KV head (multi-query): replicated, as Megatron does
            found.unplanned.append(Unplanned(block.label, f"K/V projections replicated: {block.kv_heads} KV heads "
                                                          f"cannot be split or grouped over tp={tp}"))


def _mlp_pairs(graph: ir.Graph, taken: set[ir.Node]):
    """(first, second, siblings): first's output reaches ``second`` through element-wise ops
    only, combined with constants, its own chain and ``siblings`` (projections of the same
    input: SwiGLU's up projection beside its gate)."""
    for node in graph:
        if node in taken or _weight(node) is None:
            continue
        frontier = [node.outputs[0]]
        seen: set[ir.Value] = set()
        ends: set[ir.Node] = set()
        siblings: set[ir.Node] = set()
        nonlinear = False
        ok = True
        while frontier and ok:
            v = frontier.pop()
            if v in seen:
                continue
            seen.add(v)
            if v.is_graph_output():
                ok = False
            for user, idx in v.uses():
                if _weight(user) is not None and idx == 0 and user not in taken:
                    ends.add(user)
                elif user.op_type in _ELEMENTWISE and user.domain in ("", "ai.onnx"):
                    nonlinear |= user.op_type in _NONLINEAR
                    others = [x for x in user.inputs if x is not None and x is not v and x not in seen]
                    # the chain may combine only with constants, its own values and sibling projections
                    for x in others:
                        sib = None if is_const(x) or _from_chain(x, seen, node) else _sibling(x, node, taken)
                        if sib is False:
                            ok = False
                        elif sib is not None:
                            siblings.add(sib)
                    if not ok:
                        break
                    frontier.extend(user.outputs)
                else:
                    ok = False
                    break
            if len(seen) > 64:
                ok = False
        if ok and nonlinear and len(ends) == 1:
            yield node, next(iter(ends)), siblings


def _sibling(x: ir.Value, first: ir.Node, taken: set[ir.Node]):
    """The weight MatMul/Gemm (maybe plus a constant bias) making ``x`` from ``first``'s own
    input, or False."""
    p = x.producer()
    if p is not None and p.op_type == "Add" and len(p.inputs) == 2 and any(is_const(i) for i in p.inputs):
        act = [i for i in p.inputs if not is_const(i)]
        p = act[0].producer() if act else None
    if p is None or p is first or p in taken or _weight(p) is None or p.inputs[0] is not first.inputs[0]:
        return False
    return p


def _from_chain(x: ir.Value, seen: set[ir.Value], start: ir.Node, depth: int = 8) -> bool:
    """Whether ``x`` is computed only from constants and the chain that began at ``start``."""
    if x in seen or is_const(x):
        return True
    p = x.producer()
    if p is None or depth == 0:
        return False
    if p is start:
        return True
    return all(i is None or _from_chain(i, seen, start, depth - 1) for i in p.inputs)


EMBEDDING_SHARE = 4  # vocabulary-parallel when the table is >= 1/4 of all weight bytes


def _embedding(node: ir.Node) -> ir.Value | None:
    """The table of a token-embedding lookup: Gather(2-D constant, non-constant ids, axis 0)."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    table, ids = node.inputs
    s = shape_of(table)
    axis = node.attributes["axis"].value if "axis" in node.attributes else 0
    if not is_const(table) or is_const(ids) or s is None or len(s) != 2 or axis != 0:
        return None
    if len(table.uses()) != 1:  # a table tied to an LM head stays whole
        return None
    return table


def _reaches_output(v: ir.Value, depth: int = 4) -> bool:
    """Whether ``v`` is a graph output, directly or through layout ops and a bias add."""
    while depth > 0:
        if v.is_graph_output():
            return True
        users = v.uses()
        if len(users) != 1:
            return False
        node, _ = users[0]
        if node.op_type not in _PASS | {"Add"}:
            return False
        v = node.outputs[0]
        depth -= 1
    return False


def _column(w: ir.Value, axis: int, shard: Shard | int = 1) -> Layout:
    dims = [None, None]
    dims[axis] = shard if isinstance(shard, Shard) else Shard("tp", shard)
    return Layout(tuple(dims))


def seed_plan(model: ir.Model, mesh: Mesh, overrides: dict[str, Layout] | None = None) -> Seeds:
    """Seeds (tensor name -> Layout), roles (weight name -> description), the split blocks
    and the layers left replicated, for ``mesh``."""
    graph = model.graph
    found = Seeds({}, {})
    tp = mesh.axis_size("tp")
    if "tp" in mesh.names():
        taken: set[ir.Node] = set()
        _seed_attention(graph, tp, found, taken)
        _seed_mlps(graph, tp, found, taken)
        _seed_vocabulary(graph, tp, found, taken)
    if "dp" in mesh.names():
        for v in graph.inputs:
            s = shape_of(v)
            if v.const_value is None and s:
                found.seeds[v.name] = Layout((Shard("dp"),) + (None,) * (len(s) - 1))
                found.roles[v.name] = "input (batch)"
    for name, lay in (overrides or {}).items():
        found.seeds[name] = lay
        found.roles[name] = "override"
    return found


def _seed_mlps(graph: ir.Graph, tp: int, found: Seeds, taken: set[ir.Node]) -> None:
    for first, second, siblings in list(_mlp_pairs(graph, taken)):
        if {first, second} & taken or siblings & taken:
            continue
        columns = [first, *sorted(siblings, key=lambda n: n.name or "")]
        weights = [_weight(n) for n in columns]
        if any(isinstance(shape_of(w)[col], int) and shape_of(w)[col] % tp for w, col, _ in weights):
            continue
        for w, col, _ in weights:
            found.seeds[w.name] = _column(w, col)
            found.roles[w.name] = "mlp in (column)"
        w2, _, row = _weight(second)
        found.seeds[w2.name] = _column(w2, row)
        found.roles[w2.name] = "mlp out (row)"
        found.blocks.append((f"mlp '{label(first)}'", [w.name for w, _, _ in weights] + [w2.name], second))
        taken |= {first, second, *siblings}


def _seed_vocabulary(graph: ir.Graph, tp: int, found: Seeds, taken: set[ir.Node]) -> None:
    """The token table and the LM head, where each is a large share of the weights."""
    total = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    for node in graph:
        table = _embedding(node)
        if table is None:
            continue
        rows = shape_of(table)[0]
        # "Where it pays": the table is a large share of the weights (one all-reduce of
        # the embeddings per forward buys 1/tp of it).
        if isinstance(rows, int) and rows % tp == 0 and table.const_value.nbytes * EMBEDDING_SHARE >= total:
            found.seeds[table.name] = Layout((Shard("tp"), None))
            found.roles[table.name] = "embedding (vocab)"
    for node in graph:
        if node in taken or _weight(node) is None or not _reaches_output(node.outputs[0]):
            continue
        w, col, _ = _weight(node)
        cols = shape_of(w)[col]
        # An LM head: split by vocabulary columns; the logits are all-gathered once.
        if isinstance(cols, int) and cols % tp == 0 and w.const_value.nbytes * EMBEDDING_SHARE >= total:
            found.seeds[w.name] = _column(w, col)
            found.roles[w.name] = "lm head (column)"
            taken.add(node)


def parse_override(text: str, rank: int | None = None) -> tuple[str, Layout]:
    """``NAME=AXIS:MESH[,AXIS:MESH]`` or ``NAME=replicated`` (rank from the tensor, given later)."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise ShardingError(f"override '{text}': expected NAME=AXIS:MESH[,...] or NAME=replicated")
    dims: dict[int, Shard] = {}
    if spec.strip() != "replicated":
        for part in spec.split(","):
            axis, _, mesh_axis = part.partition(":")
            try:
                dims[int(axis)] = Shard(mesh_axis.strip())
            except ValueError:
                raise ShardingError(f"override '{text}': '{part}' is not AXIS:MESH") from None
    r = rank if rank is not None else (max(dims) + 1 if dims else 0)
    if any(a < 0 or a >= r for a in dims):
        raise ShardingError(f"tensor '{name}': override axis out of range for rank {r}")
    return name, Layout(tuple(dims.get(a) for a in range(r)))
