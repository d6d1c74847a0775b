"""Calling ONNX's C++ tools (checker, shape inference) on a model without its weights.

Serializing a model's weights only to hand them to a C++ function that never reads
them costs time and memory, and fails past protobuf's 2 GB. Here every initializer
over ``limit`` bytes becomes, for the duration of the call, a graph input of the same
type and shape (which is all the checker and shape inference need); the model is
restored exactly afterwards, whether the call succeeds or raises.
"""

from __future__ import annotations

__all__ = ["call_without_weights"]

from collections.abc import Callable
from typing import TypeVar

import onnx_ir as ir

_R = TypeVar("_R")


def call_without_weights(func: Callable[[object], _R], model: ir.Model, *, limit: int = 1024) -> _R:
    """``func(model_proto)`` where initializers over ``limit`` bytes are inputs instead."""
    graph = model.graph
    moved: list[tuple[ir.Value, ir.TensorProtocol, bool]] = []
    inputs_before = len(graph.inputs)
    order = list(graph.initializers)
    try:
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes <= limit:
                continue
            if value.shape is None:
                value.shape = tensor.shape
            if value.dtype is None:
                value.dtype = tensor.dtype
            was_input = value in graph.inputs
            graph.initializers.pop(value.name)
            value.const_value = None
            if not was_input:
                graph.inputs.append(value)
            moved.append((value, tensor, was_input))
        proto = ir.serde.serialize_model(model)
    finally:
        # Restore inputs first (drop the ones appended), then the initializers.
        while len(graph.inputs) > inputs_before:
            graph.inputs.pop()
        for value, tensor, _ in moved:
            value.const_value = tensor
        if moved:
            values = {v.name: v for v in graph.initializers.values()}
            values.update((v.name, v) for v, _, _ in moved)
            graph.initializers.clear()
            for name in order:
                graph.initializers.add(values[name])
    return func(proto)
