"""Graph simplification: no-op removal, merges and exact algebraic identities.

The rules are a table, ``op_type -> [rule, ...]``; a rule returns True when it rewrote
the node. Each is exact (bit-identical outputs) under the stated conditions:

- no-ops: ``Cast`` to the input's own type; ``Reshape``/``Expand`` to the input's own
  static shape; ``Transpose`` with the identity permutation; ``Dropout`` in inference
  (its mask output unused); ``Pad`` whose pads are all zero; ``Concat`` of one input; ``Slice`` covering every
  element with step 1 (a symbolic dim counts as covered from 0 to an end of at least
  2**62, the exporters' ``INT64_MAX``); ``Squeeze``/``Unsqueeze`` with no axes to change.
- merges: ``Transpose(Transpose(x, p), q) = Transpose(x, p∘q)``;
  ``Reshape(Reshape(x, a), b) = Reshape(x, b)`` when ``b`` is constant without zeros
  (a zero would copy a dim of the intermediate shape); ``Unsqueeze(Squeeze(x, a), a)``
  and ``Squeeze(Unsqueeze(x, a), a)`` = ``x``; ``Unsqueeze(Unsqueeze(x, a), b)`` =
  ``Unsqueeze(x, c)`` (one node; c: every inserted axis's final position);
  ``Slice(Slice(x, a), b) = Slice(x, a + b)`` when they slice different axes (the inner
  one used only there). New constants are initializers where the scope may hold them
  (``gcomp.passes.scopes``), else ``Constant`` nodes.
- identities: ``x*1``, ``1*x``, ``x+0``, ``0+x``, ``x-0``, ``x/1``, ``x**1`` when the constant
  is that value everywhere, the output has ``x``'s dtype and broadcasting cannot change
  ``x``'s shape (``x``'s rank is known and at least the constant's, and each dim of the
  constant is 1 or ``x``'s static dim there: a zero bias ``[N]`` on ``[..., N]``). ``x+0``
  maps ``-0.0`` to ``+0.0`` in IEEE arithmetic; dropping it keeps ``-0.0``, which compares
  equal.
- ``If`` with a constant condition: the taken branch's nodes move into the parent graph.

Scopes: main graph, every If/Loop/Scan body, functions. Graph interfaces never change:
an output that cannot be rewired keeps its node (see :mod:`gcomp.passes.rewire`).
"""

from __future__ import annotations

__all__ = ["RULES", "Simplify"]

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gcomp.passes.fold import constant_lookup, standalone_node_proto
from gcomp.passes.opsets import model_opset
from gcomp.passes.rewire import bypass
from gcomp.passes.scopes import FreshNames, add_constant, all_scopes, initializer_scopes
from gcomp.registry import register_pass

@dataclass(frozen=True)
class Context:
    """What a rule may need to know about the model beyond the node."""

    opset: int
    constant: Callable[[ir.Value], np.ndarray | None]
    holders: frozenset = frozenset()  # the graphs where a new constant is an initializer
    names: Callable[[str], str] = str  # fresh value names (FreshNames)


Rule = Callable[[ir.Graph | ir.Function, ir.Node, Context], bool]


@register_pass("simplify")
class Simplify(ir.passes.InPlacePass):
    """Remove no-op nodes, merge Transpose/Reshape/Squeeze chains, apply exact identities, inline constant Ifs."""

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        ctx = Context(
            opset=model_opset(model),
            constant=constant_lookup(model),
            holders=frozenset(initializer_scopes(model)),
            names=FreshNames(model),
        )
        for scope in all_scopes(model):
            for node in list(scope):
                if node.graph is not scope or node.domain not in ("", "ai.onnx"):
                    continue
                for rule in RULES.get(node.op_type, ()):
                    if rule(scope, node, ctx):
                        modified = True
                        break
        return ir.passes.PassResult(model, modified=modified)


# ------------------------------------------------------------------ helpers


def _drop(scope, node: ir.Node, replacement: ir.Value, output: int = 0) -> bool:
    """Replace ``node.outputs[output]`` by ``replacement``; remove the node when unused."""
    out = node.outputs[output]
    if not bypass(scope, out, replacement):
        return False
    if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
        scope.remove(node, safe=True)
    return True


