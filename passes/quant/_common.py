"""What both quantization passes share: the already-quantized check, reading a layer's
constant weight, the candidate linear layers, the pass skeleton and its report.

Scope: the main graph only. Subgraphs (If/Loop/Scan bodies) and model functions are left
float; the already-quantized check looks at every scope.

The pass skeleton (:class:`QuantPass`): a subclass names its candidates
(:meth:`QuantPass.find`), may refuse one for its representation
(:meth:`QuantPass.refusal`) and rewrites one (:meth:`QuantPass.quantize`); the skeleton
handles ``exclude_nodes``, naming, removal of the float weights nothing reads any more, and
the details every quantization pass reports:

- ``quantized``: ``{node, op_type, weight, bytes_before, bytes_after}`` per node;
- ``skipped``: ``{node, op_type, reason}`` per candidate left float;
- ``weight_bytes_before`` / ``weight_bytes_after``: the float weights touched, and what
  holds them afterwards (new quantized tensors, plus any touched float weight that a node
  left float still reads);
- ``note`` when the model is already quantized (then nothing changes).
"""

from __future__ import annotations

__all__ = ["ORT_DOMAIN", "TARGET_HELP", "Candidate", "Const", "QuantPass", "Workspace", "already_quantized",
           "canonical_gemms", "gemm_refusal", "linear_candidates", "node_label", "read_const", "require_opset"]

import collections
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import OptionError
from gcomp.passes.opsets import model_opset
from gcomp.passes.precision.assign import constant_tensor
from gcomp.passes.result import DetailedResult
from gcomp.passes.rewire import bypass
from gcomp.passes.scopes import all_scopes
from gcomp.registry import Capabilities, PassContext

ORT_DOMAIN = "com.microsoft"
# The target names are defined once, by gcomp.backends (which a pass does not import).
TARGET_HELP = "what the output must run on (a gcomp target: see `gcomp optimize --help`)"
_STANDARD = ("", "ai.onnx")
# Ops that mean a model was quantized already (by gcomp or another tool).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits",
    "GatherBlockQuantized", "QAttention", "QGemm", "MatMulIntegerToFloat",
})
QUANTIZED_PREFIXES = ("QLinear", "DynamicQuantize")


def already_quantized(model: ir.Model) -> str | None:
    """``"already quantized (MatMulNBits x2, ... found)"`` when any scope holds a quantized op."""
    found: collections.Counter = collections.Counter()
    for scope in all_scopes(model):
        for node in scope:
            if node.op_type in QUANTIZED_OPS or node.op_type.startswith(QUANTIZED_PREFIXES):
                found[node.op_type] += 1
    if not found:
        return None
    ops = ", ".join(f"{op} x{count}" for op, count in sorted(found.items()))
    return f"already quantized ({ops} found)"


def node_label(node: ir.Node, index: int) -> str:
    """The node's ONNX name; an unnamed node is called ``<op_type>_<index in the graph>``
    (the same on every copy of the model, so ``exclude_nodes`` can name it)."""
    return node.name or f"{node.op_type}_{index}"


@dataclass
class Const:
    """A constant a node reads: ``value`` (the node's input), ``root`` (the initializer or
    Constant output at the end of any Identity chain) and its contents."""

    value: ir.Value
    root: ir.Value
    array: np.ndarray


def read_const(value: ir.Value | None) -> Const | None:
    """The constant behind ``value`` (an initializer that is not a graph input, a Constant
    node, or either through Identity nodes, as exporters pass tied weights); else None."""
    root = value
    while root is not None:
        tensor = constant_tensor(root)
        if tensor is not None:
            return Const(value, root, tensor.numpy())
        producer = root.producer()
        if producer is None or producer.op_type != "Identity" or producer.domain not in _STANDARD:
            return None
        root = producer.inputs[0]
    return None


@dataclass
class Candidate:
    """One node a quantization pass considers; ``reason`` says why it stays float."""

    node: ir.Node
    name: str
    op_type: str
    activation: ir.Value | None = None
    weight: Const | None = None
    trans_b: bool = False  # Gemm: the weight is stored [N, K]
    bias: ir.Value | None = None
    reason: str | None = None

    @property
    def kn(self) -> tuple[int, int]:
        """The weight's (K, N): K the reduction axis."""
        k, n = self.weight.array.shape
        return (n, k) if self.trans_b else (k, n)

    def weight_kn(self) -> np.ndarray:
        """The weight as a float [K, N] matrix."""
        return self.weight.array.T if self.trans_b else self.weight.array


