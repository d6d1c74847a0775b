"""Mutations of valid models: drawn by hypothesis, applied deterministically.

A :class:`Case` is a seed name (:mod:`tests.fuzz.seeds`) and a :class:`Mutation`: a
kind and JSON-able parameters drawn by the kind's hypothesis strategy. Parameters that
choose "which node" or "which byte" are plain integers taken modulo the number of
candidates, so :func:`materialize` turns a case into the same bytes every time, and a
case is reproducible from its JSON alone (``Case.from_dict``).

Kinds (:data:`KINDS`, in a fixed order), by what they attack:

- the file: ``flip_bytes``, ``truncate`` (serialized bytes, optionally with junk appended);
- the graph: ``remove_node``, ``duplicate_node``, ``dangling_input``, ``cycle``;
- types and shapes: ``elem_type``, ``value_info_shape``;
- attributes and constants: ``attr_wrong_type``, ``attr_missing``, ``attr_huge_int``,
  ``attr_bad_axis`` (out of range, repeated, on ops without one), ``bad_int_constant``
  (an element of a shape, axes, indices or trip count; integer inputs made constants);
- the model header: ``opset`` (missing default domain, versions 0/999/negative,
  duplicates, functions' opsets, ``ir_version``);
- subgraphs: ``subgraph_junk`` (nodes removed from If/Loop/Scan bodies, wrong numbers
  of outputs or inputs, references to values out of scope);
- resources: ``deep_nesting`` (If in If, Loop in Loop, function call chains and
  recursion, up to 500 deep; built as bytes, past protobuf's own nesting limit),
  ``long_loop`` (a valid Loop with a huge trip count or none, its condition staying
  true), ``huge_constant`` (ConstantOfShape [10^6, 10^6], Expand/Tile to 2^40 elements,
  Range of 10^12, as a graph output or unused);
- ``stacked``: two or three graph-level mutations in a row.

Node-level mutations reach every scope: the main graph, If/Loop/Scan bodies at any
depth, and model-local functions.

:func:`draw_cases` collects cases from the strategies with hypothesis (seeded, no
database, generation only), the kinds interleaved so every kind gets its share.
"""

from __future__ import annotations

__all__ = [
    "KINDS",
    "SYNTHETIC_SEED",
    "Case",
    "Kind",
    "Mutation",
    "NotApplicable",
    "case_strategy",
    "draw_cases",
    "materialize",
]

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from tests.fuzz.seeds import (
    INT_CONSTANT_SEEDS,
    LOCAL_DOMAIN,
    SEED_NAMES,
    SUBGRAPH_SEEDS,
    seed_bytes,
    seed_model,
)

SYNTHETIC_SEED = "synthetic"  # the seed of kinds that build their own model

# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Mutation:
    kind: str
    params: dict[str, Any] = field(hash=False)  # JSON-able: ints, strings, booleans, lists


@dataclass(frozen=True)
class Case:
    index: int
    seed: str
    mutation: Mutation

    @property
    def kind(self) -> str:
        return self.mutation.kind

    @property
    def label(self) -> str:
        """A short name, usable in file names: ``00042-remove_node-cnn``."""
        return f"{self.index:05d}-{self.kind}-{self.seed.replace(':', '_')}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "kind": self.kind, "params": self.mutation.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Case:
        return cls(int(d.get("index", 0)), d["seed"], Mutation(d["kind"], d["params"]))


class NotApplicable(Exception):
    """The seed has nothing this mutation can change (the case runs the seed unchanged)."""


# --------------------------------------------------------------------------- walking a model

Scope = onnx.GraphProto | onnx.FunctionProto


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _graph_tree(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graph_tree(sub)


def _scopes(model: onnx.ModelProto) -> list[Scope]:
    """Main graph, every nested subgraph, every function and the subgraphs in functions."""
    scopes: list[Scope] = list(_graph_tree(model.graph))
    for function in model.functions:
        scopes.append(function)
        for node in function.node:
            for sub in _subgraphs(node):
                scopes.extend(_graph_tree(sub))
    return scopes


def _nodes(model: onnx.ModelProto, where: Callable[[onnx.NodeProto], bool] = lambda n: True) -> list[tuple[Scope, int]]:
    return [(s, i) for s in _scopes(model) for i, n in enumerate(s.node) if where(n)]


def _pick(items, k: int, what: str):
    if not items:
        raise NotApplicable(f"no {what}")
    return items[int(k) % len(items)]


def _where(scope: Scope) -> str:
    if isinstance(scope, onnx.FunctionProto):
        return f"function {scope.domain}.{scope.name}"
    return f"graph '{scope.name}'"


def _label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "")
    return f"{node.op_type} '{name}'"


def _set_nodes(scope: Scope, nodes: list[onnx.NodeProto]) -> None:
    copies = [_copy(n) for n in nodes]
    del scope.node[:]
    scope.node.extend(copies)


def _copy(message):
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


