"""Reading and writing ONNX files: the only module of gcomp that touches model files.

- :func:`load` reads a model into an :class:`onnx_ir.Model` without reading its
  external data (onnx-ir memory-maps it on first use), so models over 2 GB load
  in the time it takes to parse the graph. Every failure is a
  :class:`~gcomp.errors.ModelLoadError` whose message names the file and the problem:
  missing file, a directory, not ONNX, truncated protobuf, checker failure,
  external data that is missing, too short, or outside the model's folder.
  :func:`from_proto` and :func:`from_bytes` give an ``onnx.ModelProto`` or serialized
  bytes the same checks (a proto's tensors must be in memory: it has no folder).
  Models ONNX Runtime runs though the checker or onnx-ir refuse them are repaired as
  they are read (:mod:`gcomp.compat`: an IR-3 model with unlisted initializers is read
  as IR 4; a map-typed tail such as ZipMap is kept aside and attached again wherever
  the model leaves the IR: :func:`save`, :func:`serialize`, :func:`call_without_weights`);
  :func:`load_notes` says what was done, one line each.
- :func:`save` writes atomically: into a temporary folder beside the target, then
  renamed into place, so a failure never leaves a half-written output. It refuses to
  write over the input model or over any data file the model still reads from.
- :func:`call_without_weights` calls ONNX's C++ tools (checker, shape inference) on a
  model without its weights. Serializing weights only to hand them to a C++ function
  that never reads them costs time and memory, and fails past protobuf's 2 GB. Every
  initializer over ``limit`` bytes becomes, for the duration of the call, a graph input
  of the same type and shape (which is all the checker and shape inference need); the
  model is restored exactly afterwards, whether the call succeeds or raises.
"""

from __future__ import annotations

__all__ = [
    "load",
    "from_proto",
    "from_bytes",
    "load_notes",
    "save",
    "check_writable",
    "serialize",
    "external_tensors",
    "external_data_files",
    "initializer_bytes",
    "source_path",
    "call_without_weights",
    "EXTERNAL_DATA_AUTO_BYTES",
    "PROTOBUF_LIMIT_BYTES",
    "MAX_SUBGRAPH_DEPTH",
]

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import onnx_ir as ir

from gcomp import compat
from gcomp.errors import ModelLoadError, ModelSaveError

# A serialized ModelProto cannot exceed 2 GiB; stay clear of it.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Above this many bytes of weights, save() writes external data even if the input had none.
EXTERNAL_DATA_AUTO_BYTES = 1 << 30
# Deeper nesting of subgraphs is refused at load: real models nest a few levels, and
# every recursive walk (checker, IR, passes) would otherwise risk Python's stack.
MAX_SUBGRAPH_DEPTH = 64
# Tensors smaller than this stay inline when writing external data.
EXTERNAL_DATA_MIN_TENSOR_BYTES = 1024

_SOURCE_KEY = "gcomp.source_path"
# In the main graph's meta, which ir.Model.clone() keeps (the model's own meta it drops):
_NOTES_KEY = "gcomp.load_notes"
_TAIL_KEY = "gcomp.map_tail"  # a compat.MapTail: written back by serialize, save, call_without_weights


