"""Small helper for building ONNX graphs with onnx-ir, the way an exporter names them.

Every builder in :mod:`models` goes through :class:`GraphBuilder` so that all models
share the same conventions:

* ``ir_version`` 10, default-domain opset 17;
* node names are unique and scoped like the PyTorch exporter's
  (``/encoder/layer.0/attention/self/MatMul``), value names are
  ``<node name>_output_<i>``;
* weights are drawn from a seeded :class:`numpy.random.Generator`, so a builder
  called twice with the same arguments serialises to identical bytes;
* initializers are registered in ``graph.initializers``; graph inputs and outputs
  carry a dtype and a shape (with symbolic dimensions such as ``"batch"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["IR_VERSION", "OPSET", "PRODUCER_NAME", "PRODUCER_VERSION", "GraphBuilder"]

IR_VERSION = 10
OPSET = 17
PRODUCER_NAME = "gcomp.models"
PRODUCER_VERSION = "0.1.0"

Dim = int | str | None


class GraphBuilder:
    """Records nodes and initializers on an :class:`onnx_ir.tape.Tape` with unique names."""

    def __init__(self, name: str, *, seed: int = 0) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.tape = ir.tape.Tape()
        self._inputs: list[ir.Value] = []
        self._node_names: set[str] = set()
        self._value_names: set[str] = set()
        self._scope: list[str] = []

    # ------------------------------------------------------------------ names
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix the names of the nodes created inside the block with ``name``."""
        self._scope.append(name.strip("/"))
        try:
            yield
        finally:
            self._scope.pop()

    @staticmethod
    def _unique(base: str, taken: set[str]) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    def _value_name(self, base: str) -> str:
        return self._unique(base, self._value_names)

    # ------------------------------------------------------------- randomness
    def normal(self, shape: Sequence[int], std: float, mean: float = 0.0) -> np.ndarray:
        return (mean + std * self.rng.standard_normal(tuple(shape))).astype(np.float32)

    def uniform(self, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, tuple(shape)).astype(np.float32)

    # ---------------------------------------------------------------- values
    def input(self, name: str, dtype: ir.DataType, shape: Sequence[Dim]) -> ir.Value:
        value = ir.Value(
            name=self._value_name(name),
            type=ir.TensorType(dtype),
            shape=ir.Shape(list(shape)),
        )
        self._inputs.append(value)
        return value

    def param(self, name: str, array: np.ndarray) -> ir.Value:
        """Register ``array`` as an initializer called ``name``."""
        if name in self._value_names:
            raise ValueError(f"duplicate value name {name!r}")
        self._value_names.add(name)
        return self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name))

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        num_outputs: int = 1,
        output_name: str | None = None,
    ) -> Any:
        """Append one node; returns its output value (or a tuple when ``num_outputs > 1``)."""
        base = "/" + "/".join([*self._scope, name or op_type])
        node_name = self._unique(base, self._node_names)
        outputs = self.tape.op_multi_out(
            op_type, list(inputs), attributes, num_outputs=num_outputs, name=node_name
        )
        for i, value in enumerate(outputs):
            if output_name is not None and num_outputs == 1:
                if output_name in self._value_names:
                    raise ValueError(f"duplicate value name {output_name!r}")
                self._value_names.add(output_name)
                value.name = output_name
            else:
                value.name = self._value_name(f"{node_name}_output_{i}")
        return outputs[0] if num_outputs == 1 else tuple(outputs)

    def const(self, value: Any, dtype: Any = None, *, name: str = "Constant") -> ir.Value:
        """A ``Constant`` node (exporters emit one per use, so duplicates are expected)."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.op("Constant", [], {"value": ir.tensor(array)}, name=name)

    # ----------------------------------------------------------------- model
    def model(
        self,
        outputs: Sequence[tuple[ir.Value, ir.DataType, Sequence[Dim]]],
        *,
        doc_string: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ir.Model:
        """Finish the graph; every output gets the given dtype and shape."""
        graph_outputs = []
        for value, dtype, shape in outputs:
            value.dtype = dtype
            value.shape = ir.Shape(list(shape))
            graph_outputs.append(value)
        graph = ir.Graph(
            inputs=self._inputs,
            outputs=graph_outputs,
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": OPSET},
            name=self.name,
        )
        return ir.Model(
            graph,
            ir_version=IR_VERSION,
            producer_name=PRODUCER_NAME,
            producer_version=PRODUCER_VERSION,
            doc_string=doc_string,
            metadata_props=dict(sorted((metadata or {}).items())),
        )
