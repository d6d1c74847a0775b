"""Rotary position embeddings (RoPE): the matcher and the cos/sin caches shared by
``ort-rotary`` (``com.microsoft.RotaryEmbedding``) and ``rotary`` (ONNX ``RotaryEmbedding``-23).

Math. For heads x [B, N, S, H] (after their transpose), positions p [B, S], H/2 frequencies w
and a scale a (transformers' ``attention_scaling``; 1 for most models), with f = p * w:

    C = a * cos(concat(f, f)),  S = a * sin(concat(f, f))                       (half-split)
    y = x * C + rotate_half(x) * S,   rotate_half(x) = concat(-x[..., H/2:], x[..., :H/2])

so for j < H/2: y_j = x_j c_j - x_{j+H/2} s_j and y_{j+H/2} = x_{j+H/2} c_j + x_j s_j, with
c_j = a cos(p w_j), s_j = a sin(p w_j). That is ``RotaryEmbedding(x, p, cos_cache, sin_cache,
interleaved=0)`` with cos_cache[q, j] = a cos(q w_j) and sin_cache alike, for every position
q the model gets. The GPT-J form (interleaved=1) pairs x_{2j} with x_{2j+1}: its C and S
repeat each frequency twice (repeat_interleave) and rotate_every_two(x) interleaves
-x[..., 1::2] and x[..., ::2] (``stack(-x2, x1, -1).flatten(-2)``).

**Recognition is by value, not by the exporter's node sequence.** C and S (the operands
multiplying x and its rotation) must depend on one int64 rank-2 graph input alone (walking
their producers: that input and constants, at most 64 nodes, no random ops), and evaluating
that small subgraph (ONNX's reference evaluator; passes do not import ONNX Runtime) at probe
positions must give a cos(p w) and a sin(p w) in the layout of the rotation: w is recovered
from position 1 (the fp32 value nearest atan2(S, C) that best fits every probe), a from
position 0, then every probe (two rows of small positions, two of large ones up to 65535,
several random) must match within 1e-6 a plus two roundings of the fp32 angle p * w. So
rope_scaling variants with constant frequencies (linear, llama3, yarn's attention scaling)
fuse; frequencies that depend on the positions (dynamic NTK, longrope: the probes of
small and large positions disagree), a layout that is not the rotation's, C or S that also
read another graph input, and partial rotary (C narrower than x) are refused, with the
reason in ``--explain-fusion``.

**The caches are computed in the graph, once per run, one row per token** (shared by all
layers): ``Cos(Cast(p) * w) * a`` over the flattened positions, [B * S, H/2], the same fp32
arithmetic as the export's, read by the index b * S + s in place of ``position_ids``. Not a
fixed table indexed by position: past its end ONNX Runtime's CPU kernel fails ("position_ids
value ... is out of range"), but its CUDA kernel cannot report it and returns wrong numbers
(it passes the input through, or in older releases reads past the table), so a table would
bound what the fused model accepts; nor rows 0..max(p), whose cost grows with the position
reached (a decoding step at position 4000 would compute 4001 rows for one token). The cost
is B * S * H/2 cosines and sines per run, half the export's, whatever the positions
(negative ones included).
"""

from __future__ import annotations

__all__ = ["MAX_PROBE_POSITION", "RotaryRule", "Site", "fit", "match"]

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gcomp.passes.fusion._engine import FusionRun, GraphRule
from gcomp.passes.fusion._engine import Refused as _Refused

MAX_PROBE_POSITION = 65535
_MAX_NODES = 64
_STANDARD = ("", "ai.onnx")
_RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"})