def linear_candidates(graph: ir.Graph, op_types: Iterable[str]) -> list[Candidate]:
    """MatMul and Gemm nodes of ``graph`` (those in ``op_types``), each with its activation,
    constant weight and bias, or the reason it cannot be quantized whatever the target."""
    wanted = set(op_types)
    found = []
    for index, node in enumerate(graph):
        if node.domain not in _STANDARD or node.op_type not in wanted or node.op_type not in ("MatMul", "Gemm"):
            continue
        c = Candidate(node, node_label(node, index), node.op_type)
        a, b = (node.inputs[:2] + (None, None))[:2]
        c.activation, c.weight = a, read_const(b)
        if node.op_type == "Gemm":
            c.trans_b = bool(_attr(node, "transB", 0))
            c.bias = node.inputs[2] if len(node.inputs) > 2 else None
        c.reason = _linear_refusal(c, read_const(a))
        found.append(c)
    return found


def _linear_refusal(c: Candidate, a_const: Const | None) -> str | None:
    if c.weight is None:
        b = c.node.inputs[1] if len(c.node.inputs) > 1 else None
        if b is not None and b.is_graph_input() and b.const_value is not None:
            return "the weight is an initializer that is also a graph input (a caller may override it)"
        return "the first input is the constant (x @ W expected)" if a_const is not None else \
            "both inputs are activations"
    if a_const is not None:
        return "both inputs are constants (constant folding's work)"
    if c.weight.array.ndim != 2:
        return f"the weight is {c.weight.array.ndim}-D, not a 2-D [K, N] matrix"
    if c.weight.array.dtype != np.float32:
        return f"the weight is {c.weight.array.dtype}, not float32"
    if c.activation is not None and c.activation.dtype not in (None, ir.DataType.FLOAT):
        return f"the activation is {c.activation.dtype.name}, not float32"
    if c.activation is not None and c.activation.shape is not None and c.activation.shape.rank() < 2:
        return "the activation is 1-D (a matrix-vector product)"
    return None


def gemm_refusal(c: Candidate) -> str | None:
    """Why a Gemm cannot become one quantized matmul op ``A @ W + bias``; None if it can."""
    node = c.node
    if _attr(node, "transA", 0):
        return "transA=1 (the activation is transposed)"
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    if alpha != 1.0:
        return f"alpha={alpha:g}, not 1"
    if c.bias is None:
        return None
    if beta != 1.0:
        return f"beta={beta:g} with a bias, not 1"
    bias = read_const(c.bias)
    shape = bias.array.shape if bias is not None else (
        tuple(c.bias.shape.numpy()) if c.bias.shape is not None and c.bias.shape.is_static() else None)
    n = c.kn[1]
    if shape != (n,):
        return f"the bias C has shape {list(shape) if shape is not None else 'unknown'}, not 1-D [N={n}]"
    return None


def canonical_gemms(model: ir.Model, exclude: frozenset[str] = frozenset(), only: set[str] | None = None) -> int:
    """Rewrite each Gemm of the main graph with a constant float32 B (and C, if any) to the form
    quantized matmul ops take, ``A @ B' + C'`` with ``alpha = beta = 1`` and a 1-D ``C'`` of
    ``[N]``: ``B' = alpha * B`` and ``C' = beta * C`` broadcast to ``[N]`` when ``C``'s shape
    allows (``[]``, ``[1]``, ``[1, N]``), as new initializers (the old ones stay for any other
    reader). The same function up to float rounding; exporters and the ONNX test cases write
    these forms, and refusing them left such Gemms float. Returns how many were rewritten;
    Gemms named in ``exclude``, or not in ``only`` when given, are left alone."""
    changed = 0
    for index, node in enumerate(list(model.graph)):
        label = node_label(node, index)
        if node.op_type != "Gemm" or node.domain not in _STANDARD or label in exclude or (
                only is not None and label not in only):
            continue
        plan = _gemm_plan(node)
        if plan is None:
            continue
        weight, bias = plan
        base = node.name or f"Gemm_{index}"
        for slot, array, attr, suffix in ((1, weight, "alpha", "B_scaled"), (2, bias, "beta", "C_canonical")):
            if array is not None:
                old = node.inputs[slot]
                node.replace_input_with(slot, _new_initializer(model, f"{base}_{suffix}", array))
                node.attributes[attr] = ir.AttrFloat32(attr, 1.0)
                if (not old.uses() and old.name in model.graph.initializers and not old.is_graph_input()
                        and not old.is_graph_output()):
                    del model.graph.initializers[old.name]
        changed += 1
    return changed