def _value_infos(model: onnx.ModelProto, target: str) -> list[onnx.ValueInfoProto]:
    g = model.graph
    if target == "input":
        return list(g.input)
    if target == "output":
        return list(g.output)
    if target == "value_info":
        return list(g.value_info) or list(g.output)
    # subgraph_io: inputs and outputs of nested graphs (else the main graph's outputs)
    subs = [v for sub in _graph_tree(g) if sub is not g for v in (*sub.input, *sub.output)]
    return subs or list(g.output)


# --------------------------------------------------------------------------- byte level

def flip_bytes(data: bytes, p: dict) -> tuple[bytes, str]:
    buf = bytearray(data)
    span = min(len(buf), 2048) if p["region"] == "head" else len(buf)
    positions = []
    for pos, xor in p["flips"]:
        i = int(pos) % span
        buf[i] ^= int(xor)
        positions.append(i)
    return bytes(buf), f"xor'd {len(positions)} byte(s) at {sorted(positions)[:8]} of {len(buf)}"


def truncate(data: bytes, p: dict) -> tuple[bytes, str]:
    n, at = len(data), int(p["at"])
    cut = {"head": at % min(n, 512), "tail": n - 1 - at % min(n, 64), "anywhere": at % n}[p["region"]]
    junk = bytes(p["append"])
    extra = f", {len(junk)} junk byte(s) appended" if junk else ""
    return data[:cut] + junk, f"truncated to {cut} of {n} bytes{extra}"


# --------------------------------------------------------------------------- graph level

def remove_node(model: onnx.ModelProto, p: dict) -> str:
    done = []
    for step in range(p["count"]):
        scope, i = _pick(_nodes(model), p["node"] + 7919 * step, "nodes")
        done.append(f"{_label(scope.node[i])} from {_where(scope)}")
        del scope.node[i]
    return "removed " + "; ".join(done)


def duplicate_node(model: onnx.ModelProto, p: dict) -> str:
    scope, i = _pick(_nodes(model), p["node"], "nodes")
    nodes = list(scope.node)
    dup = _copy(nodes[i])
    if p["rename"]:
        for k, out in enumerate(dup.output):
            if out:
                dup.output[k] = f"{out}__dup"
        if dup.name:
            dup.name += "__dup"
    at = {"after": i + 1, "start": 0, "end": len(nodes)}[p["position"]]
    nodes.insert(at, dup)
    _set_nodes(scope, nodes)
    renamed = " (outputs renamed)" if p["rename"] else ""
    return f"duplicated {_label(dup)} in {_where(scope)} at {p['position']}{renamed}"


def dangling_input(model: onnx.ModelProto, p: dict) -> str:
    if p["how"] == "graph_output":
        out = _pick(model.graph.output, p["input"], "graph outputs")
        old, out.name = out.name, "fuzz_missing_out"
        return f"graph output '{old}' renamed to a name nothing produces"
    scope, i = _pick(_nodes(model), p["node"], "nodes")
    node = scope.node[i]
    name = "" if p["how"] == "empty" else "fuzz_missing"
    if not node.input:
        node.input.append(name)
        return f"{_label(node)} in {_where(scope)}: input '{name}' appended"
    k = int(p["input"]) % len(node.input)
    old, node.input[k] = node.input[k], name
    return f"{_label(node)} in {_where(scope)}: input {k} '{old}' -> '{name}'"


def cycle(model: onnx.ModelProto, p: dict) -> str:
    scope, i = _pick(_nodes(model, lambda n: len(n.output) > 0), p["a"], "nodes with outputs")
    nodes = scope.node
    a = nodes[i]
    if p["how"] == "self":
        _set_input(a, 0, a.output[0])
        return f"{_label(a)} in {_where(scope)} consumes its own output"
    if p["how"] == "long":
        first, last = nodes[0], nodes[len(nodes) - 1]
        if not last.output:
            raise NotApplicable("last node has no outputs")
        _set_input(first, 0, last.output[0])
        return f"first node {_label(first)} consumes the last node's output in {_where(scope)}"
    j = int(p["b"]) % len(nodes)
    if j == i:
        j = (i + 1) % len(nodes)
    b = nodes[j]
    if j == i or not b.output:
        raise NotApplicable("no second node with outputs in the scope")
    _set_input(a, int(p["b"]), b.output[0])
    _set_input(b, int(p["a"]), a.output[0])
    return f"{_label(a)} and {_label(b)} in {_where(scope)} consume each other's outputs"


def _set_input(node: onnx.NodeProto, k: int, name: str) -> None:
    if node.input:
        node.input[k % len(node.input)] = name
    else:
        node.input.append(name)


# --------------------------------------------------------------------------- types and shapes