def _std(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in _STANDARD and node.op_type in op_types


@dataclass
class Site:
    """One rotation ``y = x * C + rot(x) * S`` (``out`` is y)."""

    add: ir.Node
    x: ir.Value
    cos: ir.Value
    sin: ir.Value
    interleaved: bool
    nodes: list[ir.Node]  # the matched nodes (removed once nothing reads them)


@dataclass(frozen=True)
class _Fit:
    position: ir.Value
    inv_freq: np.ndarray  # float32 [H/2]
    scale: float
    dtype: ir.DataType
    closure: tuple[ir.Node, ...]


# ------------------------------------------------------------------------- the rotation


def _scalar(run: FusionRun, value: ir.Value | None, default: int | None = None) -> int | None:
    if value is None:
        return default
    array = run.const(value)
    if array is None or array.size != 1 or array.dtype.kind not in "iu":
        return None
    return int(array.reshape(-1)[0])


def _last_axis_slice(run: FusionRun, value: ir.Value) -> tuple[ir.Value, int, int, int] | None:
    """(x, start, end, step) of ``value`` = Slice(x) on x's last axis (rank 4, static size),
    bounds clamped as Slice does; None otherwise."""
    node = value.producer()
    if not _std(node, "Slice") or len(node.inputs) < 4:
        return None
    x = node.inputs[0]
    if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
        return None
    size = x.shape[3]
    start, end = _scalar(run, node.inputs[1]), _scalar(run, node.inputs[2])
    axis = _scalar(run, node.inputs[3])
    step = _scalar(run, node.inputs[4] if len(node.inputs) > 4 else None, 1)
    if None in (start, end, axis, step) or axis not in (-1, 3) or step <= 0:
        return None
    start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
    return x, start, end, step


def _halves(run: FusionRun, lo: ir.Value, hi: ir.Value) -> ir.Value | None:
    """x when ``lo`` = x[..., :H/2] and ``hi`` = x[..., H/2:] (two Slices or one Split)."""
    split = lo.producer()
    if _std(split, "Split") and hi.producer() is split and len(split.outputs) == 2:
        x = split.inputs[0]
        axis = split.attributes.get("axis")
        sizes = run.const(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if (x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int) or x.shape[3] % 2
                or axis is None or axis.as_int() not in (-1, 3) or split.outputs[0] is not lo
                or (sizes is not None and [int(v) for v in sizes.reshape(-1)] != [x.shape[3] // 2] * 2)):
            return None
        return x
    a, b = _last_axis_slice(run, lo), _last_axis_slice(run, hi)
    if a is None or b is None or a[0] is not b[0]:
        return None
    size = a[0].shape[3]
    if size % 2 or a[1:] != (0, size // 2, 1) or b[1:] != (size // 2, size, 1):
        return None
    return a[0]


def _rotate_half(run: FusionRun, value: ir.Value) -> ir.Value | None:
    """x when ``value`` = concat(-x[..., H/2:], x[..., :H/2], axis=-1)."""
    concat = value.producer()
    if not _std(concat, "Concat") or len(concat.inputs) != 2:
        return None
    axis = concat.attributes.get("axis")
    neg = concat.inputs[0].producer()
    if axis is None or axis.as_int() not in (-1, 3) or not _std(neg, "Neg"):
        return None
    return _halves(run, concat.inputs[1], neg.inputs[0])


def _rotate_every_two(run: FusionRun, value: ir.Value) -> ir.Value | None:
    """x when ``value`` = flatten(stack(-x[..., 1::2], x[..., ::2], axis=-1), -2): a Reshape
    of Concat(Unsqueeze(Neg(odd), -1), Unsqueeze(even, -1), axis=-1) [B, N, S, H/2, 2] to
    x's shape."""
    reshape = value.producer()
    if not _std(reshape, "Reshape"):
        return None
    concat = reshape.inputs[0].producer()
    if not _std(concat, "Concat") or len(concat.inputs) != 2:
        return None
    axis = concat.attributes.get("axis")
    if axis is None or axis.as_int() not in (-1, 4):
        return None
    parts = []
    for v in concat.inputs:
        unsq = v.producer()
        if not _std(unsq, "Unsqueeze"):
            return None
        axes = unsq.attributes.get("axes")
        axes = list(axes.as_ints()) if axes is not None else (
            None if len(unsq.inputs) < 2 else [_scalar(run, unsq.inputs[1])])
        if axes not in ([-1], [4]):
            return None
        parts.append(unsq.inputs[0])
    neg = parts[0].producer()
    if not _std(neg, "Neg"):
        return None
    odd, even = _last_axis_slice(run, neg.inputs[0]), _last_axis_slice(run, parts[1])
    if odd is None or even is None or odd[0] is not even[0]:
        return None
    x = odd[0]
    size = x.shape[3]
    if size % 2 or odd[1:] != (1, size, 2) or even[1:] != (0, size, 2):
        return None
    out = reshape.outputs[0]
    if out.shape is None or out.shape.rank() != 4 or out.shape[3] != size:
        return None
    for a in range(3):  # the leading dims kept: a flatten of the last two axes
        d_in, d_out = x.shape[a], out.shape[a]
        if not (d_in == d_out and (isinstance(d_in, int) or _named(d_in))):
            return None
    return x


def _named(dim) -> bool:
    name = getattr(dim, "value", None)
    return bool(name) and not str(name).startswith("unk__")


def match(run: FusionRun, add: ir.Node) -> Site | None:
    """The rotation ending in ``add``; None when ``add`` is not shaped like one (not a near
    miss); :class:`_Refused` when it is, but does not hold."""
    if not _std(add, "Add") or len(add.inputs) != 2:
        return None
    muls = [v.producer() for v in add.inputs]
    if not all(_std(m, "Mul") for m in muls):
        return None
    for plain, rotated in ((muls[0], muls[1]), (muls[1], muls[0])):
        for i in (0, 1):
            r, sin = rotated.inputs[i], rotated.inputs[1 - i]
            for form, interleaved in ((_rotate_half, False), (_rotate_every_two, True)):
                x = form(run, r)
                if x is None:
                    continue
                if x not in plain.inputs:
                    raise _Refused("the cos term does not multiply the rotated tensor")
                cos = plain.inputs[1] if plain.inputs[0] is x else plain.inputs[0]
                inner = [n for n in _chain(r.producer()) if n is not None]
                return Site(add, x, cos, sin, interleaved, [add, plain, rotated, *inner])
    if any(_looks_rotated(v) for m in muls for v in m.inputs):
        raise _Refused("the rotated term is neither rotate_half (concat(-x[..., H/2:], x[..., :H/2])) "
                       "nor rotate_every_two of the tensor multiplied by cos")
    return None


def _looks_rotated(value: ir.Value | None) -> bool:
    """A Concat (or a Reshape of one) with an input negated (directly or through Unsqueeze):
    what a rotation looks like, so a failed match there is a near miss."""
    node = value.producer() if value is not None else None
    if _std(node, "Reshape"):
        node = node.inputs[0].producer()
    if not _std(node, "Concat"):
        return False
    for v in node.inputs:
        p = v.producer() if v is not None else None
        if _std(p, "Unsqueeze"):
            p = p.inputs[0].producer()
        if _std(p, "Neg"):
            return True
    return False


def _chain(node: ir.Node) -> list[ir.Node]:
    """The rotation's own nodes from its last one back to the slices of x."""
    found, stack = [], [node]
    while stack:
        n = stack.pop()
        if n is None or n in found or not _std(n, "Concat", "Reshape", "Unsqueeze", "Neg", "Slice", "Split"):
            continue
        found.append(n)
        reads = n.inputs if n.op_type == "Concat" else n.inputs[:1]
        stack.extend(v.producer() for v in reads if v is not None)
    return found


# --------------------------------------------------------------------- cos / sin by value


def _closure(run: FusionRun, graph: ir.Graph, values: tuple[ir.Value, ...]) -> tuple[list[ir.Node], ir.Value]:
    """The nodes computing ``values`` from constants and one graph input (returned)."""
    nodes: set[ir.Node] = set()
    inputs: set[ir.Value] = set()
    stack = list(values)
    seen: set[ir.Value] = set()
    while stack:
        v = stack.pop()
        if v is None or v in seen:
            continue
        seen.add(v)
        if run.const(v) is not None:
            continue
        node = v.producer()
        if node is None:
            if not v.is_graph_input():
                raise _Refused(f"cos/sin read '{v.name}' from an outer scope")
            inputs.add(v)
            continue
        if node.graph is not graph or node.op_type in _RANDOM or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise _Refused("cos/sin are computed in a subgraph, with a body or by a random op")
        nodes.add(node)
        if len(nodes) > _MAX_NODES:
            raise _Refused(f"cos/sin take more than {_MAX_NODES} nodes to compute")
        stack.extend(node.inputs)
    if len(inputs) != 1:
        names = sorted(v.name or "?" for v in inputs)
        raise _Refused("cos/sin depend on no graph input" if not inputs else
                       f"cos/sin depend on more than one graph input ({', '.join(names)})")
    (position,) = inputs
    if position.dtype != ir.DataType.INT64 or position.shape is None or position.shape.rank() != 2:
        raise _Refused(f"the positions '{position.name}' are not an int64 [batch, seq] input")
    order = {n: i for i, n in enumerate(graph)}
    return sorted(nodes, key=order.__getitem__), position


def _evaluate(run: FusionRun, model: ir.Model, nodes: list[ir.Node], position: ir.Value,
              outputs: tuple[ir.Value, ...], probe: np.ndarray) -> list[np.ndarray]:
    """``outputs`` at positions ``probe`` (ONNX's reference evaluator on the extracted nodes)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    consts = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.producer() not in nodes and v is not position:
                consts[v.name] = run.const(v)
    if any(v is None or not v.name for n in nodes for v in (*n.inputs, *n.outputs) if v is not None):
        raise _Refused("a value of the cos/sin computation has no name")
    graph = helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "rotary_probe",
        [helper.make_tensor_value_info(position.name, onnx.TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in consts.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in model.opset_imports.items()])
    try:
        return [np.asarray(a) for a in ReferenceEvaluator(proto).run(None, {position.name: probe})]
    except Exception as e:  # an op the evaluator lacks, a shape it refuses: not provable
        raise _Refused(f"cos/sin could not be evaluated at probe positions ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _probes() -> list[np.ndarray]:
    """Two rows of small positions, two with large and random ones (fixed seed)."""
    rng = np.random.default_rng(19)
    small = np.arange(16, dtype=np.int64).reshape(2, 8)
    large = np.array([[0, 1, 16, 256, 4096, 32768, MAX_PROBE_POSITION, 3],
                      rng.integers(0, MAX_PROBE_POSITION + 1, size=8)], dtype=np.int64)
    return [small, large]


def fit(run: FusionRun, model: ir.Model, site: Site) -> _Fit:
    """The frequencies and scale of ``site``'s cos/sin (raises :class:`_Refused`)."""
    graph = model.graph
    nodes, position = _closure(run, graph, (site.cos, site.sin))
    x = site.x
    if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or not site.cos.dtype == site.sin.dtype == x.dtype:
        raise _Refused("x, cos and sin are not all float32 or all float16")
    size = x.shape[3]
    positions, cs, ss = [], [], []
    for probe in _probes():
        c, s = _evaluate(run, model, nodes, position, (site.cos, site.sin), probe)
        want = (probe.shape[0], 1, probe.shape[1], size)
        if c.shape != want or s.shape != want:
            raise _Refused(f"cos/sin at positions [{probe.shape[0]}, {probe.shape[1]}] have shape "
                           f"{c.shape} / {s.shape}, not {list(want)} (a [batch, 1, seq, {size}] cos per position)")
        positions.append(probe.reshape(-1))
        cs.append(c[:, 0].reshape(-1, size).astype(np.float64))
        ss.append(s[:, 0].reshape(-1, size).astype(np.float64))
    inv, scale = _frequencies(np.concatenate(positions), np.concatenate(cs), np.concatenate(ss),
                              site.interleaved, x.dtype)
    return _Fit(position, inv, scale, x.dtype, tuple(nodes))


def _frequencies(p: np.ndarray, c: np.ndarray, s: np.ndarray, interleaved: bool,
                 dtype: ir.DataType) -> tuple[np.ndarray, float]:
    half = c.shape[1] // 2
    pick = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, half), slice(half, None))
    layout = "repeat_interleave(f, 2)" if interleaved else "concat(f, f)"
    if not (np.array_equal(c[:, pick[0]], c[:, pick[1]]) and np.array_equal(s[:, pick[0]], s[:, pick[1]])):
        raise _Refused(f"cos/sin are not in the {layout} layout the rotation needs")
    c, s = c[:, pick[0]], s[:, pick[0]]
    at0, at1 = p == 0, p == 1
    scale = float(c[at0][0, 0])
    if not (scale > 0 and np.all(c[at0] == scale) and np.all(s[at0] == 0)):
        raise _Refused("cos/sin at position 0 are not one positive scale and 0")
    est = np.arctan2(s[at1][0], c[at1][0])
    if not np.all(est > 0):
        raise _Refused("a frequency read at position 1 is not positive")
    candidates = [np.float32(est)]
    for direction in (np.inf, -np.inf):
        v = candidates[0]
        for _ in range(4):
            v = np.nextafter(v, np.float32(direction), dtype=np.float32)
            candidates.append(v)
    cand = np.stack(candidates)  # [9, half] float32
    angle = (p.astype(np.float32)[None, :, None] * cand[:, None, :]).astype(np.float64)
    err = np.max(np.abs(scale * np.cos(angle) - c) + np.abs(scale * np.sin(angle) - s), axis=1)
    inv = cand[np.argmin(err, axis=0), np.arange(half)]
    angle = (p.astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)
    rel = 1e-6 if dtype == ir.DataType.FLOAT else 1e-3
    tol = scale * (rel + 2 * np.spacing(np.abs(angle).astype(np.float32)).astype(np.float64))
    if not (np.all(np.abs(scale * np.cos(angle) - c) <= tol) and np.all(np.abs(scale * np.sin(angle) - s) <= tol)):
        raise _Refused(f"cos/sin are not {scale:g} * cos/sin(p * w) for constant frequencies w at the probe "
                       f"positions (0..{MAX_PROBE_POSITION}; frequencies that change with the positions are refused)")
    return inv, scale


# ----------------------------------------------------------------------------- rewrite


def _caches(run: FusionRun, graph: ir.Graph, f: _Fit) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(index, cos, sin): caches with one row per token of the run, [B * S, H/2], and the
    positions that read them, index[b, s] = b * S + s; inserted at the graph's start."""
    nodes: list[ir.Node] = []

    def add(op: str, inputs, **attrs) -> ir.Value:
        node = ir.node(op, list(inputs), attributes=attrs, name=run.fresh_name(f"rotary_cache_{op.lower()}"))
        node.outputs[0].name = run.fresh_name("rotary_cache")
        nodes.append(node)
        return node.outputs[0]

    def const(array: np.ndarray) -> ir.Value:
        return add("Constant", [], value=ir.tensor(array, name=run.fresh_name("rotary_const")))

    count = add("Size", [f.position])
    index = add("Reshape", [add("Range", [const(np.array(0, np.int64)), count, const(np.array(1, np.int64))]),
                            add("Shape", [f.position])])
    column = add("Reshape", [add("Cast", [f.position], to=ir.DataType.FLOAT), const(np.array([-1, 1], np.int64))])
    angle = add("Mul", [column, const(f.inv_freq.astype(np.float32))])
    out = []
    for op in ("Cos", "Sin"):
        v = add(op, [angle])
        if f.scale != 1.0:
            v = add("Mul", [v, const(np.array(f.scale, np.float32))])
        if f.dtype != ir.DataType.FLOAT:
            v = add("Cast", [v], to=f.dtype)
        out.append(v)
    graph.insert_before(next(iter(graph)), nodes)
    return index, out[0], out[1]


Emit = Callable[[FusionRun, ir.Value, ir.Value, ir.Value, ir.Value, bool], ir.Node]


class RotaryRule(GraphRule):
    """Every rotation of the main graph -> the node ``emit(run, x, positions, cos_cache,
    sin_cache, interleaved)`` makes; caches shared by the rotations with the same fit."""

    def __init__(self, run: FusionRun, name: str, emit: Emit) -> None:
        super().__init__(run)
        self.name = name
        self.emit = emit

    def apply(self, model: ir.Model) -> int:
        self.misses = []
        graph, fired = model.graph, 0
        fits: dict[tuple[ir.Value, ir.Value], _Fit | str] = {}
        caches: dict[tuple, tuple[ir.Value, ir.Value]] = {}

        def site_and_fit(node: ir.Node) -> tuple[Site, _Fit] | None:
            site = match(self.run, node)
            if site is None:
                return None
            key = (site.cos, site.sin)  # one fit (or one refusal) per cos/sin pair
            if key not in fits:
                try:
                    fits[key] = fit(self.run, model, site)
                except _Refused as e:
                    fits[key] = str(e)
            if isinstance(fits[key], str):
                raise _Refused(fits[key])
            return site, fits[key]

        for node in list(graph):
            if node.graph is not graph:
                continue
            found = self.attempt(node, lambda: site_and_fit(node))
            if found is None:
                continue
            site, f = found
            cache_key = (f.position, f.inv_freq.tobytes(), f.scale, f.dtype)
            if cache_key not in caches:
                caches[cache_key] = _caches(self.run, graph, f)
            self._rewrite(graph, site, *caches[cache_key], f.closure)
            fired += 1
        return fired

    def _rewrite(self, graph: ir.Graph, site: Site, position: ir.Value, cos: ir.Value, sin: ir.Value,
                 closure: tuple[ir.Node, ...]) -> None:
        node = self.emit(self.run, site.x, position, cos, sin, site.interleaved)
        graph.insert_before(site.add, node)
        old = site.add.outputs[0]
        new = node.outputs[0]
        new.dtype, new.shape = old.dtype, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        name = old.name
        old.name = None
        new.name = name
        dead = set(site.nodes) | set(closure)
        for n in reversed(list(graph)):
            if n in dead and not any(o.uses() or o.is_graph_output() for o in n.outputs):
                graph.remove(n, safe=True)
