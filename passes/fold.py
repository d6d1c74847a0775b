"""Constant folding, with shape folding and size limits.

A node folds when every input is a constant (an initializer that is not a graph
input, a ``Constant`` node's value, or a value folded earlier, outer scopes included)
or when its value follows from static dimensions alone: ``Shape`` and ``Size`` of a
tensor whose dims are known, and ``Gather``/``Slice``/``Concat``/``Unsqueeze``/
``Squeeze``/``Cast`` and integer arithmetic over such shape values, even when other
dims stay symbolic (those are never guessed). Folded values, and ``Constant``
nodes, become initializers of their graph: the main graph's, or the If/Loop/Scan
body's own. In functions and their bodies, and in the bodies of an IR-3 model (whose
initializers must be graph inputs), they stay ``Constant`` nodes
(``gcomp.passes.scopes.initializer_scopes``). A ``Constant`` that is the main graph's
output stays a node (the interface keeps its producer); a body's output may be the
body's own initializer (a Loop body's constant ``cond`` is one).

Evaluation: ONNX's reference evaluator for small work (a fraction of a millisecond per
node), the runtime the pipeline hands the pass (``context.runtime``: ONNX Runtime) for
heavy ops and large inputs; if one fails the other is tried. Without a context (a pass
built by hand), the reference evaluator does all the work.

Refuses, and reports why in ``result.details``:
- non-deterministic ops (Random*, Multinomial, Bernoulli, Dropout that may train),
  control flow (If/Loop/Scan: see the simplify pass), ops outside the standard domain,
  sequence/optional values, dtypes numpy cannot hold natively (bfloat16, float8, 4-bit);
- outputs larger than the node's inputs, unless within ``max_fold_bytes`` (1 KiB by
  default: shape arithmetic folds, ``ConstantOfShape``/``Expand``/``Tile``/``Range``
  producing weights do not): folding must not make the saved model balloon. The limit
  is per node and about growth, so a model of ``ConstantOfShape`` weights keeps its size
  (the ONNX "light" models stay a few KB), while ``Transpose``/``Cast`` of a weight,
  which do not grow it, still fold. Output sizes are known *before* evaluating, from
  ONNX's per-node shape inference with the constant inputs, so nothing big is ever
  allocated; a node whose output size cannot be known is not evaluated.
Scopes: main graph, every If/Loop/Scan body (with outer-scope constants), functions.
"""

from __future__ import annotations

__all__ = ["FoldConstants", "constant_lookup", "standalone_node_proto"]

from collections import Counter
from typing import Annotated

import numpy as np
import onnx_ir as ir

from gcomp.passes.opsets import NON_DETERMINISTIC, model_opset
from gcomp.passes.result import DetailedResult
from gcomp.passes.rewire import bypass, take_interface
from gcomp.passes.scopes import (FreshNames, add_constant, all_scopes, initializer_scopes,
                                 listed_are_constant)
from gcomp.passes.symbolic import SymbolicShapes
from gcomp.registry import PassContext, Runtime, register_pass

# Heavy compute: ONNX Runtime evaluates these (the reference evaluator is pure numpy).
_HEAVY_OPS = frozenset(
    {"Conv", "ConvTranspose", "ConvInteger", "MatMul", "MatMulInteger", "Gemm", "Einsum", "QLinearConv",
     "QLinearMatMul", "LSTM", "GRU", "RNN", "MaxPool", "AveragePool", "LpPool", "Resize", "DeformConv"}
)
# Outputs never larger than their largest input (when shape inference cannot tell).
_SIZE_BOUNDED = frozenset(
    {"Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Shape", "Size",
     "Slice", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil",
     "Round", "Sign", "Not", "Erf", "Softmax", "LogSoftmax", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
     "ReduceProd", "ArgMax", "ArgMin", "NonZero", "Clip", "IsNaN", "IsInf"}
)
_NUMPY_NATIVE = frozenset("biufcUSO?")
_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