def _remove_if_dead(scope, node: ir.Node) -> None:
    """Remove a node of ``scope`` left with no used output (an absorbed inner node)."""
    if node.graph is scope and all(not o.uses() and not o.is_graph_output() for o in node.outputs):
        scope.remove(node, safe=True)


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return tuple(value.shape.numpy())


def _const(ctx: Context, node: ir.Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    return ctx.constant(node.inputs[index])


def _ints(ctx: Context, node: ir.Node, index: int, attr: str | None = None) -> list[int] | None:
    """Integer list from input ``index`` (opset >= 13 style) or from attribute ``attr``."""
    if attr is not None and attr in node.attributes:
        return list(node.attributes[attr].as_ints())
    array = _const(ctx, node, index)
    if array is None:
        return None
    return [int(v) for v in np.asarray(array).reshape(-1)]


def _producer_of(node: ir.Node, op_type: str) -> ir.Node | None:
    """The node producing ``node``'s first input when it is ONNX's ``op_type``, else None."""
    inner = node.inputs[0].producer() if node.inputs[0] is not None else None
    if inner is None or inner.op_type != op_type or inner.domain not in ("", "ai.onnx"):
        return None
    return inner


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


# ------------------------------------------------------------------ no-ops


def _cast_same_type(scope, node, ctx: Context) -> bool:
    x = node.inputs[0]
    to = node.attributes.get_int("to", -1)
    if x is None or x.dtype is None or int(x.dtype) != to:
        return False
    return _drop(scope, node, x)


def _reshape_same_shape(scope, node, ctx: Context) -> bool:
    """Reshape to the input's own shape, static or symbolic: every target entry is 0
    ("copy this dim", without allowzero) or the input's static dim there, with at most
    one -1 (which must then be the one remaining dim)."""
    x = node.inputs[0]
    target = _ints(ctx, node, 1)
    if x is None or x.shape is None or target is None or len(target) != len(x.shape):
        return False
    allowzero = node.attributes.get_int("allowzero", 0)
    minus_one = 0
    for t, d in zip(target, x.shape):
        if t == 0 and not allowzero:
            continue
        if t == -1:
            minus_one += 1
            continue
        if not (isinstance(d, int) and d == t):
            return False
    if minus_one > 1:
        return False
    return _drop(scope, node, x)


def _expand_same_shape(scope, node, ctx: Context) -> bool:
    x = node.inputs[0]
    shape = _static_shape(x)
    target = _ints(ctx, node, 1)
    if shape is None or target is None or len(target) > len(shape):
        return False
    padded = [1] * (len(shape) - len(target)) + target
    if any(t not in (1, d) for t, d in zip(padded, shape)):
        return False
    return _drop(scope, node, x)


def _concat_one(scope, node, ctx: Context) -> bool:
    """Concat of one tensor: a copy of it (TorchScript's cache export writes one on the
    first layer's past key, copied every decoding step)."""
    if len(node.inputs) != 1 or node.inputs[0] is None:
        return False
    return _drop(scope, node, node.inputs[0])


def _transpose_identity(scope, node, ctx: Context) -> bool:
    x = node.inputs[0]
    perm = node.attributes.get_ints("perm", None)
    if x is None:
        return False
    rank = len(x.shape) if x.shape is not None else None
    if perm is None:
        if rank is None or rank > 1:
            return False
    elif list(perm) != list(range(len(perm))):
        return False
    return _drop(scope, node, x)


def _dropout_inference(scope, node, ctx: Context) -> bool:
    if len(node.inputs) >= 3 and node.inputs[2] is not None:
        training = _const(ctx, node, 2)
        if training is None or np.asarray(training).any():
            return False
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False
    return _drop(scope, node, node.inputs[0])


def _pad_zero(scope, node, ctx: Context) -> bool:
    pads = _ints(ctx, node, 1, "pads")
    if pads is None or any(pads):
        return False
    return _drop(scope, node, node.inputs[0])


# No axis of a tensor has this many elements (2**62 of even one byte is 4 EiB): a slice
# end at or past it, or a start at or before its negative, reaches the end of any dim.
_HUGE = 1 << 62


def _slice_params(ctx: Context, node: ir.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Constant (starts, ends, axes, steps) of a Slice, defaults filled in; None otherwise."""
    starts, ends = _ints(ctx, node, 1, "starts"), _ints(ctx, node, 2, "ends")
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    has_axes = "axes" in node.attributes or (len(node.inputs) > 3 and node.inputs[3] is not None)
    axes = _ints(ctx, node, 3, "axes") if has_axes else list(range(len(starts)))
    has_steps = len(node.inputs) > 4 and node.inputs[4] is not None
    steps = _ints(ctx, node, 4) if has_steps else [1] * len(starts)
    if axes is None or steps is None or not len(axes) == len(steps) == len(starts):
        return None
    return starts, ends, axes, steps


def _slice_everything(scope, node, ctx: Context) -> bool:
    """Step 1 from the first element to the last on every sliced axis. With the dim
    known, after clamping; with the dim symbolic (or the rank unknown), a start of 0 (or
    at most -2**62) and an end of at least 2**62: INT64_MAX, the exporters' "to the end"."""
    x = node.inputs[0]
    params = _slice_params(ctx, node)
    if x is None or params is None:
        return False
    rank = len(x.shape) if x.shape is not None else None
    for start, end, axis, step in zip(*params):
        if step != 1:
            return False
        dim = x.shape[axis] if rank is not None and -rank <= axis < rank else None
        if isinstance(dim, int):
            s = min(max(start + dim if start < 0 else start, 0), dim)
            e = min(max(end + dim if end < 0 else end, 0), dim)
            if s != 0 or e != dim:
                return False
        elif not (start == 0 or start <= -_HUGE) or end < _HUGE:
            return False
    return _drop(scope, node, x)


def _squeeze_nothing(scope, node, ctx: Context) -> bool:
    axes = _ints(ctx, node, 1, "axes")
    if axes is None or axes:  # no axes means "every dim of size 1": not a no-op in general
        return False
    if node.op_type == "Unsqueeze":
        return _drop(scope, node, node.inputs[0])
    return False


# ------------------------------------------------------------------ merges


def _transpose_transpose(scope, node, ctx: Context) -> bool:
    inner = _producer_of(node, "Transpose")
    if inner is None:
        return False
    p, q = inner.attributes.get_ints("perm", None), node.attributes.get_ints("perm", None)
    if p is None or q is None or len(p) != len(q):
        return False
    composed = [p[i] for i in q]
    x = inner.inputs[0]
    if composed == list(range(len(composed))):
        if not _drop(scope, node, x):
            return False
    else:
        node.replace_input_with(0, x)
        node.attributes["perm"] = ir.AttrInt64s("perm", composed)
    _remove_if_dead(scope, inner)
    return True


def _reshape_reshape(scope, node, ctx: Context) -> bool:
    inner = _producer_of(node, "Reshape")
    if inner is None or inner.graph is not scope:
        return False
    target = _ints(ctx, node, 1)
    if target is None or (0 in target and not node.attributes.get_int("allowzero", 0)):
        return False
    node.replace_input_with(0, inner.inputs[0])
    _remove_if_dead(scope, inner)
    return True


def _slice_slice(scope, node, ctx: Context) -> bool:
    """``Slice(Slice(x, a), b) = Slice(x, a + b)`` when the two slice different axes: each
    axis is sliced on its own, against dims the other slice does not change."""
    inner = _producer_of(node, "Slice")
    if ctx.opset < 10 or inner is None or inner.graph is not scope or not _single_use(inner.outputs[0]):
        return False
    first, second = _slice_params(ctx, inner), _slice_params(ctx, node)
    x = inner.inputs[0]
    if first is None or second is None or x is None:
        return False
    axes = first[2] + second[2]
    if any(a < 0 for a in axes):
        rank = len(x.shape) if x.shape is not None else None
        if rank is None or any(not -rank <= a < rank for a in axes):
            return False
        axes = [a % rank for a in axes]
    if len(set(axes)) != len(axes):
        return False
    merged = (first[0] + second[0], first[1] + second[1], axes, first[3] + second[3])
    base = node.name or "Slice"
    params = [
        add_constant(scope, np.array(v, dtype=np.int64), ctx.names(f"{base}_{what}"), node,
                     as_initializer=scope in ctx.holders)
        for v, what in zip(merged, ("starts", "ends", "axes", "steps"))
    ]
    node.resize_inputs(5)
    for i, value in enumerate([x, *params]):
        node.replace_input_with(i, value)
    _remove_if_dead(scope, inner)
    return True


def _squeeze_pair(scope, node, ctx: Context) -> bool:
    inverse = {"Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}[node.op_type]
    inner = _producer_of(node, inverse)
    if inner is None:
        return False
    a, b = _ints(ctx, inner, 1, "axes"), _ints(ctx, node, 1, "axes")
    if not a or not b:
        return False
    x = inner.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if rank is None:
        return False
    # Normalise negative axes against the rank each op sees.
    r_inner = rank if inner.op_type == "Squeeze" else rank + len(a)
    if sorted(v % r_inner for v in a) != sorted(v % r_inner for v in b):
        return False
    if not _drop(scope, node, x):
        return False
    _remove_if_dead(scope, inner)
    return True


def _unsqueeze_unsqueeze(scope, node, ctx: Context) -> bool:
    """``Unsqueeze(Unsqueeze(x, a), b) = Unsqueeze(x, c)``: c holds the final positions of
    every inserted axis (b's as given; a's shifted past the b positions)."""
    inner = _producer_of(node, "Unsqueeze")
    if inner is None or inner.graph is not scope or not _single_use(inner.outputs[0]):
        return False
    a, b = _ints(ctx, inner, 1, "axes"), _ints(ctx, node, 1, "axes")
    if not a or not b:
        return False
    x = inner.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if rank is None and (min(a) < 0 or min(b) < 0):
        return False
    mid = (rank + len(a)) if rank is not None else None
    final = (mid + len(b)) if mid is not None else max(b) + 1
    a_norm = sorted(v % mid if mid is not None else v for v in a)
    b_norm = sorted(v % final if rank is not None else v for v in b)
    if rank is None:
        final = max([*b_norm, *(v + len(b) for v in a_norm)]) + 1  # enough room to place a's axes
    kept = [i for i in range(final + len(a)) if i not in b_norm]
    if len(set(a_norm)) != len(a_norm) or len(set(b_norm)) != len(b_norm) or max(a_norm) >= len(kept):
        return False
    combined = sorted([kept[i] for i in a_norm] + b_norm)
    node.replace_input_with(0, x)
    if ctx.opset >= 13:
        const = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(combined, dtype=np.int64))})
        scope.insert_before(node, const)
        node.replace_input_with(1, const.outputs[0])
    else:
        node.attributes["axes"] = ir.AttrInt64s("axes", combined)
    _remove_if_dead(scope, inner)
    return True


