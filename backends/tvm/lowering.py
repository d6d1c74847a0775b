"""From an ONNX model to a built Relax VM executable, step by step.

1. :func:`bind_input_shapes`: symbolic input dims bound to the shapes asked for (pure IR
   work, in a copy; a shape of the wrong rank is refused).
2. :func:`import_onnx`: ``from_onnx`` (weights become constants), every op's result named
   after its ONNX node, so kernels can be traced back to graph nodes.
3. :func:`fuse`: legalize and fuse (``FuseOps``/``FuseTIR``); 2-D convolutions run
   channels-last on the CPU. Also reads which variables each fused kernel computes.
4. :func:`default_schedules`: every kernel still unscheduled after tuning gets dlight's
   default schedules (GPU rules on ``cuda``, CPU GEMV and reduction rules on ``llvm``).
5. :func:`detach_weights` (``weights="separate"``): the constant tensors ``main`` still
   holds, already folded and laid out as the kernels read them, become parameters after
   the inputs, so ``model.so`` carries code only and the weights travel as a file.
6. :func:`build`: ``tvm.compile`` with the target's Relax lowering passes.

:func:`kernel_calls` lists the kernels ``main`` calls, in order, for the profiler.
"""

from __future__ import annotations

__all__ = ["bind_input_shapes", "build", "default_schedules", "detach_weights", "fuse", "import_onnx",
           "kernel_calls"]

import contextlib
import io as _io
import os
import re
from collections.abc import Mapping

import onnx_ir as ir

from gcomp import io
from gcomp.backends.tvm.diagnostics import first_line, native_stderr_off, warnings_off
from gcomp.backends.tvm.threads import tvm_module
from gcomp.errors import BackendError

_PREFIX = "onnx__"
_CALL_TIR = frozenset({"relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad"})

# 2-D convolutions on the CPU run channels-last with HWIO weights: the output channels are
# then the innermost axis of both the weights and the result, so MetaSchedule vectorizes
# over them with plain loads. Measured on ResNet-18 kernels at 64 trials each (2 cores,
# AVX-512; bench/TVM.md): 3x3 64->64 at 56x56 197 -> 386 GFLOP/s, 3x3 512->512 at 7x7
# 137 -> 226, the 7x7 stem 117 -> 240. (NHWC with OHWI weights was slower than NCHW.)
# The weight transposes fold into the constants; activations are transposed once at
# the model's edges, and the ops between convolutions follow the layout.
_CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def bind_input_shapes(model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None) -> ir.Model:
    """A copy of ``model`` with the given graph inputs' shapes set to ``input_shapes``
    (symbolic dims bound). Refuses (BackendError) a shape of the wrong rank; the original
    is untouched."""
    m = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    shapes = dict(input_shapes or {})
    for value in m.graph.inputs:
        if value.name in shapes:
            want = tuple(int(d) for d in shapes[value.name])
            if value.shape is not None and len(value.shape) != len(want):
                raise BackendError(
                    f"tvm: input '{value.name}' has rank {len(value.shape)}, shape given {list(want)}"
                )
            value.shape = ir.Shape(want)
    return m


def _hint(name: str) -> str:
    return _PREFIX + re.sub(r"\W", "_", name)


def import_onnx(model: ir.Model):
    """Relax module from ``model``, each converted op's result bound to a variable named
    after its ONNX node; returns (module, {variable name: ONNX node name})."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx, onnx_frontend

    proto = onnx.load_from_string(io.serialize(model)) if io.initializer_bytes(model) < (
        io.PROTOBUF_LIMIT_BYTES // 2
    ) else ir.serde.serialize_model(model)
    names: dict[str, str] = {}
    importer = onnx_frontend.ONNXGraphImporter
    original = importer._convert_operator

    def convert(self, op_name, inputs, attr, opset):
        out = original(self, op_name, inputs, attr, opset)
        node = (attr.get("tvm_custom") or {}).get("name")
        if node and isinstance(out, relax.Call):
            with contextlib.suppress(Exception):
                out = self.bb.normalize(out)
                if isinstance(out.ty, relax.TensorType):
                    hint = _hint(node)
                    names[hint] = node
                    out = self.bb.emit(out, name_hint=hint)
        return out

    importer._convert_operator = convert
    try:
        with contextlib.redirect_stdout(_io.StringIO()), warnings_off(), native_stderr_off():
            mod = from_onnx(proto, keep_params_in_input=False)
    except Exception as e:
        raise BackendError(f"tvm: import failed: {first_line(e)}") from None
    finally:
        importer._convert_operator = original
    return mod, names


def fuse(mod, tgt):
    """Legalize and fuse; also returns ``{fused kernel: [variables of its ops, in order]}``
    read between FuseOps and FuseTIR, while fused functions still hold Relax bindings."""
    import tvm
    from tvm import relax

    T = relax.transform
    before = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        T.DecomposeOpsForInference(),
        T.CanonicalizeBindings(),
        *_cpu_layouts(tgt),
        # exp/erf/tanh as vectorizable polynomials instead of scalar libm calls: the
        # erf-GELU kernel of a mini-BERT 43.6 -> 28.7 ms untuned, errors unchanged (2e-6).
        T.FastMathTransform(),
        T.LegalizeOps(),
        T.AnnotateTIROpPattern(),
        T.FoldConstant(),
        T.FuseOps(),
    ]
    try:
        with tgt, contextlib.redirect_stdout(_io.StringIO()), native_stderr_off():
            mod = tvm.transform.Sequential(before)(mod)
            members = _fused_members(mod)
            mod = T.FuseTIR()(mod)
    except Exception as e:
        raise BackendError(f"tvm: lowering failed: {first_line(e)}") from None
    return mod, members


def _cpu_layouts(tgt) -> list:
    from tvm import relax

    if str(tgt.kind.name) != "llvm" or os.environ.get("GCOMP_TVM_LAYOUT", "").upper() == "NCHW":
        return []
    return [relax.transform.ConvertLayout(_CPU_CONV_LAYOUT), relax.transform.Normalize()]


def _main_bindings(mod):
    """The bindings of ``main``'s body, in order."""
    for block in getattr(mod["main"].body, "blocks", []):
        yield from block.bindings