@register_pass("fold-constants")
class FoldConstants(ir.passes.InPlacePass):
    """Evaluate nodes whose inputs are constant (or follow from static dims) into constants."""

    def __init__(
        self,
        *,
        max_fold_bytes: Annotated[int, "largest folded output allowed to be bigger than the node's inputs"] = 1024,
        lift_constants: Annotated[bool, "turn Constant nodes into initializers (main graph and its bodies)"] = True,
        context: PassContext | None = None,
    ) -> None:
        super().__init__()
        self.max_fold_bytes = max_fold_bytes
        self.lift_constants = lift_constants
        self.runtime = context.runtime if context is not None else None

    def call(self, model: ir.Model) -> DetailedResult:
        self._model = model
        self._folded: Counter[str] = Counter()
        # Keyed by node: unnamed nodes are many (exporters name few ConstantOfShape nodes).
        self._unfolded: dict[ir.Node, str] = {}
        self._held_back: dict[ir.Node, int] = {}  # bytes each size-refused output would add
        # Partial values of small int tensors computed from shapes: each entry is an int, a
        # token naming a symbolic dim (equal tokens are equal dims), or None (unknown).
        self._shape_values: dict[ir.Value, tuple[list[Dim], bool]] = {}
        self._const = constant_lookup(model)
        self._holders = initializer_scopes(model)  # where a constant becomes an initializer
        self._names = FreshNames(model)
        self._sym = SymbolicShapes(self._const, self._shape_values)
        modified = False
        for scope in all_scopes(model):
            for node in list(scope):
                if node.graph is scope:  # not removed by an earlier fold in this scope
                    self._sym.visit(node)
                    modified |= self._visit(scope, node)
        # A node refused once may fold later in the walk (a shape becomes known): not left.
        self._unfolded = {n: r for n, r in self._unfolded.items() if n.graph is not None}
        reasons = Counter(r.split(":")[0] for r in self._unfolded.values())
        details = {
            "folded": sum(self._folded.values()),
            "folded_by_op": dict(self._folded.most_common()),
            "unfolded": len(self._unfolded),
            "unfolded_by_reason": dict(reasons.most_common()),
            # What folding the size-refused nodes would have added to the file, at least
            # (their consumers might then fold too): what lifting max_fold_bytes costs.
            "unfolded_size_bytes": sum(self._held_back[k] for k in self._unfolded if k in self._held_back),
            "unfolded_nodes": [
                {"node": n.name or f"<{n.op_type}>", "op_type": n.op_type, "reason": r}
                for n, r in list(self._unfolded.items())[:100]
            ],
        }
        return DetailedResult(model, modified=modified, details=details)

    # ------------------------------------------------------------------ per node

    def _visit(self, scope, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Constant":
            return self._lift_constant(scope, node)
        if node.op_type in NON_DETERMINISTIC or _has_subgraph(node):
            return False
        if node.op_type == "Dropout" and not _dropout_is_inference(node):
            return False
        arrays = [None if v is None else self._const(v) for v in node.inputs]
        if all(v is None or a is not None for v, a in zip(node.inputs, arrays)) and node.inputs:
            return self._fold(scope, node, arrays)
        if node.op_type == "Reshape" and self._constant_reshape_target(scope, node, arrays):
            return True
        return self._fold_shape(scope, node, arrays)

    def _constant_reshape_target(self, scope, node: ir.Node, arrays) -> bool:
        """Reshape(x, Concat(..., dim i of x, ...)): a dim copied from x's own dim at the same
        position becomes 0 ("copy this dim"), so the target is constant and the Shape/Gather/
        Concat chain that computed it falls away. Exact: Reshape with allowzero=0 defines 0
        as "the input's dim here"."""
        if arrays[1] is not None or node.attributes.get_int("allowzero", 0):
            return False
        known = self._shape_values.get(node.inputs[1])
        x = node.inputs[0]
        if known is None or known[1] or x is None:
            return False
        target = []
        for i, d in enumerate(known[0]):
            if isinstance(d, int):
                target.append(d)
            elif d is not None and self._sym.token(x, i) == d:
                target.append(0)
            else:
                return False
        if target.count(-1) > 1:
            return False
        name = self._names(f"{node.inputs[1].name or node.name or 'reshape'}_const")
        new = add_constant(scope, np.array(target, dtype=np.int64), name, node, as_initializer=scope in self._holders)
        node.replace_input_with(1, new)
        self._folded["Reshape target"] += 1
        return True

    def _skip(self, node: ir.Node, reason: str) -> bool:
        self._unfolded[node] = reason
        return False

    def _lift_constant(self, scope, node: ir.Node) -> bool:
        if not self.lift_constants or scope not in self._holders:
            return False
        out = node.outputs[0]
        if out.is_graph_output() and scope is self._model.graph:
            return False
        array = self._const(out)
        if array is None:
            return False
        return self._replace(scope, node, [array], count=False)

    def _fold(self, scope, node: ir.Node, arrays: list[np.ndarray | None]) -> bool:
        for a in arrays:
            if a is not None and a.dtype.kind not in _NUMPY_NATIVE:
                return self._skip(node, f"dtype: {a.dtype} inputs are not evaluated")
        in_bytes = sum(a.nbytes for a in arrays if a is not None)
        sizes = _predict_output_bytes(node, arrays, self._model)
        if sizes is None:
            if node.op_type not in _SIZE_BOUNDED:
                return self._skip(node, "size: output size cannot be known before evaluating")
        else:
            out_bytes = sum(sizes)
            if out_bytes > self.max_fold_bytes and out_bytes > in_bytes:
                self._held_back[node] = out_bytes
                return self._skip(
                    node, f"size: output {out_bytes} bytes > max_fold_bytes and > its inputs ({in_bytes} bytes)"
                )
        try:
            heavy = node.op_type in _HEAVY_OPS or in_bytes > (1 << 20)
            results = _evaluate(node, arrays, self._model, heavy=heavy, runtime=self.runtime)
        except _CannotEvaluate as e:
            return self._skip(node, f"evaluator: {e}")
        if sizes is None and sum(r.nbytes for r in results) > max(self.max_fold_bytes, in_bytes):
            return self._skip(node, "size: output larger than allowed")
        return self._replace(scope, node, results)

    def _fold_shape(self, scope, node: ir.Node, arrays) -> bool:
        value = _shape_value(node, arrays, self._shape_values, self._sym)
        if value is None:
            return False
        dims, scalar = value
        out = node.outputs[0]
        if not all(isinstance(d, int) for d in dims):
            self._shape_values[out] = value
            return False
        dtype = out.dtype.numpy() if out.dtype in _INT_TYPES else np.int64
        array = np.array(dims[0] if scalar else dims, dtype=dtype)
        return self._replace(scope, node, [array])

    # ------------------------------------------------------------------ rewiring

    def _replace(self, scope, node: ir.Node, arrays: list[np.ndarray], count: bool = True) -> bool:
        outputs = list(node.outputs)
        if len(arrays) != len(outputs):
            return self._skip(node, "evaluator: wrong number of outputs")
        fixed = []
        for out, array in zip(outputs, arrays):
            if not isinstance(array, np.ndarray):
                return self._skip(node, "type: non-tensor output")
            if out.dtype is not None:
                try:
                    want = np.dtype(out.dtype.numpy())
                except (TypeError, ValueError):
                    want = array.dtype
                if array.dtype != want:
                    if want.kind not in _NUMPY_NATIVE:
                        return self._skip(node, f"dtype: {out.dtype} outputs are not folded")
                    array = array.astype(want)
            if out.shape is not None and out.shape.is_static() and tuple(out.shape.numpy()) != array.shape:
                return self._skip(node, f"shape: evaluated {array.shape} but the graph declares {out.shape}")
            fixed.append(array)
        holds = scope in self._holders
        for out, array in zip(outputs, fixed):
            if not out.uses() and not out.is_graph_output():
                continue
            name = out.name
            if holds and (not out.is_graph_output() or scope is not self._model.graph):
                out.name = None
                new = add_constant(scope, array, name or self._names("folded"), node, as_initializer=True)
                _return_instead(scope, out, new)
                ir.convenience.replace_all_uses_with(out, new)
            else:
                const = ir.node("Constant", inputs=[], attributes={"value": _tensor(array, name=name)},
                                name=_unique_node_name(node, "folded"))
                const.outputs[0].shape = ir.Shape(array.shape)
                const.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
                scope.insert_before(node, const)
                if not bypass(scope, out, const.outputs[0]):
                    scope.remove(const, safe=True)
                    return self._skip(node, "interface: output cannot be replaced")
        if any(o.uses() or o.is_graph_output() for o in node.outputs):
            return False
        scope.remove(node, safe=True)
        if count:
            self._folded[node.op_type] += 1
        return True


def _return_instead(body, old: ir.Value, new: ir.Value) -> None:
    """``new`` (an initializer of ``body``, under ``old``'s name) becomes the body's output
    wherever ``old`` was one: a body may return its own initializer (ONNX Runtime runs it)."""
    for i, value in enumerate(body.outputs):
        if value is old:
            body.outputs[i] = new
            take_interface(old, new)


class _CannotEvaluate(Exception):
    pass


def _tensor(array: np.ndarray, name: str | None = None) -> ir.TensorProtocol:
    """``ir.Tensor`` for numeric arrays (5x cheaper than ``ir.tensor``'s protocol checks)."""
    if array.dtype.kind in "OUS":
        return ir.tensor(array, name=name)
    return ir.Tensor(array, name=name)


def constant_lookup(model: ir.Model):
    """``value -> array | None`` with the model's rule for initializers listed as inputs."""
    ir3 = listed_are_constant(model)
    return lambda value: _constant(value, inputs_are_constant=ir3)


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _dropout_is_inference(node: ir.Node) -> bool:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    training = _constant(node.inputs[2], inputs_are_constant=False)
    return training is not None and not bool(np.asarray(training).any())


def _constant(value: ir.Value, *, inputs_are_constant: bool = False) -> np.ndarray | None:
    """The value's constant contents, or None when it is not a constant.

    An initializer that is also a graph input is a default a caller may override, so it
    is not a constant, except with ``inputs_are_constant``: in IR version 3 every
    initializer had to be listed as an input, and ONNX Runtime refuses to override them.
    """
    if value.const_value is not None and value.is_initializer() and (inputs_are_constant or not value.is_graph_input()):
        return _to_numpy(value.const_value)
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
        return None
    for name, attr in producer.attributes.items():
        if attr.is_ref():
            return None
        if name == "value":
            return _to_numpy(attr.as_tensor())
        if name == "value_float":
            return np.array(attr.as_float(), dtype=np.float32)
        if name == "value_floats":
            return np.array(list(attr.as_floats()), dtype=np.float32)
        if name == "value_int":
            return np.array(attr.as_int(), dtype=np.int64)
        if name == "value_ints":
            return np.array(list(attr.as_ints()), dtype=np.int64)
        if name == "value_string":
            return np.array(attr.as_string(), dtype=object)
        if name == "value_strings":
            return np.array(list(attr.as_strings()), dtype=object)
    return None


def _to_numpy(tensor: ir.TensorProtocol) -> np.ndarray | None:
    try:
        return tensor.numpy()
    except Exception:  # unreadable data: not a constant gcomp can use
        return None


def _unique_node_name(node: ir.Node, suffix: str) -> str:
    base = node.name or node.op_type
    return f"{base}_{suffix}"


def standalone_node_proto(node: ir.Node, present: list[bool]):
    """The node as a NodeProto with inputs renamed ``i0, i1, ...`` (``""`` where absent)
    and outputs ``o0, o1, ...``: what ONNX's per-node tools and one-node models need."""
    names = [f"i{i}" if p else "" for i, p in enumerate(present)]
    outs = [f"o{i}" for i in range(len(node.outputs))]
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    proto.name = "standalone"
    return proto, names, outs


def _predict_output_bytes(node: ir.Node, arrays, model: ir.Model) -> list[int] | None:
    """Each output's size in bytes from ONNX per-node shape inference, or None if unknown."""
    import onnx
    from onnx import defs, helper, numpy_helper, shape_inference

    try:
        schema = defs.get_schema(node.op_type, model_opset(model), "")
    except Exception:
        return None
    proto, names, outs = standalone_node_proto(node, [a is not None for a in arrays])
    types, data = {}, {}
    for name, a in zip(names, arrays):
        if a is None:
            continue
        try:
            elem = helper.np_dtype_to_tensor_dtype(a.dtype)
        except Exception:
            return None
        types[name] = helper.make_tensor_type_proto(elem, list(a.shape))
        if a.size <= 4096 and a.dtype.kind in "biuf":
            data[name] = numpy_helper.from_array(a, name)
    try:
        inferred = shape_inference.infer_node_outputs(schema, proto, types, data)
    except Exception:
        return None
    sizes = []
    for out in outs:
        t = inferred.get(out)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        count = 1
        for d in t.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                return None
            count *= d.dim_value
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type).itemsize
        except Exception:
            itemsize = 8
        sizes.append(count * itemsize)
    return sizes


