"""Seeds for a mesh: Megatron's plan for tensor parallelism, the batch axis for data parallelism.

Tensor parallelism (``tp``), after Shoeybi et al. 2019 (Megatron-LM):

- attention: found from each ``Softmax`` — backwards to the scores ``MatMul(Q, K^T)``,
  forwards to ``MatMul(probs, V)`` and on to the output projection. The Q, K and V
  projection weights are split by output columns (a fused QKV weight followed by a
  3-way ``Split`` is split per block, so rank r holds q_r, k_r, v_r), so each rank
  owns ``heads / tp`` heads; the output projection is split by input rows. The head
  count must divide by tp, otherwise the plan refuses, naming the tensor.
- MLP: a ``MatMul``/``Gemm`` with a weight whose output reaches, through elementwise ops
  only (bias, activation), exactly one other weight ``MatMul``/``Gemm``: the first is
  column-parallel, the second row-parallel.

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

__all__ = ["parse_override", "seed_plan"]

import onnx_ir as ir
from gcomp.passes.sharding.mesh import Layout, Mesh, Shard, ShardingError
from gcomp.passes.sharding.propagate import is_const, shape_of

_PASS = {"Transpose", "Reshape", "Identity", "Dropout", "Cast", "Squeeze", "Unsqueeze", "Flatten"}
_SCALE = {"Add", "Sub", "Mul", "Div", "Where"}
_NONLINEAR = {"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "FastGelu", "BiasGelu", "Softplus", "Exp",
              "HardSwish", "Mish", "LeakyRelu", "Elu", "Selu", "QuickGelu", "HardSigmoid", "Pow"}
_ELEMENTWISE = _NONLINEAR | _SCALE | {"Neg", "Identity", "Dropout", "Cast", "Reshape", "Sqrt", "Reciprocal"}


def _weight(node: ir.Node) -> tuple[ir.Value, int, int] | None:
    """(weight, column axis, row axis) of a MatMul/Gemm whose second input is a 2-D constant."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    s = shape_of(w)
    if not is_const(w) or s is None or len(s) != 2 or is_const(node.inputs[0]):
        return None
    if node.op_type == "Gemm":
        a = node.attributes
        if a.get("transA") is not None and a["transA"].value:
            return None
        if a.get("transB") is not None and a["transB"].value:
            return w, 0, 1
    return w, 1, 0


def _back_to_projection(v: ir.Value, depth: int = 12) -> tuple[ir.Node, int] | None:
    """Walk from ``v`` back through layout ops (and bias adds) to a weight MatMul/Gemm.

    Returns (node, blocks): blocks = outputs of a Split met on the way (fused QKV), else 1."""
    blocks = 1
    while depth > 0 and v is not None:
        depth -= 1
        p = v.producer()
        if p is None:
            return None
        if _weight(p) is not None:
            return p, blocks
        if p.op_type == "Split":
            blocks = len(p.outputs)
            v = p.inputs[0]
        elif p.op_type in _PASS:
            v = p.inputs[0]
        elif p.op_type in ("Add", "Mul", "Div") and len(p.inputs) == 2:
            act = [x for x in p.inputs if x is not None and not is_const(x)]
            if len(act) != 1:
                return None
            v = act[0]
        else:
            return None
    return None


def _scores_matmul(v: ir.Value, depth: int = 8) -> ir.Node | None:
    p = v.producer() if v is not None else None
    if p is None or depth == 0:
        return None
    if p.op_type == "MatMul" and not is_const(p.inputs[0]) and not is_const(p.inputs[1]):
        return p
    if p.op_type in _SCALE | _PASS:
        for x in p.inputs:
            if x is not None and not is_const(x):
                found = _scores_matmul(x, depth - 1)
                if found is not None:
                    return found
    return None


def _forward(v: ir.Value, want, depth: int = 6):
    """Follow single-consumer layout ops from ``v`` to the first node ``want`` accepts."""
    while depth > 0:
        depth -= 1
        users = v.uses()
        if len(users) != 1:
            return None
        node, idx = users[0]
        if want(node, idx):
            return node
        if node.op_type in _PASS and idx == 0:
            v = node.outputs[0]
            continue
        return None
    return None


