"""SmoothQuant-style smoothing for ``quantize-dynamic``: activation outliers moved into the weights.

Math (Xiao et al., 2022, "SmoothQuant"). A linear layer ``Y = X W`` with ``X [..., K]`` (K,
the reduction axis, is X's last axis) and ``W [K, N]``. For any ``s [K]`` with ``s_k > 0``::

    X'[..., k] = X[..., k] / s_k          (X' = X diag(s)^-1)
    W'[k, n]   = s_k * W[k, n]            (W' = diag(s) W)
    (X' W')[..., n] = sum_k (X[..., k] / s_k) (s_k W[k, n]) = sum_k X[..., k] W[k, n] = (X W)[..., n]

so ``X' W' = X W`` exactly in real arithmetic: ``s_k / s_k = 1`` for each ``k`` separately, and
the sum over ``k`` is untouched. In float32 each term gains one rounding from the division and
one from the scaling (relative 2^-24 each), so the float outputs change only by float rounding.

What changes is what quantization sees. ``quantize-dynamic`` quantizes the activation per
tensor (one uint8 step ``a = range / 255`` for all of X): a few channels 50x larger than the
rest set a step that leaves the others a handful of levels. The weight is quantized per output
column, so a row made larger costs it far less. Smoothing moves the outliers from X into W::

    m_k = max over calibration samples and rows of |X[..., k]|
    w_k = max_n |W[k, n]|
    t_k = clip(m_k^alpha / w_k^(1 - alpha), 1e-5, 1e5)     (t_k = 1 where m_k or w_k is 0)
    s_k = max(t_k / median_j t_j, 1)

``t`` is SmoothQuant's scale: with ``s = t``, channel k's maximum becomes
``m_k^(1-alpha) w_k^(1-alpha)`` in X' and ``m_k^alpha w_k^alpha`` in W' (``alpha = 0.5``:
both ``sqrt(m_k w_k)``; a larger alpha moves more of the range into the weights). A factor
common to all ``s_k`` changes nothing (X's per-tensor step and W's per-column steps absorb
it), so dividing by the median only makes the typical channel's ``s_k`` 1. The floor at 1 is
gcomp's: no channel is *amplified*. A channel amplified because calibration saw it small
becomes a new outlier where real inputs are larger: on a 3-layer MLP calibrated on one
generated row (alpha 0.5, every layer smoothed) the unfloored ``t`` took rel-L2 from 0.015
to 0.084, the floored ``s`` to 0.016 (docs/measurements.md). The default ``alpha`` 0.65 (not
SmoothQuant's 0.5) was measured on MiniLM (docs/measurements.md): at 0.5 the FFN
down-projections, whose weight rows have outliers where their activations do, barely shrink
their activation's range and lose accuracy.

Keep or not, per group: the group's output error is simulated in numpy on the calibration
rows kept (up to :data:`MAX_ROWS` per activation, evenly spaced, with each sample's per-channel
range), the activation through ``DynamicQuantizeLinear`` exactly and the weight through the
pass's own int8 quantization, once with ``s`` and once without; ``s`` is kept when the
smoothed rel-L2 error is below :data:`KEEP` (0.8) times the plain one, else the group is left
alone (its reason says so, with both errors).

Groups. Nodes that read the same activation divide it by the same ``s`` (X' is made once), and
nodes that share a weight scale it by the same ``s`` (they keep sharing one int8 copy): a group
is a connected set of candidates linked by shared activations or weights; its ``m_k`` is the
maximum over its activations, its ``w_k`` the maximum over its weights (each in its own
candidate's [K, N] view), so Q, K and V of an attention block share one ``s``.

Where X' comes from, per activation:

- **folded** into X's producer, when that is exact and free: every consumer of X is a node of
  the group (or reads only its shape: Shape, Size), X is not a graph input or output, and the
  producer (its first output is X) is

  - ``LayerNormalization`` (``Y = n * g + b``, so ``Y / s = n * (g / s) + b / s``: scale and
    bias divided) or ``com.microsoft.SkipLayerNormalization`` (gamma and beta divided);
  - ``Mul`` by a constant ``c``: ``c / s``; ``Div`` by a constant ``c``: ``c * s``;
  - ``Add`` of a constant ``c`` whose other input is read by this Add only and can itself be
    folded: ``c / s`` and the fold above it (``(a + c) / s = a / s + c / s``);

  where every constant divided is float32 with X's channels on its last axis (``[..., K]``),
  so no constant changes shape. A scalar constant (GELU's ``* 0.5``) is left alone: ONNX
  Runtime fuses GELU only with its exact scalars, and ``0.5 / s`` would leave its Div, Erf,
  Add and two Muls unfused, which cost about what the fused Gelu and one inserted Mul do
  (docs/measurements.md);
- else by one inserted ``Mul(X, 1/s)`` (``1/s`` one float32 initializer ``[K]`` per group),
  shared by the group's nodes that read X, placed before the first of them.

Calibration: the float model (before any rewrite) runs once per sample on the pass context's
runtime with the activations exposed as outputs. Samples: ``context.calibration``, else one
from ``context.inputs(model, None)``. Without a runtime or samples (or when the model does not
run) nothing is smoothed and :meth:`Smoother.summary` says why.
"""