def elem_type(model: onnx.ModelProto, p: dict) -> str:
    if p["target"] == "initializer":
        inits = [t for g in _graph_tree(model.graph) for t in g.initializer]
        t = _pick(inits, p["pick"], "initializers")
        old, t.data_type = t.data_type, p["elem_type"]
        return f"initializer '{t.name}' data_type {old} -> {p['elem_type']} (data unchanged)"
    v = _pick(_value_infos(model, p["target"]), p["pick"], f"{p['target']} value infos")
    form = p["form"]
    if form == "clear":
        v.ClearField("type")
        return f"{p['target']} '{v.name}': type removed"
    if form in ("sequence", "optional"):
        inner = _copy(v.type)
        wrapped = onnx.TypeProto()
        (wrapped.sequence_type if form == "sequence" else wrapped.optional_type).elem_type.CopyFrom(inner)
        v.type.CopyFrom(wrapped)
        return f"{p['target']} '{v.name}': tensor type wrapped in a {form}"
    old = v.type.tensor_type.elem_type
    v.type.tensor_type.elem_type = p["elem_type"]
    return f"{p['target']} '{v.name}': elem_type {old} -> {p['elem_type']}"


def value_info_shape(model: onnx.ModelProto, p: dict) -> str:
    how, value = p["how"], p["value"]
    if p["target"] == "annotate":  # a value_info for an intermediate value, with a wrong shape
        scope, i = _pick(_nodes(model, lambda n: bool(n.output) and bool(n.output[0])), p["pick"], "node outputs")
        name = scope.node[i].output[0]
        graph = scope if isinstance(scope, onnx.GraphProto) else model.graph
        graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [value, 3]))
        return f"value_info for '{name}' in {_where(graph)}: float [{value}, 3]"
    v = _pick(_value_infos(model, p["target"]), p["pick"], f"{p['target']} value infos")
    if not v.type.HasField("tensor_type"):
        raise NotApplicable(f"'{v.name}' is not a tensor")
    tt = v.type.tensor_type
    dims = tt.shape.dim
    if how == "scalar":
        tt.shape.CopyFrom(onnx.TensorShapeProto())
        return f"'{v.name}': shape made a scalar"
    if how == "add_dim" or not dims:
        tt.shape.dim.add().dim_value = value
        return f"'{v.name}': dim {value} appended"
    k = int(p["dim"]) % len(dims)
    if how == "drop_dim":
        del dims[k]
        return f"'{v.name}': dim {k} dropped"
    dims[k].Clear()
    if how == "param":
        dims[k].dim_param = p["param"]
        return f"'{v.name}': dim {k} -> '{p['param']}'"
    dims[k].dim_value = value
    return f"'{v.name}': dim {k} -> {value}"


# --------------------------------------------------------------------------- attributes and constants

_ATTR_VALUES: dict[str, Callable[[AttributeProto], None]] = {
    "float": lambda a: (setattr(a, "f", 1.5), setattr(a, "type", AttributeProto.FLOAT)),
    "int": lambda a: (setattr(a, "i", 3), setattr(a, "type", AttributeProto.INT)),
    "string": lambda a: (setattr(a, "s", b"junk"), setattr(a, "type", AttributeProto.STRING)),
    "ints": lambda a: (a.ints.extend([1, -1]), setattr(a, "type", AttributeProto.INTS)),
    "floats": lambda a: (a.floats.extend([0.5]), setattr(a, "type", AttributeProto.FLOATS)),
    "strings": lambda a: (a.strings.extend([b"x"]), setattr(a, "type", AttributeProto.STRINGS)),
    "tensor": lambda a: (a.t.CopyFrom(numpy_helper.from_array(np.float32(2.0))),
                         setattr(a, "type", AttributeProto.TENSOR)),
    "graph": lambda a: (a.g.CopyFrom(helper.make_graph([], "junk", [], [])), setattr(a, "type", AttributeProto.GRAPH)),
}


def attr_wrong_type(model: onnx.ModelProto, p: dict) -> str:
    scope, i = _pick(_nodes(model, lambda n: len(n.attribute) > 0), p["node"], "nodes with attributes")
    node = scope.node[i]
    a = node.attribute[int(p["attr"]) % len(node.attribute)]
    if p["how"] == "tag":  # the type tag says one thing, the value field another
        old, a.type = a.type, p["tag"]
        return f"{_label(node)} attribute '{a.name}': type tag {old} -> {p['tag']} (value kept)"
    fresh = AttributeProto(name=a.name)
    _ATTR_VALUES[p["to"]](fresh)
    a.CopyFrom(fresh)
    return f"{_label(node)} attribute '{a.name}' replaced by a {p['to']}"


def attr_missing(model: onnx.ModelProto, p: dict) -> str:
    scope, i = _pick(_nodes(model, lambda n: len(n.attribute) > 0), p["node"], "nodes with attributes")
    node = scope.node[i]
    if p["all"]:
        names = [a.name for a in node.attribute]
        del node.attribute[:]
        return f"{_label(node)} in {_where(scope)}: all attributes removed {names}"
    k = int(p["attr"]) % len(node.attribute)
    name = node.attribute[k].name
    del node.attribute[k]
    return f"{_label(node)} in {_where(scope)}: attribute '{name}' removed"