def _gemm_plan(node: ir.Node) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """(new B or None, new C or None) for :func:`canonical_gemms`; None: nothing to do/possible."""
    b = read_const(node.inputs[1]) if len(node.inputs) > 1 else None
    if b is None or b.array.ndim != 2 or b.array.dtype != np.float32 or _attr(node, "transA", 0):
        return None
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    n = b.array.shape[0] if _attr(node, "transB", 0) else b.array.shape[1]
    weight = (b.array * np.float32(alpha)).astype(np.float32) if alpha != 1.0 else None
    bias = None
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    if c_value is not None:
        c = read_const(c_value)
        if c is None or c.array.dtype != np.float32:
            return (weight, None) if weight is not None and beta == 1.0 else None
        if c.array.shape != (n,) or beta != 1.0:
            if c.array.size not in (1, n) or (c.array.ndim == 2 and c.array.shape[0] != 1) or c.array.ndim > 2:
                return (weight, None) if weight is not None and beta == 1.0 else None
            bias = (np.broadcast_to(c.array.reshape(-1), (n,)) * np.float32(beta)).astype(np.float32)
    if weight is None and bias is None:
        return None
    return weight, bias


def _new_initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    taken = _all_names(model)
    unique, i = name, 0
    while unique in taken:
        i += 1
        unique = f"{name}_{i}"
    value = ir.Value(name=unique, const_value=ir.tensor(np.ascontiguousarray(array), name=unique))
    model.graph.register_initializer(value)
    return value


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


class Workspace:
    """Edits of one graph: fresh names, new initializers (made once per key), removal of
    the float weights nothing reads any more, and the bytes before and after."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self._taken = _all_names(model)
        self._counter = collections.Counter()
        self._made: dict[Any, list[ir.Value]] = {}
        self.touched: dict[int, Const] = {}  # id(value read) -> the float weight

    def fresh(self, base: str) -> str:
        """A name nothing in the model has, made from ``base``."""
        name = base
        while name in self._taken:
            self._counter[base] += 1
            name = f"{base}_{self._counter[base]}"
        self._taken.add(name)
        return name

    def initializers(self, key: Any, arrays: Callable[[], Sequence[tuple[str, np.ndarray]]]) -> list[ir.Value]:
        """New initializers for what ``arrays()`` returns (``(name base, array)`` each), made
        once per ``key`` (two nodes sharing a weight share its quantized form)."""
        if key not in self._made:
            made = []
            for base, array in arrays():
                name = self.fresh(base)
                value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                                 shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
                self.graph.register_initializer(value)
                made.append(value)
            self._made[key] = made
        return self._made[key]

    def node(self, op_type: str, inputs: Sequence[ir.Value | None], name: str, *, domain: str = "",
             attributes: dict[str, Any] | None = None, outputs: int = 1) -> ir.Node:
        """A new node with fresh output names (``name`` is used as given)."""
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # trailing optional inputs left out
            inputs.pop()
        node = ir.node(op_type, inputs, attributes or {}, domain=domain, name=name, num_outputs=outputs)
        for i, out in enumerate(node.outputs):
            out.name = self.fresh(f"{name}_out{i}" if outputs > 1 else f"{name}_out")
        return node

    def replace(self, old: ir.Node, nodes: Sequence[ir.Node]) -> None:
        """Put ``nodes`` where ``old`` was; the last one's output takes over ``old``'s."""
        self.graph.insert_before(old, list(nodes))
        before, after = old.outputs[0], nodes[-1].outputs[0]
        after.type, after.shape = before.type, before.shape
        if not bypass(self.graph, before, after):  # never: the new node is of this graph
            raise RuntimeError(f"cannot rewire the output of {old.name}")
        self.graph.remove(old, safe=True)

    def use_domain(self, domain: str) -> None:
        if domain and domain not in self.model.opset_imports:
            self.model.opset_imports[domain] = 1

    def bytes_made(self, key: Any) -> int:
        return sum(v.const_value.nbytes for v in self._made.get(key, ()))

    def touch(self, weight: Const) -> None:
        """Record a float weight a quantized node no longer reads."""
        self.touched.setdefault(id(weight.value), weight)

    def bytes_touched(self) -> int:
        return sum(w.array.nbytes for w in {id(w.root): w for w in self.touched.values()}.values())

    def remove_unused(self) -> int:
        """Drop the touched float weights (and their Identity chains) nothing reads; returns
        the bytes of touched weights still present (read by nodes left float)."""
        for const in self.touched.values():
            _drop_chain(self.graph, const.value)
        kept = 0
        for const in {id(w.root): w for w in self.touched.values()}.values():
            root, producer = const.root, const.root.producer()
            if (producer is None and root.name in self.graph.initializers) or \
                    (producer is not None and producer.graph is self.graph):
                kept += const.array.nbytes
        return kept

    def bytes_new(self) -> int:
        return sum(v.const_value.nbytes for made in self._made.values() for v in made)


def _drop_chain(graph: ir.Graph, value: ir.Value) -> None:
    """Remove ``value``'s producers (Identity chain, Constant) and initializer while unused."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if producer is None:
            if value.is_initializer() and not value.is_graph_input() and value.name in graph.initializers:
                graph.initializers.pop(value.name)
            return
        if producer.graph is not graph or any(o.uses() or o.is_graph_output() for o in producer.outputs):
            return
        upstream = producer.inputs[0] if producer.op_type == "Identity" else None
        graph.remove(producer, safe=True)
        value = upstream