# ------------------------------------------------------------------ identities


def _identity_operand(value: float):
    def rule(scope, node, ctx: Context) -> bool:
        if len(node.inputs) != 2 or node.outputs[0].dtype is None:
            return False
        positions = (0, 1) if node.op_type in ("Mul", "Add") else (1,)
        for ci in positions:
            c = _const(ctx, node, ci)
            x = node.inputs[1 - ci]
            # A large operand is a weight, not an identity: don't read it from disk to find out.
            if c is None or x is None or c.dtype.kind not in "biuf" or c.size == 0 or c.size > 65536:
                continue
            # The op's type constraint makes the output x's dtype (both operands share T;
            # Pow's output is the base's type): only the value and the shape need checking.
            if not np.all(c == value):
                continue
            if x.shape is None or len(x.shape) < c.ndim:
                continue
            # Broadcasting leaves x's shape when each dim of c is 1 or x's own (static) dim
            # there: a zero bias [N] on [..., N] included.
            tail = list(x.shape)[len(x.shape) - c.ndim:]
            if any(d != 1 and not (isinstance(xd, int) and xd == d) for d, xd in zip(c.shape, tail)):
                continue
            return _drop(scope, node, x)
        return False

    return rule


# ------------------------------------------------------------------ If inlining


def _inline_constant_if(scope, node, ctx: Context) -> bool:
    cond = _const(ctx, node, 0)
    if cond is None or cond.size != 1:
        return False
    branch = node.attributes.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
    if branch is None:
        return False
    body: ir.Graph = branch.as_graph()
    if len(body.outputs) != len(node.outputs) or body.inputs or len(set(body.outputs)) != len(body.outputs):
        return False
    if not _consumers_accept(node, list(body.outputs), ctx.opset, ctx.constant):
        return False
    prefix = node.name or "if"
    existing = {v.name for n in scope for v in n.outputs if v.name} | {v.name for v in scope.inputs if v.name}
    if isinstance(scope, ir.Graph):
        existing |= set(scope.initializers)
    # Branch initializers become Constant nodes (valid in any parent scope).
    for name, value in list(body.initializers.items()):
        body.initializers.pop(name)
        const = ir.node("Constant", inputs=[], attributes={"value": value.const_value}, name=f"{prefix}/{name}")
        scope.insert_before(node, const)
        for i, v in enumerate(list(body.outputs)):  # a branch may return its initializer
            if v is value:
                body.outputs[i] = const.outputs[0]
        ir.convenience.replace_all_uses_with(value, const.outputs[0])
        const.outputs[0].name = name
    for inner in list(body):
        body.remove(inner)
        inner.name = f"{prefix}/{inner.name}" if inner.name else None
        for v in inner.outputs:
            if v.name in existing:
                v.name = f"{v.name}__{prefix}"
            existing.add(v.name)
        scope.insert_before(node, inner)
    sources = list(body.outputs)
    body.outputs.clear()
    for out, src in zip(list(node.outputs), sources):
        if not bypass(scope, out, src):
            # A graph output cannot take an input's or outer value's place: keep an Identity.
            ident = ir.node("Identity", inputs=[src], name=f"{prefix}/output")
            scope.insert_before(node, ident)
            bypass(scope, out, ident.outputs[0])
    scope.remove(node, safe=True)
    return True


