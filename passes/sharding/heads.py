"""Find the multi-head attention blocks of a graph, in the forms exporters write them.

An attention block is found from its ``Softmax`` over the last axis of a 4-D score tensor:

- **scores**: backwards from the Softmax through scaling, mask ``Add``/``Where`` and layout
  ops to ``MatMul(Q, K^T)`` of two activations;
- **probabilities**: forwards from the Softmax through element-wise ops (the NaN guard
  ``Where(IsNaN(p), 0, p)`` of PyTorch's scaled-dot-product attention, dropout, casts) to
  the one ``MatMul(probs, V)``;
- **context**: forwards through the head merge (Transpose, Reshape) to the output
  projection, a ``MatMul``/``Gemm`` with a 2-D constant weight;
- **Q, K, V**: backwards from each operand through everything that moves or combines
  their values element by element (head split Reshape + Transpose, scaling, bias,
  rotary embeddings' Slice/Neg/Concat/Mul/Add, the KV-head repeat Unsqueeze + Expand +
  Reshape of grouped-query attention) to exactly one weight projection. A 3-way ``Split``
  of a projection's features on the way means a fused QKV projection (``blocks`` = 3).
  Branches that reach no projection (rotary tables from ``position_ids``, constants) are
  position data and do not count.

Head counts come from the operands: ``heads`` = Q's axis -3, ``head_dim`` = its last
axis; the KV heads = the K projection's features / head_dim (fewer than ``heads``:
grouped-query attention). A Softmax that looks like attention but cannot be planned is
returned as an :class:`Unplanned` entry naming the layer and why.
"""

from __future__ import annotations

__all__ = ["AttentionBlock", "Projection", "Unplanned", "find_attention", "label", "weight_of"]

import dataclasses

import onnx_ir as ir
from gcomp.passes.sharding.attention_ops import ATTENTION_OPS, MS, head_counts
from gcomp.passes.sharding.tensors import is_const, shape_of

_STD = ("", "ai.onnx")
_LAYOUT = {"Transpose", "Reshape", "Identity", "Dropout", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Expand",
           "Slice", "Concat"}
_HEAD_NORM = {"LayerNormalization", "RMSNormalization", "ReduceMean"}  # Q/K norms over each head
_SCALE = {"Add", "Sub", "Mul", "Div", "Where"}
_ELEMENTWISE = _SCALE | {"Neg", "Sin", "Cos", "Sqrt", "Reciprocal", "Pow", "Exp", "Tanh", "Sigmoid", "Erf",
                         "IsNaN", "IsInf", "Not", "And", "Or", "Equal", "Less", "Greater", "Max", "Min", "Clip"}
_DATA_ONLY = {"Reshape", "Expand", "Slice", "Squeeze", "Unsqueeze", "Dropout", "Clip", "LayerNormalization",
              "RMSNormalization", "ReduceMean"}  # later inputs: shapes, bounds
_MAX_VISITS = 96


@dataclasses.dataclass(frozen=True)
class Projection:
    """A weight MatMul/Gemm producing Q, K or V; ``blocks`` > 1: a fused QKV projection."""

    node: ir.Node
    blocks: int = 1


@dataclasses.dataclass
class AttentionBlock:
    """One attention: its Q/K/V projections (None for ``com.microsoft.Attention``, whose
    ``packed`` weight holds them), output projection, head counts and context tensor."""

    label: str
    q: Projection | None
    k: Projection | None
    v: Projection | None
    out: ir.Node
    heads: int
    kv_heads: int
    context: ir.Value
    core: ir.Node  # the Softmax, or the attention op
    packed: ir.Value | None = None


@dataclasses.dataclass
class Unplanned:
    """A layer the plan leaves replicated, and why (for ``gcomp shard``'s summary)."""

    layer: str
    reason: str


def weight_of(node: ir.Node) -> tuple[ir.Value, int, int] | None:
    """(weight, column axis, row axis) of a MatMul/Gemm whose second input is a 2-D constant."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in _STD or len(node.inputs) < 2:
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


def label(node: ir.Node) -> str:
    """A readable name for the layer around ``node``: torch.export's module path where the
    node records one (``model.h.0.attn``), else the node's name."""
    ns = node.metadata_props.get("namespace") if node.metadata_props else None
    if ns:
        names = [part.split(":")[0].strip() for part in ns.split("/")]
        names = [n for n in names if n]
        if len(names) >= 2:
            return names[-2]
    return node.name or f"{node.op_type} -> {node.outputs[0].name}"