def load(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load an ONNX model file into onnx-ir, validating it.

    Args:
        path: the ``.onnx`` file. External data is resolved relative to its folder.
        check: run the ONNX checker on the graph (not on external data) and verify
            that every external tensor's file exists, stays inside the model's folder,
            and is long enough.

    Raises:
        ModelLoadError: with a one-line message naming the file and the problem.
    """
    import onnx  # protobuf lives only at this edge
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    if not os.access(p, os.R_OK):
        raise ModelLoadError(f"{p}: permission denied")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(p), format="protobuf", load_external_data=False)  # whatever its suffix
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise _parse_error(p, e) from None
    model = _to_ir(proto, p, owned=True)
    base_dir = p.resolve().parent
    ir.external_data.set_base_dir(model.graph, base_dir)
    _check_external_data(model, p, base_dir)
    if check:
        _check_required_inputs(model, p)
    if check:
        try:
            # By path: the C++ checker reads the file itself (no Python re-serialization of
            # the weights) and resolves external data against the model's folder. A model
            # read as another IR version is checked as read (weights as typed inputs).
            if model.ir_version == proto.ir_version:
                onnx.checker.check_model(str(p))
            else:
                call_without_weights(onnx.checker.check_model, model, limit=0)
        except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{p}: fails the ONNX checker: {_first_line(e)}") from None
    del proto
    model.meta[_SOURCE_KEY] = str(p.resolve())
    return model


def from_proto(proto, *, where: str = "the ModelProto", check: bool = True) -> ir.Model:
    """An ``onnx.ModelProto`` as an :class:`onnx_ir.Model`, checked as :func:`load` checks
    a file. The proto is not modified; its tensors are shared, not copied.

    Refused (one-line :class:`ModelLoadError` starting with ``where``): no graph, subgraphs
    nested too deeply, an empty required input, a checker failure, and tensors whose
    bytes live in external files (a proto has no folder to resolve them against: pass
    the model's path, or ``onnx.load`` it with its data).
    """
    model = _to_ir(proto, where)
    for tensor in external_tensors(model):
        raise ModelLoadError(
            f"{where}: tensor '{tensor.name}' reads external data '{tensor.location}', which a "
            "ModelProto cannot locate: pass the model's path, or load it with its data"
        )
    if check:
        import onnx

        _check_required_inputs(model, where)
        try:  # weights as typed inputs: any size, and no serialization of their bytes
            call_without_weights(onnx.checker.check_model, model)
        except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{where}: fails the ONNX checker: {_first_line(e)}") from None
    return model


def from_bytes(data: bytes, *, where: str = "the model bytes", check: bool = True) -> ir.Model:
    """Serialized ONNX bytes as an :class:`onnx_ir.Model`, checked as :func:`from_proto`."""
    import onnx
    from google.protobuf.message import DecodeError

    if not data:
        raise ModelLoadError(f"{where}: empty, not an ONNX model")
    try:
        proto = onnx.load_from_string(bytes(data))
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise _parse_error(where, e) from None
    return from_proto(proto, where=where, check=check)


def _parse_error(where, e: BaseException) -> ModelLoadError:
    if "MaxDepth" in str(e) or "recursion" in str(e).lower():
        return ModelLoadError(f"{where}: nested too deeply for the protobuf parser (subgraphs within subgraphs)")
    return ModelLoadError(f"{where}: not a valid ONNX protobuf (truncated or corrupt file?): {_first_line(e)}")


def _to_ir(proto, where, *, owned: bool = False) -> ir.Model:
    """The parsed proto in the IR, after the structural checks every source gets, with
    the repairs of :mod:`gcomp.compat` (``owned``: the proto may be changed, else it is
    copied first when a repair changes it)."""
    if proto.ir_version == 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: not an ONNX model (no ir_version or graph)")
    depth = _subgraph_depth(proto)
    if depth > MAX_SUBGRAPH_DEPTH:
        raise ModelLoadError(
            f"{where}: subgraphs nested {depth} deep (gcomp's limit is {MAX_SUBGRAPH_DEPTH})"
        )
    notes = []
    compat.register_runtime_schemas()  # before load() checks it
    legacy = compat.legacy_ir_note(proto)
    tail = None
    if compat.holds_maps(proto):
        if not owned:
            proto = type(proto).FromString(proto.SerializeToString())
        tail = compat.detach_map_tail(proto, str(where))
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx-ir raises assorted types on malformed protos
        raise ModelLoadError(f"{where}: cannot be read into the IR: {_first_line(_root_cause(e))}") from None
    if legacy:
        model.ir_version = compat.LEGACY_IR_REPAIRED
        notes.append(legacy)
    if tail is not None:
        model.graph.meta[_TAIL_KEY] = tail
        notes.append(tail.note())
        _type_boundary(model, tail)
    model.graph.meta[_NOTES_KEY] = notes
    return model


def _type_boundary(model: ir.Model, tail: compat.MapTail) -> None:
    """Give the values the tail reads (now graph outputs) the types ONNX infers for them
    (with the tail attached, so they are inferred where the tail uses them)."""
    import onnx

    untyped = {v.name: v for v in model.graph.outputs if v.name in tail.boundary and v.type is None}
    if not untyped:
        return
    try:
        inferred = call_without_weights(lambda p: onnx.shape_inference.infer_shapes(p, strict_mode=False), model)
    except Exception:  # best effort: an untyped output is still a valid IR value
        return
    for info in inferred.graph.value_info:
        value = untyped.get(info.name)
        if value is not None and info.type.HasField("tensor_type"):
            value.type = ir.serde.deserialize_type_proto_for_type(info.type)
            value.shape = ir.serde.deserialize_type_proto_for_shape(info.type)


def load_notes(model: ir.Model) -> list[str]:
    """What :func:`load` (or :func:`from_proto`) changed to read the model, one line each
    (an IR version repaired, map-typed outputs kept aside): for the user to see."""
    return list(model.graph.meta.get(_NOTES_KEY, ()))


def _subgraph_depth(proto) -> int:
    """How deeply If/Loop/Scan bodies nest (graphs in functions too), without recursion."""
    from onnx import AttributeProto

    deepest = 0
    stack = [(proto.graph, 0)] + [(f, 0) for f in proto.functions]
    while stack:
        graph, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SUBGRAPH_DEPTH:
            break
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    stack.append((attr.g, depth + 1))
                elif attr.type == AttributeProto.GRAPHS:
                    stack.extend((g, depth + 1) for g in attr.graphs)
    return deepest


def _check_required_inputs(model: ir.Model, path: Path) -> None:
    """A required input left empty (``""``) passes the ONNX checker but is not a model:
    written back, the node would lose the input altogether."""
    from onnx import defs

    opsets = dict(model.opset_imports)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    for node in nodes:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain not in ("", "ai.onnx.ml"):
            continue
        try:
            schema = defs.get_schema(node.op_type, opsets.get(domain, opsets.get("ai.onnx", 1)), domain)
        except Exception:
            continue  # unknown ops are the checker's business
        options = defs.OpSchema.FormalParameterOption
        for i, formal in enumerate(schema.inputs):
            if formal.option == options.Optional:
                continue  # may be left empty
            if formal.option == options.Variadic:
                given = list(node.inputs[i:])
                if any(v is None for v in given) or len(node.inputs) < schema.min_input:
                    raise ModelLoadError(
                        f"{path}: node '{node.name or node.op_type}' ({node.op_type}) has an empty "
                        f"or missing value among its inputs '{formal.name}'"
                    )
                break
            if i >= len(node.inputs) or node.inputs[i] is None:
                raise ModelLoadError(
                    f"{path}: node '{node.name or node.op_type}' ({node.op_type}) has no value for "
                    f"its required input '{formal.name}'"
                )


def source_path(model: ir.Model) -> Path | None:
    """The file a model was loaded from by :func:`load`, if any."""
    src = model.meta.get(_SOURCE_KEY)
    return Path(src) if src else None


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every external tensor of the model: initializers of all graphs and subgraphs."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def external_data_files(path: str | os.PathLike) -> set[Path]:
    """The files a model file's tensors name as their external data (resolved, inside its
    folder), read from its graph alone: also for a model whose data is missing or short,
    which :func:`load` refuses. Empty when the file is not a readable ONNX protobuf."""
    import onnx
    from onnx import AttributeProto

    try:
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable: it names no files (load says why)
        return set()
    base = Path(path).resolve().parent
    files: set[Path] = set()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                tensors.extend([attr.t] if attr.type == AttributeProto.TENSOR else [])
                graphs.extend([attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs))
        for tensor in tensors:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if tensor.data_location == onnx.TensorProto.EXTERNAL and location and not os.path.isabs(location):
                target = (base / location).resolve()
                if target.is_relative_to(base):
                    files.add(target)
    return files


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of the initializers of all graphs (no data is read)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                total += tensor.nbytes
    return total


def _check_external_data(model: ir.Model, path: Path, base_dir: Path) -> None:
    sizes: dict[str, int] = {}
    for tensor in external_tensors(model):
        location = str(tensor.location)
        where = f"{path}: tensor '{tensor.name}'"
        if os.path.isabs(location):
            raise ModelLoadError(f"{where}: external data location '{location}' is absolute")
        data_path = (base_dir / location).resolve()
        if not data_path.is_relative_to(base_dir):
            raise ModelLoadError(
                f"{where}: external data location '{location}' escapes the model's folder"
            )
        key = str(data_path)
        if key not in sizes:
            if not data_path.is_file():
                raise ModelLoadError(f"{where}: external data file '{location}' is missing")
            sizes[key] = data_path.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[key]:
            raise ModelLoadError(
                f"{where}: external data file '{location}' is too short "
                f"({sizes[key]} bytes, tensor ends at {end})"
            )


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the model; it is not modified.
        path: the ``.onnx`` file to write. Its external data, when written, goes to
            ``<name>.data`` beside it (tensors under 1 KiB stay inline).
        external_data: ``True`` to write weights as external data, ``False`` to embed
            them, ``None`` (default) to decide: external when the model already reads
            external data or its weights exceed 1 GiB.
        source: the input file, if not recorded by :func:`load`; never overwritten.

    Returns:
        The path written.

    Raises:
        ModelSaveError: the output is the input, would overwrite data the model reads,
            its folder is missing or unwritable, or serialization failed.
    """
    out = Path(path)
    externals = list(external_tensors(model))
    tail = model.graph.meta.get(_TAIL_KEY)
    check_writable(out, source, model)
    out_abs = out.resolve()
    folder = out_abs.parent
    data_name = out.name + ".data"
    data_abs = folder / data_name

    if external_data is None:
        external_data = bool(externals) or initializer_bytes(model) > EXTERNAL_DATA_AUTO_BYTES

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder))
    except OSError as e:
        raise ModelSaveError(f"{out}: cannot write in '{folder}': {e.strerror}") from None
    try:
        if external_data:
            ir.save(
                model,
                tmp / out.name,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_DATA_MIN_TENSOR_BYTES,
            )
        else:
            if externals:
                model = _with_tensors_in_memory(model)
            ir.save(model, tmp / out.name)
        _attach_saved_tail(tmp / out.name, tail)
        with _folder_lock(folder):
            # Two writers of the same output take turns here, so a model file never
            # lands beside the other writer's data file.
            if (tmp / data_name).exists():
                os.replace(tmp / data_name, data_abs)
            os.replace(tmp / out.name, out_abs)
    except ModelSaveError:
        raise
    except Exception as e:
        hint = ""
        if "2GiB" in str(e) or "2 GB" in str(e) or "larger than" in str(e):
            hint = " (over protobuf's 2 GB limit: save with external data)"
        raise ModelSaveError(f"{out}: cannot write model: {_first_line(_root_cause(e))}{hint}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _attach_saved_tail(path: Path, tail: compat.MapTail | None) -> None:
    """Put a map-typed tail kept aside at load back into the file just written (onnx-ir
    writes the rest; its external data, already written beside it, is not read)."""
    if tail is None:
        return
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    compat.attach_map_tail(proto, tail)
    path.write_bytes(proto.SerializeToString())


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive advisory lock on a folder (flock on its descriptor; no lock file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: renames stay atomic one by one
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_writable(
    path: str | os.PathLike, source: str | os.PathLike | None = None, model: ir.Model | None = None
) -> None:
    """Raise :class:`ModelSaveError` unless ``path`` can receive a model safely.

    Refused: the input itself (``source`` or the file ``model`` was loaded from), a
    data file ``model`` still reads weights from, a directory, a missing or
    unwritable folder. Call it before long work so a bad ``-o`` fails fast.
    """
    out = Path(path)
    out_abs = out.resolve()
    data_abs = out_abs.parent / (out.name + ".data")
    sources = {Path(s).resolve() for s in (source, source_path(model) if model else None) if s}
    for src in sources:
        if out_abs == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise ModelSaveError(f"{out}: refusing to write over the input model")
    if model is not None:
        read_from = {Path(t.path).resolve() for t in external_tensors(model)}
        for target in (out_abs, data_abs):
            if target in read_from:
                raise ModelSaveError(
                    f"{out}: refusing to write '{target.name}', the model reads its weights from it"
                )
    if out.is_dir():
        raise ModelSaveError(f"{out}: is a directory")
    folder = out_abs.parent
    if not folder.is_dir():
        raise ModelSaveError(f"{out}: folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelSaveError(f"{out}: folder '{folder}' is not writable")


def _with_tensors_in_memory(model: ir.Model) -> ir.Model:
    """A copy of ``model`` whose external weights are read into memory; ``model`` untouched.

    Not ``onnx_ir.external_data.load_to_model``: it releases each external tensor it reads,
    and the clone shares its tensors with ``model``, whose weights (memory maps) passes may
    still be reading (a quantization pass's numpy views: "cannot close exported pointers")."""
    clone = model.clone()
    for graph in clone.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = _read_in(tensor)
    return clone


def _read_in(tensor: ir.ExternalTensor) -> ir.Tensor:
    """``tensor``'s data copied into memory, leaving ``tensor`` (and its file map) open."""
    return ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)


def serialize(model: ir.Model) -> bytes:
    """The model as ONNX protobuf bytes (weights included), for in-memory runtimes.

    Raises:
        ModelSaveError: the model is too large for one protobuf (over 2 GB).
    """
    if initializer_bytes(model) >= PROTOBUF_LIMIT_BYTES:
        raise ModelSaveError("model weights exceed protobuf's 2 GB limit; use a file with external data")
    tail = model.graph.meta.get(_TAIL_KEY)
    if any(True for _ in external_tensors(model)):
        model = _with_tensors_in_memory(model)
    try:
        proto = ir.serde.serialize_model(model)
        compat.attach_map_tail(proto, tail)
        return proto.SerializeToString()
    except Exception as e:  # e.g. a string field that is not UTF-8, let through by protobuf
        raise ModelSaveError(f"the model cannot be serialized: {_first_line(_root_cause(e))}") from None


_R = TypeVar("_R")


def call_without_weights(func: Callable[[object], _R], model: ir.Model, *, limit: int = 1024) -> _R:
    """``func(model_proto)`` where initializers over ``limit`` bytes are inputs instead (and
    smaller ones kept in an external data file are read in).

    The model is restored exactly afterwards (inputs, initializers and their order), also
    when serializing raises; ``func`` runs on the proto after the model is restored. The
    proto is the whole model: a map-typed tail kept aside at load is attached.
    """
    compat.register_runtime_schemas()  # func may be ONNX's checker or shape inference
    graph = model.graph
    moved: list[tuple[ir.Value, ir.TensorProtocol, bool | None]] = []  # None: read in, not moved
    inputs_before = len(graph.inputs)
    order = list(graph.initializers)
    try:
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None:
                continue
            if tensor.nbytes <= limit:
                if isinstance(tensor, ir.ExternalTensor):
                    # Read in: a reference to a file relative to the model's folder would be
                    # resolved against the working directory by func (ONNX's checker).
                    value.const_value = _read_in(tensor)
                    moved.append((value, tensor, None))
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
        if any(was_input is not None for _, _, was_input in moved):
            values = {v.name: v for v in graph.initializers.values()}
            values.update((v.name, v) for v, _, _ in moved)
            graph.initializers.clear()
            for name in order:
                graph.initializers.add(values[name])
    compat.attach_map_tail(proto, model.graph.meta.get(_TAIL_KEY))
    return func(proto)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain: onnx-ir wraps the specific error
    ("duplicate value name ...") in generic "Error calling _deserialize_graph" ones."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (whitespace collapsed, at most ``limit`` chars)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