def _consumers_accept(node: ir.Node, sources: list[ir.Value], opset: int, constant) -> bool:
    """Whether every consumer of the If's outputs passes ONNX's own per-node shape
    inference with the branch outputs' (possibly more precise) types in their place.

    An If hides its branches' shapes from a runtime's load-time checks; once inlined,
    ORT checks them (e.g. Range refuses a ``[1]`` tensor it accepted at run time).
    """
    from onnx import defs, numpy_helper, shape_inference

    swap = dict(zip(node.outputs, sources))
    seen = set()
    for out in node.outputs:
        for consumer, _ in out.uses():
            if id(consumer) in seen or consumer.domain not in ("", "ai.onnx") or consumer.graph is None:
                continue
            seen.add(id(consumer))
            try:
                schema = defs.get_schema(consumer.op_type, opset, "")
            except Exception:
                continue
            proto, names, _ = standalone_node_proto(consumer, [v is not None for v in consumer.inputs])
            types, data = {}, {}
            for name, v in zip(names, consumer.inputs):
                v = swap.get(v, v)
                if v is None or v.type is None:
                    continue
                type_proto = ir.serde.serialize_type(v.type)
                if v.shape is not None:
                    ir.serde.serialize_shape_into(type_proto, v.shape)
                types[name] = type_proto
                array = constant(v)  # with data, as ORT checks initializers at load time
                if array is not None and array.size <= 4096 and array.dtype.kind in "biuf":
                    data[name] = numpy_helper.from_array(np.asarray(array), name)
            try:
                shape_inference.infer_node_outputs(schema, proto, types, data)
            except Exception:
                return False
    return True


RULES: dict[str, list[Rule]] = {
    "Cast": [_cast_same_type],
    "Reshape": [_reshape_same_shape, _reshape_reshape],
    "Expand": [_expand_same_shape],
    "Concat": [_concat_one],
    "Transpose": [_transpose_identity, _transpose_transpose],
    "Dropout": [_dropout_inference],
    "Pad": [_pad_zero],
    "Slice": [_slice_everything, _slice_slice],
    "Squeeze": [_squeeze_pair],
    "Unsqueeze": [_squeeze_nothing, _squeeze_pair, _unsqueeze_unsqueeze],
    "Mul": [_identity_operand(1)],
    "Div": [_identity_operand(1)],
    "Pow": [_identity_operand(1)],
    "Add": [_identity_operand(0)],
    "Sub": [_identity_operand(0)],
    "If": [_inline_constant_if],
}