def _attention_blocks(graph: ir.Graph, tp: int):
    """Yield (qkv projections with blocks, output projection, context tensor) per attention."""
    for sm in graph:
        if sm.op_type != "Softmax":
            continue
        scores = _scores_matmul(sm.inputs[0])
        ctx_mm = _forward(sm.outputs[0], lambda n, i: n.op_type == "MatMul" and i == 0)
        if scores is None or ctx_mm is None:
            continue
        out_proj = _forward(ctx_mm.outputs[0], lambda n, i: _weight(n) is not None and i == 0)
        projs = [_back_to_projection(x) for x in (scores.inputs[0], scores.inputs[1], ctx_mm.inputs[1])]
        if out_proj is None or any(p is None for p in projs):
            continue
        s = shape_of(ctx_mm.outputs[0])
        if s is not None and len(s) == 4 and isinstance(s[1], int) and s[1] % tp:
            raise ShardingError(
                f"tensor '{ctx_mm.outputs[0].name}': {s[1]} attention heads are not divisible by tp={tp}"
            )
        yield projs, out_proj, ctx_mm.outputs[0]


def _mlp_pairs(graph: ir.Graph, taken: set[ir.Node]):
    for node in graph:
        if node in taken or _weight(node) is None:
            continue
        frontier = [node.outputs[0]]
        seen: set[ir.Value] = set()
        ends: set[ir.Node] = set()
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
                    # the chain may combine only with constants and values of the chain itself
                    if any(not is_const(x) and not _from_chain(x, seen, node) for x in others):
                        ok = False
                        break
                    frontier.extend(user.outputs)
                else:
                    ok = False
                    break
            if len(seen) > 64:
                ok = False
        if ok and nonlinear and len(ends) == 1:
            yield node, next(iter(ends))


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


def _column(w: ir.Value, axis: int, blocks: int = 1) -> Layout:
    dims = [None, None]
    dims[axis] = Shard("tp", blocks)
    return Layout(tuple(dims))


def seed_plan(model: ir.Model, mesh: Mesh, overrides: dict[str, Layout] | None = None):
    """Seeds (tensor name -> Layout) and roles (weight name -> description) for ``mesh``."""
    graph = model.graph
    seeds: dict[str, Layout] = {}
    roles: dict[str, str] = {}
    tp = mesh.axis_size("tp")
    if "tp" in mesh.names():
        taken: set[ir.Node] = set()
        for projs, out_proj, _ctx in _attention_blocks(graph, tp):
            for (node, blocks), role in zip(projs, ("q", "k", "v")):
                w, col, _ = _weight(node)
                seeds[w.name] = _column(w, col, blocks)
                roles.setdefault(w.name, f"attention {'qkv' if blocks > 1 else role} (column)")
                taken.add(node)
            w, _, row = _weight(out_proj)
            seeds[w.name] = _column(w, row)
            roles[w.name] = "attention output (row)"
            taken.add(out_proj)
        for first, second in list(_mlp_pairs(graph, taken)):
            if first in taken or second in taken:
                continue
            w1, col, _ = _weight(first)
            w2, _, row = _weight(second)
            s1 = shape_of(w1)
            if isinstance(s1[col], int) and s1[col] % tp:
                continue
            seeds[w1.name] = _column(w1, col)
            seeds[w2.name] = _column(w2, row)
            roles[w1.name] = "mlp in (column)"
            roles[w2.name] = "mlp out (row)"
            taken |= {first, second}
        total = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
        for node in graph:
            table = _embedding(node)
            if table is None:
                continue
            rows = shape_of(table)[0]
            # "Where it pays": the table is a large share of the weights (one all-reduce of
            # the embeddings per forward buys 1/tp of it).
            if isinstance(rows, int) and rows % tp == 0 and table.const_value.nbytes * EMBEDDING_SHARE >= total:
                seeds[table.name] = Layout((Shard("tp"), None))
                roles[table.name] = "embedding (vocab)"
        for node in graph:
            if node in taken or _weight(node) is None or not _reaches_output(node.outputs[0]):
                continue
            w, col, _ = _weight(node)
            cols = shape_of(w)[col]
            # An LM head: split by vocabulary columns; the logits are all-gathered once.
            if isinstance(cols, int) and cols % tp == 0 and w.const_value.nbytes * EMBEDDING_SHARE >= total:
                seeds[w.name] = _column(w, col)
                roles[w.name] = "lm head (column)"
                taken.add(node)
    if "dp" in mesh.names():
        for v in graph.inputs:
            s = shape_of(v)
            if v.const_value is None and s:
                seeds[v.name] = Layout((Shard("dp"),) + (None,) * (len(s) - 1))
                roles[v.name] = "input (batch)"
    for name, lay in (overrides or {}).items():
        seeds[name] = lay
        roles[name] = "override"
    return seeds, roles


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