def attr_huge_int(model: onnx.ModelProto, p: dict) -> str:
    ints = (AttributeProto.INT, AttributeProto.INTS)
    candidates = [(s, i, k) for s, i in _nodes(model) for k, a in enumerate(s.node[i].attribute) if a.type in ints]
    scope, i, k = _pick(candidates, p["node"], "int attributes")
    node = scope.node[i]
    a = node.attribute[k]
    if a.type == AttributeProto.INT:
        a.i = p["value"]
    elif a.ints:
        a.ints[int(p["elem"]) % len(a.ints)] = p["value"]
    else:
        a.ints.append(p["value"])
    return f"{_label(node)} in {_where(scope)}: attribute '{a.name}' gets {p['value']}"


_AXIS_ATTRS = ("axis", "axes", "perm")


def attr_bad_axis(model: onnx.ModelProto, p: dict) -> str:
    value = p["value"]
    candidates = [(s, i) for s, i in _nodes(model) if any(a.name in _AXIS_ATTRS for a in s.node[i].attribute)]
    if p["how"] == "add" or not candidates:
        scope, i = _pick(_nodes(model), p["node"], "nodes")
        node = scope.node[i]
        for a in node.attribute:
            if a.name == "axis":
                a.i = value
                break
        else:
            node.attribute.append(helper.make_attribute("axis", value))
        return f"{_label(node)} in {_where(scope)}: axis={value} set/added"
    scope, i = _pick(candidates, p["node"], "nodes with axis attributes")
    node = scope.node[i]
    a = next(a for a in node.attribute if a.name in _AXIS_ATTRS)
    if a.type == AttributeProto.INT:
        a.i = value
        return f"{_label(node)} in {_where(scope)}: {a.name}={value}"
    if p["how"] == "dup" and a.ints:
        a.ints.append(a.ints[0])
        return f"{_label(node)} in {_where(scope)}: {a.name} repeats {a.ints[0]}"
    if a.ints:
        a.ints[0] = value
    else:
        a.ints.append(value)
    return f"{_label(node)} in {_where(scope)}: {a.name}[0]={value}"


def bad_int_constant(model: onnx.ModelProto, p: dict) -> str:
    """An element of a small integer constant (a shape, axes, indices, a trip count) set to a bad value.

    Candidates: integer initializers and Constant values of up to 64 elements, and integer
    graph inputs of a static shape, which become initializers (of ones) for the purpose.
    """
    tensors: list[tuple[str, TensorProto]] = []
    for g in _graph_tree(model.graph):
        tensors += [(f"initializer '{t.name}'", t) for t in g.initializer]
    for s, i in _nodes(model, lambda n: n.op_type == "Constant"):
        tensors += [(f"Constant '{s.node[i].output[0]}'", a.t) for a in s.node[i].attribute if a.HasField("t")]
    for k, v in enumerate(model.graph.input):
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if tt.elem_type in (TensorProto.INT64, TensorProto.INT32) and tt.HasField("shape") and min(dims, default=1) > 0:
            ones = np.ones(dims, helper.tensor_dtype_to_np_dtype(tt.elem_type))
            tensors.append((f"input '{v.name}' made a constant (ones)", numpy_helper.from_array(ones, v.name)))
    ints = [(w, t) for w, t in tensors if t.data_type in (TensorProto.INT64, TensorProto.INT32) and 0 < _numel(t) <= 64]
    where, t = _pick(ints, p["pick"], "small integer constants")
    array = numpy_helper.to_array(t).copy()
    flat = array.reshape(-1)
    k = int(p["elem"]) % flat.size
    info = np.iinfo(array.dtype)
    flat[k] = min(max(p["value"], info.min), info.max)
    t.CopyFrom(numpy_helper.from_array(array, t.name))
    if where.startswith("input "):
        inputs = [v for v in model.graph.input if v.name != t.name]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        model.graph.initializer.append(t)
    return f"{where}: element {k} -> {flat[k]}"


