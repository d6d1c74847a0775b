"""Every scope a pass may have to walk, and where a pass may put a new constant.

- :func:`all_scopes`: main graph, subgraphs, functions and their subgraphs.
- :func:`initializer_scopes`: the graphs that may hold initializers. The main graph
  always; its If/Loop/Scan bodies too from IR version 4 on (IR 3 requires every
  initializer to be listed among its graph's inputs, which a body's inputs cannot
  take). Never a function or a graph inside one: functions have no initializers, and
  a function's body must not read the main graph's values.
- :func:`add_constant`: a constant value in a scope, as an initializer where the scope
  may hold one, else as a ``Constant`` node.
- :class:`FreshNames`: value names unused anywhere in the model (every graph and
  function), so a new value never shadows, or is shadowed by, one in another scope.
"""

from __future__ import annotations

__all__ = ["FreshNames", "add_constant", "all_scopes", "initializer_scopes", "listed_are_constant"]

import numpy as np
import onnx_ir as ir


def all_scopes(model: ir.Model) -> list[ir.Graph | ir.Function]:
    """The main graph and all its If/Loop/Scan bodies, then each model function and its bodies."""
    scopes: list[ir.Graph | ir.Function] = list(model.graphs())
    for function in model.functions.values():
        scopes.append(function)
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    scopes.append(attr.as_graph())
                elif attr.type == ir.AttributeType.GRAPHS:
                    scopes.extend(attr.as_graphs())
    return scopes


def listed_are_constant(model: ir.Model) -> bool:
    """True for IR version < 4, where every initializer had to be listed as a graph input and
    is a constant all the same (ONNX Runtime refuses a feed for one); from IR 4 a listed
    initializer is a default a caller may override."""
    return model.ir_version is not None and model.ir_version < 4


def initializer_scopes(model: ir.Model) -> set[ir.Graph]:
    """The graphs of ``model`` that may hold initializers (see the module docstring)."""
    if listed_are_constant(model):
        return {model.graph}
    return {model.graph, *model.graph.subgraphs()}


class FreshNames:
    """``names(base) -> str``: ``base``, or ``base_1``, ``base_2``..., unused in the model.

    The model's names are collected on first use (one walk), then every name handed out
    is remembered."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._used: set[str] | None = None

    def __call__(self, base: str) -> str:
        if self._used is None:
            self._used = _all_names(self._model)
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


def _all_names(model: ir.Model) -> set[str]:
    used: set[str] = set()
    for scope in all_scopes(model):
        values = [*scope.inputs, *scope.outputs]
        if isinstance(scope, ir.Graph):
            used.update(scope.initializers)
        for node in scope:
            values.extend(node.outputs)
        used.update(v.name for v in values if v is not None and v.name)
    return used


def add_constant(
    scope: ir.Graph | ir.Function,
    array: np.ndarray,
    name: str,
    before: ir.Node,
    *,
    as_initializer: bool,
) -> ir.Value:
    """A value holding ``array`` in ``scope``, named ``name`` (the caller makes it unique):
    an initializer when ``as_initializer`` (the scope is one of :func:`initializer_scopes`),
    else the output of a ``Constant`` node inserted before ``before``."""
    tensor = ir.tensor(array, name=name) if array.dtype.kind in "OUS" else ir.Tensor(array, name=name)
    dtype = ir.DataType.from_numpy(array.dtype)
    if as_initializer:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor)
        scope.initializers.add(value)
        return value
    const = ir.node("Constant", inputs=[], attributes={"value": tensor}, name=f"{name}_Constant")
    const.outputs[0].name = name
    const.outputs[0].shape = ir.Shape(array.shape)
    const.outputs[0].type = ir.TensorType(dtype)
    scope.insert_before(before, const)
    return const.outputs[0]