def find_attention(graph: ir.Graph) -> tuple[list[AttentionBlock], list[Unplanned]]:
    """Every attention block of ``graph`` the plan can split by heads, and the others with a reason."""
    blocks, unplanned = [], []
    for sm in graph:
        if (sm.domain, sm.op_type) in ATTENTION_OPS:
            found = _op_block(sm)
            (blocks if isinstance(found, AttentionBlock) else unplanned).append(found)
            continue
        if sm.op_type != "Softmax" or sm.domain not in _STD:
            continue
        s = shape_of(sm.inputs[0])
        axis = sm.attributes["axis"].value if "axis" in sm.attributes else -1
        if s is None or len(s) not in (3, 4) or axis not in (-1, len(s) - 1):
            continue
        if len(s) == 3:  # [batch * heads, seq, seq]: heads merged with the batch
            if _scores_matmul(sm.inputs[0]) is not None:
                unplanned.append(Unplanned(f"attention '{label(sm)}'", "its scores are 3-D (heads merged with the "
                                           "batch), so the heads cannot be split"))
            continue
        found = _block(sm)
        (blocks if isinstance(found, AttentionBlock) else unplanned).append(found)
    return blocks, unplanned


def _block(sm: ir.Node) -> AttentionBlock | Unplanned:
    where = f"attention '{label(sm)}'"
    scores = _scores_matmul(sm.inputs[0])
    if scores is None:
        return Unplanned(where, "no MatMul(Q, K^T) of two activations before its Softmax")
    ctx, why = _probs_consumer(sm.outputs[0])
    if ctx is None:
        return Unplanned(where, f"the attention probabilities {why}")
    out, why = _out_projection(ctx.outputs[0])
    if out is None:
        return Unplanned(where, f"the context {why}")
    projs = _projections(where, scores.inputs[0], scores.inputs[1], ctx.inputs[1])
    if isinstance(projs, Unplanned):
        return projs
    q_shape = shape_of(ctx.outputs[0])
    if q_shape is None or len(q_shape) != 4 or not all(isinstance(d, int) for d in q_shape[1:]):
        return Unplanned(where, "the context has no static 4-D [batch, heads, seq, head_dim] shape")
    return _heads(where, sm, projs, out, ctx.outputs[0], q_shape[1], q_shape[3])


def _op_block(node: ir.Node) -> AttentionBlock | Unplanned:
    """An attention written as one op (:mod:`.attention_ops`)."""
    where = f"attention '{label(node)}'"
    counts = head_counts(node)
    q = shape_of(node.inputs[0])
    if counts is None or q is None or len(q) not in (3, 4) or not isinstance(q[-1], int):
        return Unplanned(where, f"{node.op_type} has no static head counts and Q shape")
    out, why = _out_projection(node.outputs[0])
    if out is None:
        return Unplanned(where, f"the output {why}")
    heads, kv = counts
    if node.domain == MS and node.op_type == "Attention":
        w = node.inputs[1]
        sizes = node.attributes["qkv_hidden_sizes"].value if "qkv_hidden_sizes" in node.attributes else None
        if not is_const(w) or len(shape_of(w) or ()) != 2 or (sizes and len(set(sizes)) != 1):
            return Unplanned(where, "its packed Q/K/V weight is not a constant of three equal blocks")
        return AttentionBlock(where, None, None, None, out, heads, kv, node.outputs[0], node, packed=w)
    projs = _projections(where, node.inputs[0], node.inputs[1], node.inputs[2])
    if isinstance(projs, Unplanned):
        return projs
    head_dim = q[-1] if len(q) == 4 else q[-1] // heads
    return _heads(where, node, projs, out, node.outputs[0], heads, head_dim)


def _projections(where: str, query: ir.Value, key: ir.Value, value: ir.Value) -> dict[str, Projection] | Unplanned:
    """The weight projection behind each of Q, K and V, or why one has none."""
    projs = {}
    for role, operand in (("query", query), ("key", key), ("value", value)):
        proj, why = _projection(operand)
        if proj is None:
            return Unplanned(where, f"the {role} {why}")
        projs[role] = proj
    return projs


def _heads(where: str, core: ir.Node, projs: dict[str, Projection], out: ir.Node, context: ir.Value,
           heads: int, head_dim: int):
    counts = {}
    for role, p in projs.items():
        w, col, _ = weight_of(p.node)
        features = shape_of(w)[col] // p.blocks
        if not isinstance(features, int) or features % head_dim:
            return Unplanned(where, f"the {role} projection '{w.name}' has {features} features, not a multiple of "
                                    f"the head size {head_dim}")
        counts[role] = features // head_dim
    if counts["query"] != heads or counts["key"] != counts["value"] or heads % counts["key"]:
        return Unplanned(where, f"heads do not match: {counts['query']} query, {counts['key']} key, "
                                f"{counts['value']} value projections for {heads} heads")
    return AttentionBlock(where, projs["query"], projs["key"], projs["value"], out, heads, counts["key"],
                          context, core)