def _numel(t: TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


# --------------------------------------------------------------------------- model header

def opset(model: onnx.ModelProto, p: dict) -> str:
    how, version = p["how"], p["version"]
    if how == "ir_version":
        old, model.ir_version = model.ir_version, version
        return f"ir_version {old} -> {version}"
    holders = [model] if not how.startswith("function") else list(model.functions)
    if not holders:
        raise NotApplicable("no functions")
    done = []
    for holder in holders:
        imports = holder.opset_import
        default = [k for k, o in enumerate(imports) if o.domain in ("", "ai.onnx")]
        if how in ("drop_default", "function_drop_default"):
            for k in reversed(default):
                del imports[k]
            done.append("default domain import removed")
        elif how == "drop_other":
            others = [k for k, o in enumerate(imports) if o.domain not in ("", "ai.onnx")]
            if not others:
                raise NotApplicable("no non-default opset imports")
            for k in reversed(others):
                del imports[k]
            done.append("non-default domain imports removed")
        elif how == "duplicate_default":
            imports.append(helper.make_opsetid("", version))
            done.append(f"second default import, version {version}")
        else:  # set_default, function_version
            for k in default:
                imports[k].version = version
            done.append(f"default domain version -> {version}")
    where = "model" if holders == [model] else f"{len(holders)} function(s)"
    return f"{where}: " + "; ".join(sorted(set(done)))


# --------------------------------------------------------------------------- subgraphs

def subgraph_junk(model: onnx.ModelProto, p: dict) -> str:
    holders = _nodes(model, lambda n: any(True for _ in _subgraphs(n)))
    scope, i = _pick(holders, p["node"], "nodes with subgraphs")
    node = scope.node[i]
    graphs = list(_subgraphs(node))
    g = graphs[int(p["graph"]) % len(graphs)]
    how, k = p["how"], int(p["pick"])
    what = f"{_label(node)} body '{g.name}'"
    if how == "remove_node":
        n = _pick(g.node, k, "nodes in the body")
        desc = _label(n)
        del g.node[k % len(g.node)]
        return f"{what}: removed {desc}"
    if how == "clear_nodes":
        del g.node[:]
        return f"{what}: all nodes removed"
    if how == "drop_output":
        _pick(g.output, k, "body outputs")
        del g.output[k % len(g.output)]
        return f"{what}: an output dropped"
    if how == "extra_output":
        out = g.output.add()
        if len(g.output) > 1:
            out.CopyFrom(g.output[k % (len(g.output) - 1)])
        else:
            out.CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
        if k % 2:
            out.name = "fuzz_extra_out"
        return f"{what}: extra output '{out.name}'"
    if how == "drop_input":
        _pick(g.input, k, "body inputs")
        del g.input[k % len(g.input)]
        return f"{what}: an input dropped"
    if how == "extra_input":
        g.input.append(helper.make_tensor_value_info("fuzz_extra_in", TensorProto.FLOAT, [1]))
        return f"{what}: extra input"
    if how == "node_extra_output":
        node.output.append(f"{node.output[0] if node.output else 'n'}_fuzz_extra")
        return f"{_label(node)}: one output more than its body has"
    if how == "node_drop_output":
        _pick(node.output, k, "node outputs")
        del node.output[len(node.output) - 1]
        return f"{_label(node)}: last output dropped"
    if how == "rename_output":
        out = _pick(g.output, k, "body outputs")
        out.name = "fuzz_nowhere"
        return f"{what}: output renamed to a name nothing produces"
    if how == "later_ref":  # a body reads a value its parent scope defines only after the node
        later = [o for n in list(scope.node)[i + 1:] for o in n.output if o]
        ref = _pick(later, k, "values defined after the node")
        target = _pick(g.node, k, "nodes in the body")
        _set_input(target, 0, ref)
        return f"{what}: {_label(target)} reads '{ref}', defined later in {_where(scope)}"
    # sibling_ref: a body reads a value only another body of the same node defines
    others = [o for other in graphs if other is not g for n in other.node for o in n.output if o]
    ref = _pick(others, k, "values in a sibling body")
    target = _pick(g.node, k, "nodes in the body")
    _set_input(target, 0, ref)
    return f"{what}: {_label(target)} reads '{ref}' from a sibling body"


# --------------------------------------------------------------------------- resources

def _vi(name, dtype=TensorProto.FLOAT, shape=(2,)):
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _with_graph_attr(node: onnx.NodeProto, name: str, graph: bytes) -> bytes:
    """``node`` serialized with one more GRAPH attribute whose value is already serialized.

    Nesting is spliced as bytes: protobuf's Python API refuses to build messages deeper
    than its parse limit (100), and deep models are what this kind is about.
    """
    attr = _field(1, name.encode()) + _field(6, graph) + _varint(20 << 3) + _varint(AttributeProto.GRAPH)
    return node.SerializeToString() + _field(5, attr)  # NodeProto.attribute = 5


def _graph_bytes(graph: onnx.GraphProto, *extra_nodes: bytes) -> bytes:
    return graph.SerializeToString() + b"".join(_field(1, n) for n in extra_nodes)  # GraphProto.node = 1


def deep_nesting(_: None, p: dict) -> tuple[bytes, str]:
    structure, depth = p["structure"], p["depth"]
    inputs, inits, pre, functions = [_vi("x")], [], [], []
    opsets = [helper.make_opsetid("", 17)]
    if structure == "if":
        if p["cond"] == "input":
            inputs.append(_vi("c", TensorProto.BOOL, ()))
        else:
            pre.append(helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.bool_(True))))
        inner = helper.make_graph([helper.make_node("Neg", ["x"], [f"v{depth}"])], f"g{depth}", [], [_vi(f"v{depth}")])
        inner_bytes = inner.SerializeToString()
        for k in reversed(range(depth)):
            other = helper.make_graph([helper.make_node("Identity", ["x"], [f"e{k}"])], f"e{k}", [], [_vi(f"e{k}")])
            node = _with_graph_attr(
                helper.make_node("If", ["c"], [f"v{k}"], else_branch=other), "then_branch", inner_bytes
            )
            if k:
                inner_bytes = _graph_bytes(helper.make_graph([], f"g{k}", [], [_vi(f"v{k}")]), node)
        top = node
    elif structure == "loop":
        inits.append(numpy_helper.from_array(np.int64(1), "trips"))
        body_bytes = None
        for k in reversed(range(depth)):
            body = helper.make_graph(
                [helper.make_node("Identity", [f"c{k}"], [f"d{k}"])], f"loop{k}",
                [_vi(f"i{k}", TensorProto.INT64, ()), _vi(f"c{k}", TensorProto.BOOL, ()), _vi(f"a{k}")],
                [_vi(f"d{k}", TensorProto.BOOL, ()), _vi(f"b{k}")],
            )
            if body_bytes is None:
                body.node.append(helper.make_node("Neg", [f"a{k}"], [f"b{k}"]))
                body_bytes = body.SerializeToString()
            else:
                loop = _with_graph_attr(helper.make_node("Loop", ["trips", "", f"a{k}"], [f"b{k}"]), "body", body_bytes)
                body_bytes = _graph_bytes(body, loop)
        top = _with_graph_attr(helper.make_node("Loop", ["trips", "", "x"], ["v0"]), "body", body_bytes)
    else:  # function_chain: f0 -> f1 -> ... -> Neg; function_recursive: f0 -> f1 -> ... -> f0
        opsets.append(helper.make_opsetid(LOCAL_DOMAIN, 1))
        n = depth if structure == "function_chain" else min(depth, 3)
        for k in range(n):
            if structure == "function_chain" and k == n - 1:
                inner_node = helper.make_node("Neg", ["X"], ["Y"])
            else:
                inner_node = helper.make_node(f"f{(k + 1) % n}", ["X"], ["Y"], domain=LOCAL_DOMAIN)
            functions.append(helper.make_function(LOCAL_DOMAIN, f"f{k}", ["X"], ["Y"], [inner_node], opsets))
        top = helper.make_node("f0", ["x"], ["v0"], domain=LOCAL_DOMAIN).SerializeToString()
    graph = _graph_bytes(helper.make_graph(pre, "deep", inputs, [_vi("v0")], inits), top)
    model = helper.make_model(onnx.GraphProto(), opset_imports=opsets, functions=functions, producer_name="gcomp.fuzz")
    model.ir_version = 10
    model.ClearField("graph")
    data = model.SerializeToString() + _field(7, graph)  # ModelProto.graph = 7
    return data, f"{structure} nested {depth} deep" + (f" (cond {p['cond']})" if structure == "if" else "")