def _evaluate(node: ir.Node, arrays, model: ir.Model, heavy: bool, runtime: Runtime | None) -> list[np.ndarray]:
    import onnx
    from onnx import helper

    proto, names, outs = standalone_node_proto(node, [a is not None for a in arrays])
    inputs = []
    feeds = {}
    for name, a in zip(names, arrays):
        if a is None:
            continue
        elem = helper.np_dtype_to_tensor_dtype(a.dtype) if a.dtype != object else onnx.TensorProto.STRING
        inputs.append(helper.make_tensor_value_info(name, elem, list(a.shape)))
        feeds[name] = a
    graph = helper.make_graph([proto], "fold", inputs, [helper.make_empty_tensor_value_info(o) for o in outs])
    fold_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", model_opset(model))])
    fold_model.ir_version = min(model.ir_version or 10, 10)
    engines = [("reference", _run_reference)]
    if runtime is not None:
        # One thread: a folded node is small work, and threads cost more than they give.
        engines.insert(0 if heavy else 1, ("ort", lambda m, f: list(runtime.run(m, f, threads=1).values())))
    errors = []
    for name, engine in engines:
        try:
            results = engine(fold_model, feeds)
        except Exception as e:  # each engine has its gaps; the other may cover them
            errors.append(f"{name}: {' '.join(str(e).split())[:120]}")
            continue
        if all(isinstance(r, np.ndarray) for r in results):
            return [np.asarray(r) for r in results]
        errors.append(f"{name}: non-tensor output")
    raise _CannotEvaluate("; ".join(errors))