def _scores_matmul(v: ir.Value, depth: int = 8) -> ir.Node | None:
    p = v.producer() if v is not None else None
    if p is None or depth == 0:
        return None
    if p.op_type == "MatMul" and not is_const(p.inputs[0]) and not is_const(p.inputs[1]):
        return p
    if p.op_type in _SCALE | _LAYOUT:
        for x in p.inputs:
            if x is not None and not is_const(x):
                found = _scores_matmul(x, depth - 1)
                if found is not None:
                    return found
    return None


def _probs_consumer(v: ir.Value) -> tuple[ir.Node | None, str]:
    """The one MatMul(probs, V) the probabilities reach through element-wise ops."""
    frontier, seen, ends = [v], {v}, set()
    while frontier:
        x = frontier.pop()
        if x.is_graph_output():
            return None, "are a graph output"
        for user, idx in x.uses():
            if user.op_type == "MatMul" and user.domain in _STD and idx == 0:
                ends.add(user)
            elif user.domain in _STD and user.op_type in _ELEMENTWISE | {"Cast", "Identity", "Dropout"}:
                for o in user.outputs:
                    if o not in seen:
                        seen.add(o)
                        frontier.append(o)
            else:
                return None, f"reach {user.op_type} '{user.name}', not MatMul(probs, V)"
        if len(seen) > 32:
            return None, "spread over too many ops"
    if len(ends) != 1:
        return None, f"reach {len(ends)} MatMuls, not one MatMul(probs, V)"
    return ends.pop(), ""


def _out_projection(v: ir.Value, depth: int = 6) -> tuple[ir.Node | None, str]:
    """Follow the head merge (single-consumer layout ops) to the output projection."""
    while depth > 0:
        depth -= 1
        users = v.uses()
        if len(users) != 1 or v.is_graph_output():
            return None, f"'{v.name}' has {len(users)} uses, not one output projection"
        node, idx = users[0]
        if weight_of(node) is not None and idx == 0:
            return node, ""
        if node.op_type in {"Transpose", "Reshape", "Identity", "Flatten", "Cast"} and idx == 0:
            v = node.outputs[0]
            continue
        return None, f"goes to {node.op_type} '{node.name}', not a weight MatMul/Gemm"
    return None, "is too far from any weight MatMul/Gemm"


def _projection(v: ir.Value) -> tuple[Projection | None, str]:
    """The one weight projection ``v`` is computed from (see the module docstring)."""
    found: set[Projection] = set()
    stack: list[tuple[ir.Value, ir.Node | None]] = [(v, None)]
    seen: set[ir.Value] = set()
    stops: set[str] = set()
    while stack:
        x, split = stack.pop()
        if x in seen or is_const(x):
            continue
        seen.add(x)
        if len(seen) > _MAX_VISITS:
            return None, "is computed through too many ops to trace"
        p = x.producer()
        if p is None:
            continue  # a graph input: position data (rotary tables), not a projection
        if weight_of(p) is not None:
            found.add(Projection(p, _fused_blocks(p, split)))
        elif p.domain in _STD and p.op_type == "Split":
            stack.append((p.inputs[0], p))
        elif p.domain in _STD and p.op_type in _LAYOUT | _ELEMENTWISE | _HEAD_NORM:
            ins = p.inputs[:1] if p.op_type in _DATA_ONLY else p.inputs
            stack.extend((i, split) for i in ins if i is not None)
        else:
            stops.add(f"{p.op_type} '{p.name}'")
    if len(found) == 1:
        return found.pop(), ""
    if found:
        names = ", ".join(sorted(f"'{weight_of(f.node)[0].name}'" for f in found))
        return None, f"is computed from several weight projections ({names})"
    return None, "comes from no weight MatMul/Gemm" + (f" (it starts at {min(stops)})" if stops else "")


def _fused_blocks(proj: ir.Node, split: ir.Node | None) -> int:
    """3 where a Split met on the way cuts this projection's features in equal blocks (fused QKV)."""
    if split is None:
        return 1
    w, col, _ = weight_of(proj)
    features = shape_of(w)[col]
    s = shape_of(split.inputs[0])
    axis = split.attributes["axis"].value if "axis" in split.attributes else 0
    if s is None or not s or s[axis] != features:
        return 1  # a split of something else (rotary halves of a head)
    sizes = split.inputs[1].const_value.numpy().tolist() if len(split.inputs) > 1 and is_const(split.inputs[1]) else None
    if sizes is not None and len(set(sizes)) != 1:
        return 1
    return len(split.outputs)