def long_loop(_: None, p: dict) -> tuple[bytes, str]:
    """A valid Loop that runs (nearly) forever: a huge trip count or none, a condition that
    stays true (a constant, passed through, computed as ``i < 2**62``, or a graph input),
    with or without a scan output that grows every iteration."""
    trip, cond = p["trip"], p["cond"]
    inits = [numpy_helper.from_array(np.int64(2**62), "big")]
    inputs = [_vi("x", shape=(3,))]
    if trip != "none":
        inits.append(numpy_helper.from_array(np.int64(trip), "M"))
    if cond == "input":
        inputs.append(_vi("c", TensorProto.BOOL, ()))
    else:
        inits.append(numpy_helper.from_array(np.bool_(True), "c"))
    body_cond = {
        "constant": helper.make_node("Constant", [], ["cond_out"], value=numpy_helper.from_array(np.bool_(True))),
        "computed": helper.make_node("Less", ["i", "big"], ["cond_out"]),
    }.get(cond, helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    nodes = [body_cond, helper.make_node("Add", ["acc_in", "x"], ["acc_out"])]
    outs = [_vi("cond_out", TensorProto.BOOL, ()), _vi("acc_out", shape=(3,))]
    graph_outs = [_vi("final", shape=(3,))]
    if p["scan_output"]:
        nodes.append(helper.make_node("Mul", ["acc_out", "acc_out"], ["sq"]))
        outs.append(_vi("sq", shape=(3,)))
        graph_outs.append(_vi("stacked", shape=("n", 3)))
    body = helper.make_graph(nodes, "body", [_vi("i", TensorProto.INT64, ()), _vi("cond_in", TensorProto.BOOL, ()),
                                             _vi("acc_in", shape=(3,))], outs)
    loop = helper.make_node("Loop", ["M" if trip != "none" else "", "c", "x"], [o.name for o in graph_outs], body=body)
    graph = helper.make_graph([loop], "long_loop", inputs, graph_outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gcomp.fuzz")
    model.ir_version = 10
    scan = ", stacking a scan output" if p["scan_output"] else ""
    return model.SerializeToString(), f"Loop with trip count {trip}, condition {cond}{scan}"


_HUGE_DTYPES = {"float": (TensorProto.FLOAT, np.float32), "int64": (TensorProto.INT64, np.int64)}


def huge_constant(model: onnx.ModelProto, p: dict) -> str:
    op, shape, used = p["op"], list(p["shape"]), p["used"]
    dtype, np_dtype = _HUGE_DTYPES[p["dtype"]]
    g = model.graph
    names = {"shape": "fuzz_huge_shape", "out": "fuzz_huge"}
    if op == "ConstantOfShape":
        g.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), names["shape"]))
        node = helper.make_node("ConstantOfShape", [names["shape"]], [names["out"]],
                                value=numpy_helper.from_array(np.ones(1, np_dtype)))
    elif op in ("Expand", "Tile"):
        base = np.ones([1] * len(shape), np_dtype) if op == "Tile" else np.ones((), np_dtype)
        g.initializer.append(numpy_helper.from_array(base, "fuzz_huge_base"))
        g.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), names["shape"]))
        node = helper.make_node(op, ["fuzz_huge_base", names["shape"]], [names["out"]])
    else:  # Range with int(prod(shape)) elements
        count = int(np.prod(np.array(shape, dtype=object)))
        for name, v in (("start", 0), ("limit", count), ("delta", 1)):
            g.initializer.append(numpy_helper.from_array(np.array(v, np_dtype), f"fuzz_huge_{name}"))
        node = helper.make_node("Range", ["fuzz_huge_start", "fuzz_huge_limit", "fuzz_huge_delta"], [names["out"]])
    g.node.append(node)
    if used:  # the checker wants a shape on graph outputs: the huge one
        out_shape = [int(np.prod(np.array(shape, dtype=object)))] if op == "Range" else shape
        g.output.append(helper.make_tensor_value_info(names["out"], dtype, out_shape))
    return f"{op} of {shape} ({p['dtype']}) added" + (" as a graph output" if used else ", unused")