from __future__ import annotations

__all__ = ["CLIP", "Observed", "Smoother", "fake_quantized", "observe", "simulated_error", "smooth_float",
           "smoothed_candidate", "smoothing_scale"]

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import BackendError, GcompError
from gcomp.passes.quant._calibration import samples_for
from gcomp.passes.quant._common import ORT_DOMAIN, Candidate, Workspace, gemm_refusal, linear_candidates, read_const
from gcomp.registry import PassContext

CLIP = (1e-5, 1e5)
# (domain, op) -> indices of the per-channel affine constants (multiplier, then addend) of output 0
NORMS = {("", "LayerNormalization"): (1, 2), (ORT_DOMAIN, "SkipLayerNormalization"): (2, 3)}
SHAPE_ONLY = frozenset({"Shape", "Size"})  # consumers that read only X's shape
MAX_DEPTH = 4  # Add chains followed upwards
MAX_ROWS = 256  # calibration rows kept per activation (spread over the samples) to simulate with
KEEP = 0.8  # smooth a group only when its simulated error falls below this fraction of the plain one
Edit = tuple[ir.Node, int, np.ndarray]  # (node, input index, the new constant there)
Feeds = Mapping[str, np.ndarray]


def smoothing_scale(m: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """``s_k = clip(m_k^alpha / w_k^(1 - alpha), 1e-5, 1e5)``, 1 where ``m_k`` or ``w_k`` is 0."""
    m, w = np.asarray(m, np.float64), np.asarray(w, np.float64)
    ok = (m > 0) & (w > 0) & np.isfinite(m) & np.isfinite(w)
    safe_m, safe_w = np.where(ok, m, 1.0), np.where(ok, w, 1.0)
    s = np.clip(safe_m ** alpha / safe_w ** (1.0 - alpha), *CLIP)
    s = np.where(ok, s, 1.0)
    return np.maximum(s / np.median(s), 1.0).astype(np.float32)


@dataclass
class Observed:
    """One calibration sample's view of an activation: per-channel extremes and some rows."""

    low: np.ndarray  # [K] min over the sample's rows (finite values)
    high: np.ndarray  # [K] max
    rows: np.ndarray  # [r, K] float32, evenly spaced rows of the sample


@dataclass
class _Group:
    """Candidates that must share one ``s``, and what smoothing them takes."""

    members: list[Candidate]
    scale: np.ndarray | None = None
    reason: str | None = None  # why the group is not smoothed
    folds: dict[str, list[Edit] | None] = field(default_factory=dict)  # activation -> edits (None: a Mul)
    inverse: ir.Value | None = None  # the 1/s initializer, once a Mul needs it
    errors: tuple[float, float] | None = None  # simulated rel-L2 error: (plain, smoothed)

    def activations(self) -> list[ir.Value]:
        return list({c.activation.name: c.activation for c in self.members}.values())


class Smoother:
    """Plans smoothing on the float model (:meth:`plan`), then smooths each candidate as the
    pass rewrites it (:meth:`weight_kn`, :meth:`activation`); see the module docstring."""

    def __init__(self, alpha: float, dequantize: Callable[[np.ndarray], np.ndarray]) -> None:
        self.alpha = float(alpha)
        self.dequantize = dequantize  # a [K, N] weight as the pass quantizes and dequantizes it
        self.note: str | None = "off (smooth=0)" if self.alpha == 0 else None
        self.samples = 0
        self._groups: dict[str, _Group] = {}  # node name -> its group
        self._made: dict[str, tuple[ir.Value, str]] = {}  # activation name -> (X', how)

    # -- planning, on the float model
    def plan(self, model: ir.Model, todo: Sequence[Candidate], context: PassContext | None) -> None:
        """Group ``todo``, calibrate, and choose ``s`` and the route of each activation."""
        if self.note is not None or not todo:
            return
        samples, why = samples_for(model, context)
        self.note = f"off: {why}" if why else None
        if not samples:
            return
        groups = _groups(todo)
        names = [x.name for g in groups for x in g.activations() if x.name]
        try:
            observed = observe(model, context.runtime, samples, names)
        except GcompError as e:
            self.note = f"off: the float model did not run for calibration ({str(e).splitlines()[0]})"
            return
        self.samples = len(samples)
        for g in groups:
            self._plan_group(g, observed)
            self._groups.update({c.name: g for c in g.members})

    def _plan_group(self, g: _Group, observed: Mapping[str, list[Observed]]) -> None:
        """``s`` for the group, kept when it lowers the simulated error enough; and the
        route of each activation (fold or Mul)."""
        g.reason = _unfit(g, observed)
        if g.reason:
            return
        xs = g.activations()
        m = np.max([np.maximum(-o.low, o.high) for x in xs for o in observed[x.name]], axis=0)
        w = np.max([np.abs(c.weight_kn()).max(axis=1) for c in g.members], axis=0)
        scale = smoothing_scale(m, w, self.alpha)
        plain = simulated_error(g.members, observed, np.ones_like(scale), self.dequantize)
        smoothed = simulated_error(g.members, observed, scale, self.dequantize)
        g.errors = (plain, smoothed)
        if not smoothed < KEEP * plain:
            g.reason = (f"no gain on the calibration data (simulated error {plain:.3g} plain, "
                        f"{smoothed:.3g} smoothed)")
            return
        g.scale = scale
        nodes = {id(c.node) for c in g.members}
        g.folds = {x.name: (_fold_edits(x, g.scale) if _only_read_by(x, nodes) else None) for x in xs}

    # -- rewriting, one candidate at a time (in graph order)
    def smoothed(self, c: Candidate) -> bool:
        g = self._groups.get(c.name)
        return g is not None and g.scale is not None

    def weight_kn(self, c: Candidate) -> np.ndarray:
        """The [K, N] weight to quantize: ``diag(s) W`` when ``c`` is smoothed."""
        w = c.weight_kn()
        return (self._groups[c.name].scale[:, None] * w).astype(np.float32) if self.smoothed(c) else w

    def activation(self, ws: Workspace, c: Candidate) -> ir.Value:
        """What ``c`` must read: ``X / s`` (made once per activation), else ``X``."""
        if not self.smoothed(c):
            return c.activation
        x = c.activation
        if x.name not in self._made:
            g = self._groups[c.name]
            edits = g.folds.get(x.name)
            self._made[x.name] = _fold(ws, x, edits) if edits else _insert_mul(ws, g, x, c.node)
        return self._made[x.name][0]

    # -- the report
    def describe(self, node: str) -> dict[str, Any]:
        """``{"smoothed": bool, "smoothing": how, or why not}`` for one quantized node, and
        its group's ``simulated_error`` (plain, smoothed) when it was simulated."""
        g = self._groups.get(node)
        if g is None:
            return {"smoothed": False, "smoothing": self.note or "off"}
        found: dict[str, Any] = {"smoothed": g.scale is not None, "smoothing": f"off: {g.reason}"}
        if g.scale is not None:
            x = next(c.activation for c in g.members if c.name == node)
            found["smoothing"] = self._made.get(x.name, (None, "planned, not applied"))[1]
        if g.errors is not None:
            found["simulated_error"] = {"plain": g.errors[0], "smoothed": g.errors[1]}
        return found

    def summary(self) -> dict[str, Any]:
        groups = {id(g): g for g in self._groups.values()}.values()
        hows = [how for _, how in self._made.values()]
        return {"alpha": self.alpha, "samples": self.samples, "note": self.note,
                "groups": sum(1 for g in groups if g.scale is not None),
                "folded": sum(1 for h in hows if h.startswith("folded")),
                "muls_inserted": sum(1 for h in hows if h.startswith("Mul"))}


def _groups(todo: Sequence[Candidate]) -> list[_Group]:
    """Connected sets of ``todo`` linked by a shared activation or weight (in graph order)."""
    parent = list(range(len(todo)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Any, int] = {}
    for i, c in enumerate(todo):
        for key in (("x", c.activation.name or id(c.activation)), ("w", id(c.weight.root))):
            parent[root(i)] = root(first.setdefault(key, i))
    members: dict[int, list[Candidate]] = {}
    for i, c in enumerate(todo):
        members.setdefault(root(i), []).append(c)
    return [_Group(m) for m in members.values()]


def observe(model: ir.Model, runtime: Any, samples: Sequence[Feeds], names: Sequence[str]) -> dict[str, list[Observed]]:
    """``{name: [Observed per sample]}`` for each named float tensor (graph inputs included)
    of ``model``'s main graph, from one run per sample with them exposed as outputs."""
    probe = model.clone()
    wanted = set(names) - {v.name for v in probe.graph.outputs}
    exposed = [v for node in probe.graph for v in node.outputs if v.name in wanted]
    for v in exposed:
        v.type = v.type or ir.TensorType(ir.DataType.FLOAT)
    probe.graph.outputs.extend(exposed)
    per_sample = max(8, MAX_ROWS // max(1, len(samples)))
    found: dict[str, list[Observed]] = {}
    for feeds in samples:
        try:
            outs = runtime.run(probe, feeds)
        except BackendError as e:
            raise GcompError(str(e)) from None
        for name in names:
            x = np.asarray(feeds[name] if name in feeds else outs.get(name, np.zeros(0)), np.float32)
            if x.ndim and x.size:
                found.setdefault(name, []).append(_observed(x.reshape(-1, x.shape[-1]), per_sample))
    return found


def _observed(x: np.ndarray, rows: int) -> Observed:
    finite = np.isfinite(x)
    low = np.where(finite, x, np.inf).min(axis=0)
    high = np.where(finite, x, -np.inf).max(axis=0)
    picked = np.linspace(0, len(x) - 1, min(rows, len(x))).round().astype(int)
    return Observed(np.minimum(low, 0.0), np.maximum(high, 0.0), np.where(finite[picked], x[picked], 0.0))


def _unfit(g: _Group, observed: Mapping[str, list[Observed]]) -> str | None:
    """Why the group cannot be smoothed whatever its data; None if it can."""
    ks = {c.kn[0] for c in g.members}
    missing = [x.name or "(unnamed)" for x in g.activations() if x.name not in observed]
    if len(ks) != 1:
        return f"its nodes disagree on K ({sorted(ks)})"
    if missing:
        return f"activation {missing[0]} was not measured"
    if any(o.low.shape != (min(ks),) for x in g.activations() for o in observed[x.name]):
        return f"an activation's last axis is not K={min(ks)}"
    return None


def fake_quantized(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``x`` through ONNX ``DynamicQuantizeLinear`` (uint8, range ``[min(low, 0), max(high, 0)]``)
    and back: what the quantized op multiplies."""
    lo, hi = min(low, 0.0), max(high, 0.0)
    a = (hi - lo) / 255.0 if hi > lo else 1.0
    z = np.clip(np.round(-lo / a), 0, 255)
    return ((np.clip(np.round(x / a) + z, 0, 255) - z) * a).astype(np.float32)


def simulated_error(members: Sequence[Candidate], observed: Mapping[str, list[Observed]], s: np.ndarray,
                    dequantize: Callable[[np.ndarray], np.ndarray]) -> float:
    """rel-L2 error ``||Yq - Y|| / ||Y||`` of the members' outputs on the kept calibration rows,
    with activation ``X / s`` quantized per sample (its range from the whole sample) and
    weight ``diag(s) W`` quantized by ``dequantize``."""
    num = den = 0.0
    for c in members:
        w = c.weight_kn()
        wq = dequantize((s[:, None] * w).astype(np.float32))
        for o in observed[c.activation.name]:
            y = o.rows @ w
            yq = fake_quantized(o.rows / s, float((o.low / s).min()), float((o.high / s).max())) @ wq
            num += float(np.sum((yq.astype(np.float64) - y) ** 2))
            den += float(np.sum(y.astype(np.float64) ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _only_read_by(x: ir.Value, nodes: set[int]) -> bool:
    """Whether X can be changed in place: not a graph input or output, and every consumer is
    one of ``nodes`` (ids) or reads only its shape."""
    if x.is_graph_input() or x.is_graph_output() or x.producer() is None:
        return False
    return all(id(u.node) in nodes or (u.node.domain in ("", "ai.onnx") and u.node.op_type in SHAPE_ONLY)
               for u in x.uses())


def _per_channel(const: Any, k: int) -> np.ndarray | None:
    """The constant's array when it is float32 with ``k`` channels on its last axis."""
    if const is None or const.array.dtype != np.float32 or const.array.ndim == 0 or const.array.shape[-1] != k:
        return None
    return const.array


def _fold_edits(x: ir.Value, s: np.ndarray, depth: int = 0) -> list[Edit] | None:
    """The constant edits that make X's producer output ``X / s`` exactly; None if none do."""
    node = x.producer()
    if node is None or depth > MAX_DEPTH or x is not node.outputs[0]:
        return None
    op = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    if op in NORMS:
        return _norm_edits(node, NORMS[op], s)
    if op not in (("", "Mul"), ("", "Div"), ("", "Add")) or len(node.inputs) != 2:
        return None
    found = [(i, _per_channel(read_const(v), len(s))) for i, v in enumerate(node.inputs)]
    found = [(i, c) for i, c in found if c is not None]
    if len(found) != 1:
        return None
    j, c = found[0]
    if op[1] == "Mul":
        return [(node, j, c / s)]
    if op[1] == "Div":
        return [(node, 1, c * s)] if j == 1 else None
    other = node.inputs[1 - j]
    if other is None or other.is_graph_output() or len(other.uses()) != 1:
        return None
    above = _fold_edits(other, s, depth + 1)
    return None if above is None else [(node, j, c / s), *above]


def _norm_edits(node: ir.Node, slots: tuple[int, ...], s: np.ndarray) -> list[Edit] | None:
    """A normalization's scale (required) and bias (if any) divided by ``s``."""
    edits = []
    for n, i in enumerate(slots):
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is None and n > 0:
            continue  # no bias
        c = _per_channel(read_const(value), len(s))
        if c is None:
            return None
        edits.append((node, i, c / s))
    return edits


def _constant(ws: Workspace, base: str, array: np.ndarray) -> ir.Value:
    """A new float32 initializer of ``ws``'s graph (not counted as quantized weight bytes)."""
    name = ws.fresh(base)
    data = np.ascontiguousarray(array, dtype=np.float32)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(data.shape),
                     const_value=ir.tensor(data, name=name))
    ws.graph.register_initializer(value)
    return value


def _fold(ws: Workspace, x: ir.Value, edits: Sequence[Edit]) -> tuple[ir.Value, str]:
    """Apply the edits: X itself now holds ``X / s``. Every value whose contents changed
    gets a new name, so a name shared by the float and the quantized model still means the
    same values (what verification's divergence walk compares)."""
    for node, i, array in edits:
        old = node.inputs[i]
        node.replace_input_with(i, _constant(ws, f"{old.name or node.name}_smooth", array))
        _drop_unused(ws.graph, old)
    nodes = list({id(n): n for n, _, _ in edits}.values())
    for node in nodes:
        node.outputs[0].name = ws.fresh(f"{node.outputs[0].name or node.name}/smoothed")
    return x, "folded into " + ", ".join(f"{n.op_type} '{n.name}'" for n in nodes)


def _insert_mul(ws: Workspace, g: _Group, x: ir.Value, before: ir.Node) -> tuple[ir.Value, str]:
    """``Mul(X, 1/s)`` before ``before`` (the first node of the group that reads X)."""
    if g.inverse is None:
        g.inverse = _constant(ws, f"{g.members[0].name}/smooth_inverse", 1.0 / g.scale)
    mul = ws.node("Mul", [x, g.inverse], ws.fresh(f"{x.name}/smooth"))
    mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
    ws.graph.insert_before(before, mul)
    return mul.outputs[0], f"Mul '{mul.name}' inserted"


def _drop_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove a constant nothing reads any more (an initializer, or a Constant/Identity chain)."""
    while not (value.uses() or value.is_graph_output() or value.is_graph_input()):
        producer = value.producer()
        if producer is None:
            if value.name in graph.initializers and graph.initializers[value.name] is value:
                graph.initializers.pop(value.name)
            return
        if producer.graph is not graph or producer.op_type not in ("Constant", "Identity"):
            return
        graph.remove(producer, safe=True)
        if producer.op_type == "Constant":
            return
        value = producer.inputs[0]


def smooth_float(model: ir.Model, alpha: float, context: PassContext | None,
                 dequantize: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Smoothing alone, in float (no quantization): every MatMul/Gemm ``quantize-dynamic``
    would smooth (``dequantize`` as its weights) reads ``X / s`` and a new float ``diag(s) W``;
    the outputs change only by float rounding. Returns ``{"nodes": {name: describe()},
    **summary()}``."""
    todo = [c for c in linear_candidates(model.graph, ("MatMul", "Gemm"))
            if c.reason is None and (c.op_type != "Gemm" or gemm_refusal(c) is None)]
    smoother = Smoother(alpha, dequantize)
    smoother.plan(model, todo, context)
    ws = Workspace(model)
    for c in todo:
        if smoother.smoothed(c):
            w = smoother.weight_kn(c)
            weight = _constant(ws, f"{c.weight.root.name or c.name}_smoothed", w.T if c.trans_b else w)
            c.node.replace_input_with(0, smoother.activation(ws, c))
            c.node.replace_input_with(1, weight)
            _drop_unused(ws.graph, c.weight.value)
    return {"nodes": {c.name: smoother.describe(c.name) for c in todo}, **smoother.summary()}


def smoothed_candidate(smoother: Smoother, ws: Workspace, c: Candidate) -> Candidate:
    """``c`` reading its smoothed activation (the same ``c`` when it is not smoothed)."""
    x = smoother.activation(ws, c)
    return c if x is c.activation else replace(c, activation=x)