def _run_reference(fold_model, feeds) -> list:
    import warnings

    from onnx.reference import ReferenceEvaluator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return ReferenceEvaluator(fold_model).run(None, feeds)


# ---------------------------------------------------------------- shape values


Dim = int | tuple | None  # an entry of a shape value: size, symbolic-dim token, or unknown


def _shape_value(node: ir.Node, arrays, known, sym: SymbolicShapes) -> tuple[list, bool] | None:
    """Partial value (dims, is_scalar) of a 1-D/scalar int tensor computed from shapes.

    Entries are ints, symbolic-dim tokens (see :func:`_dim_token`) or None."""
    op = node.op_type

    def get(i):
        if i >= len(node.inputs) or node.inputs[i] is None:
            return None
        if arrays[i] is not None:
            a = np.asarray(arrays[i])
            if a.dtype.kind not in "iu" or a.ndim > 1:
                return None
            return ([int(x) for x in a.reshape(-1)], a.ndim == 0)
        return known.get(node.inputs[i])

    if op == "Shape":
        dims = sym.dims(node.inputs[0])
        if dims is None:
            return None
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return (list(dims)[slice(start, end)], False)
    if op == "Size":
        x = node.inputs[0]
        if x is None or x.shape is None or not x.shape.is_static():
            return None
        return ([int(np.prod(x.shape.numpy()))], True)
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        data, idx = get(0), arrays[1] if len(arrays) > 1 else None
        if data is None or data[1] or idx is None:
            return None
        idx = np.asarray(idx)
        n = len(data[0])
        try:
            picked = [data[0][int(i)] for i in idx.reshape(-1) if -n <= int(i) < n]
        except (ValueError, TypeError):
            return None
        if len(picked) != idx.size:
            return None
        return (picked, idx.ndim == 0)
    if op == "Slice":
        data = get(0)
        if data is None or data[1] or any(a is None for a in arrays[1:3]):
            return None
        axes = arrays[3] if len(arrays) > 3 and arrays[3] is not None else np.array([0])
        steps = arrays[4] if len(arrays) > 4 and arrays[4] is not None else np.array([1])
        if list(np.asarray(axes).reshape(-1)) not in ([0], [-1]):
            return None
        s, e, st = (int(np.asarray(v).reshape(-1)[0]) for v in (arrays[1], arrays[2], steps))
        if st == 0:
            return None
        return (data[0][s:e:st], False)
    if op == "Concat" and node.attributes.get_int("axis", 0) in (0, -1):
        parts = [get(i) for i in range(len(node.inputs))]
        if any(p is None or p[1] for p in parts):
            return None
        return ([d for p in parts for d in p[0]], False)
    if op == "Unsqueeze":
        data = get(0)
        if data is None or not data[1]:
            return None
        return (data[0], False)
    if op == "Squeeze":
        data = get(0)
        if data is None or data[1] or len(data[0]) != 1:
            return None
        return (data[0], True)
    if op == "Cast":
        to = node.attributes.get_int("to", 0)
        if to not in (int(ir.DataType.INT64), int(ir.DataType.INT32)):
            return None
        return get(0)
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        a, b = get(0), get(1)
        if a is None or b is None:
            return None
        if len(a[0]) != len(b[0]) and 1 not in (len(a[0]), len(b[0])):
            return None
        n = max(len(a[0]), len(b[0]))
        xs = a[0] * n if len(a[0]) == 1 else a[0]
        ys = b[0] * n if len(b[0]) == 1 else b[0]
        out: list[int | None] = []
        for x, y in zip(xs, ys):
            if not isinstance(x, int) or not isinstance(y, int):
                # dim * 1, dim + 0 keep the dim; anything else of a symbolic dim is unknown
                if op == "Mul" and (x == 1 or y == 1):
                    out.append(y if x == 1 else x)
                elif op in ("Add", "Sub") and y == 0:
                    out.append(x)
                else:
                    out.append(None)
            elif op == "Div":  # integer Div truncates toward zero
                out.append(None if y == 0 else (abs(x) // abs(y)) * (1 if (x < 0) == (y < 0) else -1))
            else:
                out.append({"Add": x + y, "Sub": x - y, "Mul": x * y, "Max": max(x, y), "Min": min(x, y)}[op])
        return (out, a[1] and b[1])
    return None