# --------------------------------------------------------------------------- stacked

def stacked(model: onnx.ModelProto, p: dict) -> str:
    done = []
    for step in p["steps"]:
        try:
            done.append(KINDS[step["kind"]].apply(model, step["params"]))
        except NotApplicable as e:
            done.append(f"({step['kind']} not applicable: {e})")
    return " | ".join(done)


# --------------------------------------------------------------------------- kinds and strategies

@dataclass(frozen=True)
class Kind:
    name: str
    level: str  # "bytes": apply(data, params) -> (bytes, desc); "proto": apply(model, params) -> desc, in
    # place; "synthetic": apply(None, params) -> (bytes, desc), the seed is SYNTHETIC_SEED
    apply: Callable
    params: st.SearchStrategy
    seeds: tuple[str, ...] = SEED_NAMES


_index = st.integers(min_value=0, max_value=2**32)
HUGE_INTS = (2**31 - 1, 2**31, 2**32 + 1, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), -(2**31) - 1, -1, -(2**40))
BAD_AXES = (-1000, -65, -33, -9, -5, -4, -3, -2, 5, 9, 64, 1000, 2**31, -(2**31))
ELEM_TYPES = (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 16, 17, 19, 21, 22, 23, 24, 99, -1, 2**31 - 1)
BAD_INTS = (-1, -2, 0, 1, -1000, 2**31 - 1, 2**31, 2**62, -(2**63), 10**12)
DIM_VALUES = (0, 1, 3, 7, -1, -7, 2**31, 2**62, 10**12)
HUGE_SHAPES = ([10**6, 10**6], [2**20, 2**20], [2**40], [10**12], [2**31, 2**31], [2**33], [2**62])


def _params(**fields) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(fields)


_GRAPH_KINDS: list[Kind] = [
    Kind("remove_node", "proto", remove_node, _params(node=_index, count=st.integers(1, 3))),
    Kind("duplicate_node", "proto", duplicate_node,
         _params(node=_index, rename=st.booleans(), position=st.sampled_from(["after", "start", "end"]))),
    Kind("dangling_input", "proto", dangling_input,
         _params(node=_index, input=_index, how=st.sampled_from(["missing", "empty", "graph_output"]))),
    Kind("cycle", "proto", cycle, _params(a=_index, b=_index, how=st.sampled_from(["pair", "self", "long"]))),
    Kind("elem_type", "proto", elem_type, _params(
        target=st.sampled_from(["input", "output", "value_info", "subgraph_io", "initializer"]), pick=_index,
        elem_type=st.sampled_from(ELEM_TYPES),
        form=st.sampled_from(["elem_type", "elem_type", "clear", "sequence", "optional"]))),
    Kind("value_info_shape", "proto", value_info_shape, _params(
        target=st.sampled_from(["input", "output", "value_info", "subgraph_io", "annotate"]), pick=_index,
        how=st.sampled_from(["set_dim", "add_dim", "drop_dim", "scalar", "param"]), dim=_index,
        value=st.sampled_from(DIM_VALUES), param=st.sampled_from(["", "?", "N", "batch", "a b"]))),
    Kind("attr_wrong_type", "proto", attr_wrong_type, _params(
        node=_index, attr=_index, how=st.sampled_from(["tag", "value"]), tag=st.integers(0, 14),
        to=st.sampled_from(sorted(_ATTR_VALUES)))),
    Kind("attr_missing", "proto", attr_missing, _params(node=_index, attr=_index, all=st.booleans())),
    Kind("attr_huge_int", "proto", attr_huge_int, _params(node=_index, elem=_index, value=st.sampled_from(HUGE_INTS))),
    Kind("attr_bad_axis", "proto", attr_bad_axis,
         _params(node=_index, value=st.sampled_from(BAD_AXES), how=st.sampled_from(["set", "set", "dup", "add"]))),
    Kind("bad_int_constant", "proto", bad_int_constant, _params(
        pick=_index, elem=_index, value=st.sampled_from(BAD_INTS)),
         seeds=INT_CONSTANT_SEEDS),
    Kind("opset", "proto", opset, _params(
        how=st.sampled_from(["drop_default", "set_default", "duplicate_default", "drop_other", "function_drop_default",
                             "function_version", "ir_version"]),
        version=st.sampled_from([0, 1, 3, 6, 999, -1, 2**31]))),
    Kind("subgraph_junk", "proto", subgraph_junk, _params(
        node=_index, graph=_index, pick=_index,
        how=st.sampled_from(["remove_node", "clear_nodes", "drop_output", "extra_output", "drop_input", "extra_input",
                             "node_extra_output", "node_drop_output", "rename_output", "later_ref", "sibling_ref"])),
         seeds=SUBGRAPH_SEEDS),
]