def _fused_members(mod) -> dict[str, list[str]]:
    """``{fused function: its variables}``, plus ``"#sites"``: for every kernel call of
    ``main`` in order (call_tir or a call of a fused function), the variables it computes.
    FuseTIR turns each such call into one call_tir in the same order, so the list lines
    up with :func:`kernel_calls` and a call site names its own ONNX nodes even when
    several sites share one kernel (Q, K, V). Variable names are not unique in Relax
    (``lv6`` twice), hence positions, not names."""
    from tvm import relax
    from tvm.ir import GlobalVar

    members: dict[str, list[str]] = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function) or func.attrs is None or "Primitive" not in func.attrs:
            continue
        names = []
        for block in getattr(func.body, "blocks", []):
            for binding in block.bindings:
                names.append(_name(binding.var))
        members[_name(gvar)] = names
    sites: list[list[str]] = []
    for binding in _main_bindings(mod):
        value = getattr(binding, "value", None)
        if not isinstance(value, relax.Call):
            continue
        if isinstance(value.op, GlobalVar) and _name(value.op) in members:
            sites.append(members[_name(value.op)])
        elif getattr(value.op, "name", None) in _CALL_TIR:
            sites.append([_name(binding.var)])
    members["#sites"] = sites
    return members


def default_schedules(mod, tgt, kind: str):
    """``mod`` with dlight's default schedules on every kernel still unscheduled."""
    from tvm.s_tir import dlight as dl

    if kind == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    else:
        rules = [dl.cpu.GEMV(), dl.cpu.Reduction()]
    try:
        with tgt:
            return dl.ApplyDefaultSchedule(*rules)(mod)
    except Exception as e:
        if kind == "cuda":
            raise BackendError(f"tvm: default GPU schedules failed: {first_line(e)}") from None
        return mod  # CPU kernels run unscheduled (correct, slower)


def detach_weights(mod):
    """``mod`` whose ``main`` takes its constant tensors (two or more elements; scalars
    stay) as parameters after its inputs, and ``[(name, array)]`` of those constants in
    parameter order. Runs after fusion and scheduling, so the weights are the folded,
    re-laid-out ones the kernels read, and tuning records still apply."""
    import tvm
    from tvm import relax

    lifted: list[tuple[object, object]] = []

    @relax.expr_functor.mutator
    class Lift(relax.PyExprMutator):
        def visit_generic_const_(self, op):
            value = getattr(op, "value", None)
            if not hasattr(value, "numpy") or int(value.numpy().size) < 2:
                return op
            for const, var in lifted:
                if const.same_as(op):
                    return var
            var = relax.Var(f"weight_{len(lifted)}", op.ty)
            lifted.append((op, var))
            return var

    func = mod["main"]
    body = Lift().visit_expr(func.body)
    if not lifted:
        return mod, []
    main = relax.Function(list(func.params) + [v for _, v in lifted], body, func.ret_ty, func.is_pure,
                          func.attrs, func.span)
    functions = {gv: (main if gv.name_hint == "main" else f) for gv, f in mod.functions.items()}
    weights = [(_name(var), const.value.numpy()) for const, var in lifted]
    return tvm.IRModule(functions, attrs=mod.attrs), weights


def _lowering(tgt, kind: str):
    import importlib

    import tvm

    b = importlib.import_module(
        "tvm.relax.backend.cuda.pipeline" if kind == "cuda" else "tvm.relax.backend.cpu_generic.pipeline"
    )

    @tvm.transform.module_pass(opt_level=0)
    def lower(mod, _ctx):
        with tgt:
            return tvm.transform.Sequential(b.dataflow_lower_passes(tgt) + b.finalize_passes(tgt))(mod)

    return lower


def build(mod, tgt, kind: str):
    """The Relax VM executable of the scheduled ``mod`` for ``tgt``."""
    tvm = tvm_module()
    try:
        with contextlib.redirect_stdout(_io.StringIO()), native_stderr_off():
            return tvm.compile(mod, target=tgt, relax_pipeline=_lowering(tgt, kind))
    except Exception as e:
        raise BackendError(f"tvm: build for {kind} failed: {first_line(e)}") from None


def kernel_calls(mod) -> list[tuple[str, str]]:
    """(kernel name, result variable) for every ``call_tir`` of ``main``, in call order."""
    from tvm import relax

    if not isinstance(mod["main"].body, relax.SeqExpr):
        return []
    calls = []
    for binding in _main_bindings(mod):
        value = getattr(binding, "value", None)
        if isinstance(value, relax.Call) and getattr(value.op, "name", None) in _CALL_TIR:
            calls.append((_name(value.args[0]), _name(binding.var)))
    return calls


def _name(var) -> str:
    for attr in ("name_hint", "name"):
        value = getattr(var, attr, None)
        if isinstance(value, str):
            return value
    return str(var)
