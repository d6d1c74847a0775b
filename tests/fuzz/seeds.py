"""The valid models that mutations start from, by name.

- ``cnn``, ``transformer``, ``mlp``: the builders of ``models/`` with their defaults;
- ``if_branches``, ``loop_accumulate``, ``scan_cumsum``, ``local_function``,
  ``nested_control``: small hand-made models with If/Loop/Scan subgraphs, outer-scope
  references and a model-local function (with an attribute reference);
- ``node:<name>``: a fixed handful of ONNX's node test models
  (``onnx.backend.test.case.node.collect_testcases``), control flow included.

:func:`seed_bytes` returns a seed's serialized ``ModelProto`` (built once per process);
every seed passes the ONNX checker (``tests/test_fuzz.py`` checks it).
"""

from __future__ import annotations

__all__ = ["INT_CONSTANT_SEEDS", "SEED_NAMES", "SUBGRAPH_SEEDS", "seed_bytes", "seed_model"]

import functools
import threading
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
LOCAL_DOMAIN = "fuzz.local"

BUILDER_SEEDS = ("cnn", "transformer", "mlp")
NODE_TESTS = (
    "test_if",
    "test_loop11",
    "test_scan9_sum",
    "test_range_float_type_positive_delta_expanded",
    "test_layer_normalization_2d_axis0_expanded",
    "test_constantofshape_int_zeros",
    "test_expand_dim_changed",
    "test_gather_0",
    "test_reshape_negative_dim",
    "test_softmax_axis_1",
    "test_split_equal_parts_1d_opset13",
    "test_einsum_transpose",
)


def _model(nodes, inputs, outputs, initializers=(), functions=(), extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "seed", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", OPSET), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions), producer_name="gcomp.fuzz")
    model.ir_version = 10
    return model


def _vi(name, dtype=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _if_branches() -> onnx.ModelProto:
    """y = Relu(If(c, then: x + 1 (a Constant in the branch), else: x * two (outer initializer)))."""
    then_g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["one"], value=_init("one_t", np.float32(1.0))),
            helper.make_node("Add", ["x", "one"], ["t_out"]),
        ],
        "then", [], [_vi("t_out")],
    )
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["e_out"])], "else", [], [_vi("e_out")])
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    return _model(nodes, [_vi("x"), _vi("c", TensorProto.BOOL, ())], [_vi("z")], [_init("two", np.float32(2.0))])


def _loop_accumulate() -> onnx.ModelProto:
    """A Loop of 4 trips adding x (outer scope) to a carried value, with a scan output."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "x"], ["acc_out"]),
            helper.make_node("Mul", ["acc_out", "acc_out"], ["sq"]),
        ],
        "body",
        [_vi("i", TensorProto.INT64, ()), _vi("cond_in", TensorProto.BOOL, ()), _vi("acc_in", shape=(3,))],
        [_vi("cond_out", TensorProto.BOOL, ()), _vi("acc_out", shape=(3,)), _vi("sq", shape=(3,))],
    )
    nodes = [helper.make_node("Loop", ["M", "keep", "x"], ["final", "stacked"], body=body)]
    inits = [_init("M", np.int64(4)), _init("keep", np.bool_(True))]
    return _model(nodes, [_vi("x", shape=(3,))], [_vi("final", shape=(3,)), _vi("stacked", shape=(4, 3))], inits)


def _scan_cumsum() -> onnx.ModelProto:
    """Scan over the rows of xs with a running sum as the state."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body",
        [_vi("s_in", shape=(2,)), _vi("x_t", shape=(2,))],
        [_vi("s_out", shape=(2,)), _vi("y_t", shape=(2,))],
    )
    nodes = [helper.make_node("Scan", ["init", "xs"], ["final", "ys"], body=body, num_scan_inputs=1)]
    return _model(nodes, [_vi("init", shape=(2,)), _vi("xs", shape=(5, 2))],
                  [_vi("final", shape=(2,)), _vi("ys", shape=(5, 2))])


def _scaled_relu() -> onnx.FunctionProto:
    """Model-local function ScaledRelu(X; alpha) = Relu(X * alpha); alpha is an attribute reference."""
    alpha = helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT, ref_attr_name="alpha")
    const = helper.make_node("Constant", [], ["a"])
    const.attribute.append(alpha)
    return helper.make_function(
        LOCAL_DOMAIN, "ScaledRelu", ["X"], ["Y"],
        [const, helper.make_node("Mul", ["X", "a"], ["m"]), helper.make_node("Relu", ["m"], ["Y"])],
        [helper.make_opsetid("", OPSET)], attributes=["alpha"],
    )