_step = st.one_of([st.builds(lambda params, k=k: {"kind": k.name, "params": params}, k.params) for k in _GRAPH_KINDS])

KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("flip_bytes", "bytes", flip_bytes, _params(
        flips=st.lists(st.tuples(_index, st.integers(1, 255)), min_size=1, max_size=16),
        region=st.sampled_from(["head", "anywhere"]))),
    Kind("truncate", "bytes", truncate, _params(
        at=_index, region=st.sampled_from(["head", "anywhere", "tail"]),
        append=st.one_of(st.just([]), st.lists(st.integers(0, 255), max_size=32)))),
    *_GRAPH_KINDS,
    Kind("deep_nesting", "synthetic", deep_nesting, _params(
        structure=st.sampled_from(["if", "loop", "function_chain", "function_recursive"]),
        depth=st.sampled_from([1, 2, 10, 50, 100, 200, 500]), cond=st.sampled_from(["input", "constant"])),
         seeds=(SYNTHETIC_SEED,)),
    Kind("long_loop", "synthetic", long_loop, _params(
        trip=st.sampled_from(["none", 10**7 + 1, 2**31, 2**62]),
        cond=st.sampled_from(["constant", "identity", "computed", "input"]), scan_output=st.booleans()),
         seeds=(SYNTHETIC_SEED,)),
    Kind("huge_constant", "proto", huge_constant, _params(
        op=st.sampled_from(["ConstantOfShape", "Expand", "Tile", "Range"]), shape=st.sampled_from(HUGE_SHAPES),
        used=st.booleans(), dtype=st.sampled_from(sorted(_HUGE_DTYPES)))),
    Kind("stacked", "proto", stacked, _params(steps=st.lists(_step, min_size=2, max_size=3))),
]}


def case_strategy(kind: str) -> st.SearchStrategy[tuple[str, Mutation]]:
    """(seed name, mutation) pairs of one kind."""
    k = KINDS[kind]
    return st.tuples(st.sampled_from(k.seeds), k.params.map(lambda params: Mutation(kind, params)))


def materialize(case: Case) -> tuple[bytes, str]:
    """The mutated model's bytes and what was done to it; the same case gives the same bytes."""
    kind = KINDS[case.kind]
    params = case.mutation.params
    if kind.level == "synthetic":
        return kind.apply(None, params)
    if kind.level == "bytes":
        return kind.apply(seed_bytes(case.seed), params)
    model = seed_model(case.seed)
    try:
        desc = kind.apply(model, params)
    except NotApplicable as e:
        desc = f"not applicable ({e}): seed unchanged"
    return model.SerializeToString(), desc


def _draw(strategy: st.SearchStrategy, count: int, seed: int) -> list:
    """``count`` examples of ``strategy``, deterministic for a given seed (and hypothesis version)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    drawn: list = []

    @hypothesis_seed(seed)
    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example):
        drawn.append(example)

    collect()
    return drawn


def draw_cases(n: int, seed: int = 0, kinds: list[str] | tuple[str, ...] | None = None) -> list[Case]:
    """``n`` cases, the kinds interleaved (case i has kind ``kinds[i % len(kinds)]``).

    Small parameter spaces (``deep_nesting``) may repeat: hypothesis stops when a space
    is exhausted, and the draws are then cycled.
    """
    kinds = list(kinds or KINDS)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise KeyError(f"unknown mutation kind(s) {unknown}; kinds: {', '.join(KINDS)}")
    per_kind = -(-n // len(kinds))
    pools = {}
    for kind in kinds:
        pools[kind] = _draw(case_strategy(kind), per_kind, zlib.crc32(f"{seed}:{kind}".encode()))
        if not pools[kind]:
            raise RuntimeError(f"hypothesis drew no cases of kind {kind}")
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        seed_name, mutation = pools[kind][(i // len(kinds)) % len(pools[kind])]
        cases.append(Case(i, seed_name, mutation))
    return cases