def _all_names(model: ir.Model) -> set[str]:
    """The names a new main-graph node or value must not take: the main graph's and its
    subgraphs' (names are one namespace there; model functions have their own)."""
    graph = model.graph
    names = {*graph.initializers, *(v.name for v in graph.inputs)}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.add(node.name)
        names.update(v.name for v in (*node.inputs, *node.outputs) if v is not None)
    names.discard(None)
    return names


@dataclass
class _Report:
    quantized: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, c: Candidate, reason: str) -> None:
        self.skipped.append({"node": c.name, "op_type": c.op_type, "reason": reason})


class QuantPass(ir.passes.InPlacePass):
    """The skeleton both quantization passes share (see the module docstring)."""

    def __init__(self, *, target: str, exclude_nodes: Sequence[str], context: PassContext | None) -> None:
        super().__init__()
        self.target = target
        self.exclude_nodes = frozenset(exclude_nodes)
        self.context = context

    # -- what a subclass defines
    def find(self, model: ir.Model) -> list[Candidate]:
        raise NotImplementedError

    def refusal(self, c: Candidate) -> str | None:
        """Why this pass's representation cannot take ``c`` (target-specific); None if it can."""
        return None

    def check(self, model: ir.Model, todo: list[Candidate]) -> None:
        """Raise :class:`OptionError` when the model cannot hold the representation at all."""

    def quantize(self, ws: Workspace, c: Candidate) -> Any:
        """Rewrite ``c``; returns the key of the quantized tensors it reads (for the bytes)."""
        raise NotImplementedError

    # -- the skeleton
    def capabilities(self) -> Capabilities | None:
        """The target's capabilities; None for ``portable`` without a context."""
        if self.context is not None:
            return self.context.target(self.target)
        return None if self.target == "portable" else PassContext().target(self.target)

    def call(self, model: ir.Model) -> DetailedResult:
        details: dict[str, Any] = {"target": self.target, "quantized": [], "skipped": [],
                                   "weight_bytes_before": 0, "weight_bytes_after": 0}
        note = already_quantized(model)
        if note:
            details["note"] = note
            return DetailedResult(model, modified=False, details=details)
        gemms = {c.name for c in self.find(model) if c.op_type == "Gemm"} - self.exclude_nodes
        if gemms:  # only this pass's own Gemm candidates (op_types): nothing else is changed
            canonical_gemms(model, frozenset(), only=gemms)
        report, todo = _Report(), []
        for c in self.find(model):
            reason = c.reason or ("in exclude_nodes" if c.name in self.exclude_nodes else self.refusal(c))
            if reason:
                report.skip(c, reason)
            else:
                todo.append(c)
        if todo:
            self.check(model, todo)
        ws = Workspace(model)
        for c in todo:
            if c.activation is not None and c.activation not in c.node.inputs:
                # An earlier candidate's rewrite replaced what this one reads (two linear
                # layers in a row, a bias Add taken into the op before): read the new value.
                c.activation = c.node.inputs[0]
            before = c.weight.array.nbytes
            ws.touch(c.weight)
            key = self.quantize(ws, c)
            report.quantized.append({"node": c.name, "op_type": c.op_type, "weight": c.weight.root.name,
                                     "bytes_before": before, "bytes_after": ws.bytes_made(key)})
        kept = ws.remove_unused()
        details.update(quantized=report.quantized, skipped=report.skipped,
                       weight_bytes_before=ws.bytes_touched(),
                       weight_bytes_after=ws.bytes_new() + kept)
        return DetailedResult(model, modified=bool(todo), details=details)


def require_opset(model: ir.Model, version: int, why: str) -> None:
    """OptionError when the model's default opset is below ``version``."""
    opset = model_opset(model)
    if opset < version:
        raise OptionError(f"{why} needs opset >= {version}, the model has {opset}: add --target-opset {version}")