def _local_function() -> onnx.ModelProto:
    """Two calls of a model-local function with different attributes, then Add."""
    nodes = [
        helper.make_node("ScaledRelu", ["x"], ["a"], domain=LOCAL_DOMAIN, alpha=0.5),
        helper.make_node("ScaledRelu", ["x"], ["b"], domain=LOCAL_DOMAIN, alpha=2.0),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    return _model(nodes, [_vi("x")], [_vi("y")], functions=[_scaled_relu()],
                  extra_opsets=[helper.make_opsetid(LOCAL_DOMAIN, 1)])


def _nested_control() -> onnx.ModelProto:
    """If(c): then a Loop whose body calls the local function; else a Scan over x's rows."""
    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["lc_in"], ["lc_out"]),
            helper.make_node("ScaledRelu", ["acc_in"], ["acc_out"], domain=LOCAL_DOMAIN, alpha=1.5),
        ],
        "loop_body",
        [_vi("i", TensorProto.INT64, ()), _vi("lc_in", TensorProto.BOOL, ()), _vi("acc_in")],
        [_vi("lc_out", TensorProto.BOOL, ()), _vi("acc_out")],
    )
    then_g = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["t_out"], body=loop_body)], "then", [], [_vi("t_out")]
    )
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "r"], ["s_out"]), helper.make_node("Neg", ["s_out"], ["row_out"])],
        "scan_body",
        [_vi("s_in", shape=(3,)), _vi("r", shape=(3,))],
        [_vi("s_out", shape=(3,)), _vi("row_out", shape=(3,))],
    )
    else_g = helper.make_graph(
        [helper.make_node("Scan", ["zeros", "x"], ["s_final", "e_out"], body=scan_body, num_scan_inputs=1)],
        "else", [], [_vi("e_out")],
    )
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [_init("trips", np.int64(2)), _init("zeros", np.zeros(3, np.float32))]
    return _model(nodes, [_vi("x"), _vi("c", TensorProto.BOOL, ())], [_vi("y")], inits,
                  functions=[_scaled_relu()], extra_opsets=[helper.make_opsetid(LOCAL_DOMAIN, 1)])


HANDMADE = {
    "if_branches": _if_branches,
    "loop_accumulate": _loop_accumulate,
    "scan_cumsum": _scan_cumsum,
    "local_function": _local_function,
    "nested_control": _nested_control,
}

SEED_NAMES: tuple[str, ...] = (*BUILDER_SEEDS, *HANDMADE, *(f"node:{n}" for n in NODE_TESTS))
# Seeds with If/Loop/Scan subgraphs (what the subgraph mutations need).
SUBGRAPH_SEEDS: tuple[str, ...] = (
    "if_branches", "loop_accumulate", "scan_cumsum", "nested_control",
    "node:test_if", "node:test_loop11", "node:test_scan9_sum", "node:test_range_float_type_positive_delta_expanded",
)

# Seeds with small integer constants or static-shape integer inputs (bad_int_constant).
INT_CONSTANT_SEEDS: tuple[str, ...] = (
    "transformer", "loop_accumulate", "nested_control", "node:test_loop11",
    "node:test_layer_normalization_2d_axis0_expanded", "node:test_constantofshape_int_zeros",
    "node:test_expand_dim_changed", "node:test_gather_0", "node:test_reshape_negative_dim",
)

_lock = threading.Lock()


@functools.cache
def _node_test_models() -> dict[str, bytes]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators of some cases warn about overflows
        cases = {c.name: c for c in collect_testcases(None)}
    missing = [n for n in NODE_TESTS if n not in cases]
    if missing:
        raise LookupError(f"ONNX node test models not found in this onnx version: {missing}")
    return {n: cases[n].model.SerializeToString() for n in NODE_TESTS}


@functools.cache
def _build(name: str) -> bytes:
    if name in BUILDER_SEEDS:
        import onnx_ir as ir

        import models

        return ir.to_proto(models.build(name)).SerializeToString()
    if name in HANDMADE:
        return HANDMADE[name]().SerializeToString()
    if name.startswith("node:"):
        return _node_test_models()[name[len("node:"):]]
    raise KeyError(f"unknown seed {name!r}; seeds: {', '.join(SEED_NAMES)}")


def seed_bytes(name: str) -> bytes:
    """The serialized ModelProto of seed ``name`` (cached; safe to call from threads)."""
    with _lock:
        return _build(name)


def seed_model(name: str) -> onnx.ModelProto:
    """A fresh ModelProto of seed ``name``, free to mutate."""
    model = onnx.ModelProto()
    model.ParseFromString(seed_bytes(name))
    return model
