"""Inputs for running a model: read from files, or generated from the model's input types.

Files (``--inputs``):
- an ``.npz`` archive whose keys are input names;
- an ONNX ``test_data_set_N`` folder of ``input_<i>.pb`` files (names taken from each
  message, or from the model's input order when a message has none): TensorProtos, and
  SequenceProtos or OptionalProtos for inputs of those types (the model's input type says
  which message a file holds). A sequence is fed as a list of arrays, an optional as its
  element or None (empty).

Generated inputs (seeded, so every run and every model variant sees the same values):
- symbolic or unknown dims: ``--input-shape NAME=D1,D2,...`` fixes an input's shape and
  every dim name it binds (so ``seq`` fixed on one input holds for all inputs);
  otherwise a leading dim or a dim named like ``batch`` / ``N`` is 1, any other is 32;
- floats: uniform in [0, 1) (like Polygraphy: no NaN from Log/Sqrt of negatives);
- bool: random True/False;
- integers: bounded by what the model does with them: indices of a ``Gather`` on a
  constant table stay inside the table; names containing ``mask`` get ones,
  ``token_type``/``segment`` zeros, ``position`` 0..n-1 along the last axis (P..P+n-1 with a
  KV cache, below); other
  integers are drawn from [0, 2). An integer input used as a shape, a size or slice
  bounds gets a note: generated values may be meaningless there, pass ``--inputs``.
- strings: the string ``"a"``.
- a decoder with a KV cache (float ``past*``/``*cache*`` inputs whose axis -2 is a symbolic
  past length P; a token input ``input_ids``/``inputs_embeds`` whose axis 1 is the sequence
  length S): P and S default to 32, the attention mask's other length is P + S, and
  positions run P..P+S-1, so the inputs are those of a real decoding step.
"""

from __future__ import annotations

__all__ = [
    "load_inputs",
    "describe_feeds",
    "generate_inputs",
    "InputsTooLarge",
    "CannotGenerate",
    "parse_input_shapes",
    "DEFAULT_BATCH_DIM",
    "DEFAULT_DIM",
]

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import OptionError, first_line

DEFAULT_BATCH_DIM = 1
DEFAULT_DIM = 32
_BATCH_NAMES = re.compile(r"^(n|b|bs|batch.*|.*_batch|.*batch_size.*|unk__\d+)$", re.IGNORECASE)
# A decoder's KV cache inputs (past_key_values.0.key, past.0, past_key_3, cache_k, ...) and its
# token inputs.
_PAST = re.compile(r"(^|[._/])(past|cache)", re.IGNORECASE)
_TOKENS = re.compile(r"^(input_ids|inputs_embeds|tokens?|ids)$", re.IGNORECASE)
# Inputs of these ops are shapes, sizes or positions: random values are meaningless there.
_SHAPE_LIKE_USES = {
    ("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("Tile", 1), ("Slice", 1),
    ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Range", 0), ("Range", 1), ("Range", 2),
    ("Resize", 3), ("TopK", 1), ("Pad", 1), ("OneHot", 1), ("Unsqueeze", 1), ("Squeeze", 1),
    ("ReduceSum", 1), ("ReduceMean", 1), ("ReduceMax", 1), ("ReduceMin", 1), ("Split", 1),
    ("Loop", 0), ("Upsample", 1), ("CumSum", 1),
}


def parse_input_shapes(specs: list[str] | tuple[str, ...] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME=D1,D2,...`` strings (``NAME=`` alone means a scalar)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.partition("=")
        if not sep or not name:
            raise OptionError(f"--input-shape '{spec}': expected NAME=D1,D2,...")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise OptionError(f"--input-shape '{spec}': dims must be integers") from None
        if any(d < 0 for d in shape):
            raise OptionError(f"--input-shape '{spec}': dims must be non-negative")
        shapes[name.strip()] = shape
    return shapes


def load_inputs(path: str | os.PathLike, model: ir.Model | None = None, *, option: str = "--inputs") -> dict[str, Any]:
    """Read inputs from an ``.npz`` file or a ``test_data_set`` folder of ``input_*.pb``.

    Values are arrays, except for sequence inputs (lists) and optional ones (the element,
    or None) read from a folder, which needs ``model`` to tell their types."""
    p = Path(path)
    if not p.exists():
        raise OptionError(f"{option} {p}: no such file or folder")
    if p.is_dir():
        return _load_pb_folder(p, model, option)
    try:
        with np.load(p, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise OptionError(f"{option} {p}: expected an .npz archive of named arrays")
            return {k: data[k] for k in data.files}
    except OptionError:
        raise
    except Exception as e:
        raise OptionError(f"{option} {p}: not a readable .npz file ({e})") from None


def _load_pb_folder(folder: Path, model: ir.Model | None, option: str = "--inputs") -> dict[str, Any]:
    """``input_<i>.pb`` files in index order. Which protobuf message a file holds is not
    written in it (the bytes of a SequenceProto also parse as a TensorProto, wrongly), so
    the model says it, as ONNX's own test runner reads them: file ``i`` is runtime input
    ``i``, a TensorProto, SequenceProto or OptionalProto by that input's type. A file
    whose message names another input is read by that input's type."""
    files = sorted(folder.glob("input_*.pb"), key=lambda f: int(re.sub(r"\D", "", f.stem) or 0))
    if not files:
        raise OptionError(f"{option} {folder}: no input_*.pb files in the folder")
    inputs = runtime_inputs(model) if model is not None else []
    kinds = {v.name: _message_kind(v.type) for v in inputs}
    feeds: dict[str, Any] = {}
    for i, f in enumerate(files):
        data = f.read_bytes()
        slot = inputs[i] if i < len(inputs) else None
        kind = kinds[slot.name] if slot is not None else "tensor"
        name, value = _parse_message(data, kind, slot, f, option)
        if name in kinds and kinds[name] != kind:
            named = next(v for v in inputs if v.name == name)
            name, value = _parse_message(data, kinds[name], named, f, option)
        feeds[name or (slot.name if slot is not None else f"input_{i}")] = value
    return feeds


def _message_kind(type_: ir.TypeProtocol | None) -> str:
    """Which protobuf message holds a value of this type in a test_data_set file."""
    if isinstance(type_, ir.SequenceType):
        return "sequence"
    if isinstance(type_, ir.OptionalType):
        return "optional"
    return "tensor"


def _parse_message(data: bytes, kind: str, slot: ir.Value | None, path: Path, option: str) -> tuple[str, Any]:
    """(the message's name, its value as ONNX Runtime takes it: an array, a list of them
    for a sequence, the element or None for an optional)."""
    import onnx
    from onnx import numpy_helper

    message, convert = {
        "tensor": (onnx.TensorProto, numpy_helper.to_array),
        "sequence": (onnx.SequenceProto, numpy_helper.to_list),
        "optional": (onnx.OptionalProto, _optional_value),
    }[kind]
    proto = message()
    try:
        proto.ParseFromString(data)
        if _unknown_fields(proto):  # protobuf parses any message's bytes as another, silently
            raise ValueError(f"it holds fields a {message.__name__} does not have")
        value = convert(proto)
    except Exception as e:
        why = f" (the model's input '{slot.name}' is a {slot.type})" if slot is not None else ""
        article = "an" if kind == "optional" else "a"
        raise OptionError(f"{option} {path}: not {article} {message.__name__}{why}: {first_line(e)}") from None
    return proto.name, value


def _unknown_fields(proto) -> int:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf < 4.22: no check
        return 0
    return len(UnknownFieldSet(proto))


def _optional_value(proto) -> Any:
    """An OptionalProto's element, None when it holds none (also when its element type is
    set but the value is absent, as ``numpy_helper.from_optional(None, dtype=...)`` writes)."""
    from onnx import OptionalProto, numpy_helper

    field = {
        OptionalProto.TENSOR: "tensor_value", OptionalProto.SPARSE_TENSOR: "sparse_tensor_value",
        OptionalProto.SEQUENCE: "sequence_value", OptionalProto.MAP: "map_value",
        OptionalProto.OPTIONAL: "optional_value",
    }.get(proto.elem_type)
    if field is None or not proto.HasField(field):
        return None
    return numpy_helper.to_optional(proto)


def describe_feeds(feeds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"shape": [...], "dtype": "..."}}`` for reports: a sequence is shown as its
    length and ``sequence(<element dtype>)``, an empty optional as ``optional(empty)``."""
    return {name: _describe(value) for name, value in feeds.items()}


def _describe(value: Any) -> dict[str, Any]:
    if value is None:
        return {"shape": [], "dtype": "optional(empty)"}
    if isinstance(value, (list, tuple)) and any(not np.isscalar(v) for v in value):
        inner = {_describe(v)["dtype"] for v in value}
        return {"shape": [len(value)], "dtype": f"sequence({inner.pop() if len(inner) == 1 else 'mixed'})"}
    if isinstance(value, dict):
        return {"shape": [len(value)], "dtype": "map"}
    return {"shape": list(np.shape(value)), "dtype": str(np.asarray(value).dtype)}


class CannotGenerate(OptionError):
    """The model's inputs cannot be generated (an unusable type or shape): verification
    is then not possible, which is not an error of the user's options."""


class InputsTooLarge(CannotGenerate):
    """Generated inputs would exceed the size bound."""


def runtime_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs a caller must feed (initializers that are also inputs have defaults)."""
    return [v for v in model.graph.inputs if v.const_value is None]


def generate_inputs(
    model: ir.Model,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    given: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    max_bytes: int | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Seeded inputs for every runtime input not in ``given``; returns (feeds, notes).

    Raises :class:`InputsTooLarge` (before allocating) when the inputs would take more
    than ``max_bytes`` in all."""
    shapes = dict(shapes or {})
    feeds = dict(given or {})
    notes: list[str] = []
    inputs = runtime_inputs(model)
    known = {v.name for v in inputs}
    for name in list(shapes) + list(feeds):
        if name not in known:
            raise OptionError(
                f"the model has no input '{name}' (inputs: {', '.join(sorted(known)) or 'none'})"
            )
    # Bind symbolic dims from explicit shapes and given arrays first.
    bound: dict[str, int] = {}
    for value in inputs:
        fixed = shapes.get(value.name)
        if fixed is None and value.name in feeds and _message_kind(value.type) == "tensor":
            fixed = tuple(np.shape(feeds[value.name]))  # a sequence has no one shape
        if fixed is not None and value.shape is not None and len(value.shape) == len(fixed):
            for dim, size in zip(value.shape, fixed):
                if isinstance(dim, ir.SymbolicDim) and dim.value:
                    bound.setdefault(dim.value, size)
    offset = _bind_cache(inputs, bound, notes)
    rng = np.random.default_rng(seed)
    planned = {}
    for value in inputs:
        if value.name not in feeds:
            planned[value.name] = shapes.get(value.name) or _concrete_shape(value, bound)
    if max_bytes is not None:
        total = 0
        for value in inputs:
            if value.name in planned and isinstance(value.type, ir.TensorType):
                dtype = value.type.dtype
                itemsize = 8 if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED) else max(1, int(dtype.itemsize))
                total += int(np.prod(np.asarray(planned[value.name], dtype=np.float64))) * itemsize
        if total > max_bytes:
            raise InputsTooLarge(f"generated inputs would take {total:,} bytes, over the limit of {max_bytes:,}")
    for value in inputs:
        if value.name in planned:
            feeds[value.name] = _generate(value, planned[value.name], rng, notes, offset)
    return feeds, notes


def _symbolic(value: ir.Value, axis: int) -> str | None:
    """The name of ``value``'s dim at ``axis`` when it is symbolic."""
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim.value if isinstance(dim, ir.SymbolicDim) and dim.value else None


def _bind_cache(inputs: list[ir.Value], bound: dict[str, int], notes: list[str]) -> int:
    """For a decoder with a KV cache (float ``past*``/``*cache*`` inputs of rank >= 3 whose
    axis -2, the past length P, is symbolic): bind P and the sequence length S (the token
    input's axis 1, else a position input's last axis) and make the attention mask's other
    length P + S, so the inputs are consistent (exporters name the three dims apart and
    nothing in the graph says total = past + sequence). Returns the first position, P (0
    without a cache): position inputs then run P..P+S-1."""
    past = {_symbolic(v, -2) for v in inputs if _PAST.search(v.name) and v.shape is not None and len(v.shape) >= 3
            and isinstance(v.type, ir.TensorType) and v.type.dtype.is_floating_point()} - {None}
    if len(past) != 1:
        return 0
    (past_dim,) = past
    tokens = [v for v in inputs if _TOKENS.search(v.name)] or [v for v in inputs if "position" in v.name.lower()]
    seq_dim = next((d for d in (_symbolic(v, 1 if _TOKENS.search(v.name) else -1) for v in tokens) if d), None)
    if seq_dim is None or seq_dim == past_dim:
        return 0
    p = bound.setdefault(past_dim, DEFAULT_DIM)
    s = bound.setdefault(seq_dim, DEFAULT_DIM)
    totals = {_symbolic(v, -1) for v in inputs if "mask" in v.name.lower()} - {None, seq_dim, past_dim}
    for total in totals:
        bound.setdefault(total, p + s)
    notes.append(f"KV cache: past length {past_dim}={p}, sequence {seq_dim}={s}"
                 + "".join(f", {t}={bound[t]}" for t in sorted(totals)) + f"; positions {p}..{p + s - 1}")
    return p


def _concrete_shape(value: ir.Value, bound: dict[str, int]) -> tuple[int, ...]:
    if value.shape is None:
        return ()
    dims: list[int] = []
    for i, dim in enumerate(value.shape):
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
            continue
        name = dim.value if isinstance(dim, ir.SymbolicDim) else None  # a negative dim: unknown
        if name and name in bound:
            size = bound[name]
        elif i == 0 or (name and _BATCH_NAMES.match(name)):
            size = DEFAULT_BATCH_DIM
        else:
            size = DEFAULT_DIM
        if name:
            bound[name] = size
        dims.append(size)
    return tuple(dims)


def _generate(value: ir.Value, shape: tuple[int, ...], rng, notes: list[str], offset: int = 0) -> np.ndarray:
    type_ = value.type
    if not isinstance(type_, ir.TensorType):
        raise CannotGenerate(
            f"input '{value.name}' is a {type_}: gcomp generates tensors only; pass --inputs"
        )
    dtype = type_.dtype
    if dtype == ir.DataType.UNDEFINED:
        raise CannotGenerate(f"input '{value.name}' declares no element type")
    if dtype.is_floating_point():
        array = rng.random(shape, dtype=np.float64)
        try:
            return np.asarray(array.astype(dtype.numpy()))
        except (TypeError, ValueError):
            raise CannotGenerate(f"input '{value.name}' has type {dtype}: gcomp cannot generate it; pass --inputs") from None
    if dtype == ir.DataType.BOOL:
        return np.asarray(rng.random(shape) < 0.5)
    if dtype == ir.DataType.STRING:
        return np.full(shape, "a", dtype=object)
    if dtype.is_integer():
        try:
            np_dtype = np.dtype(dtype.numpy())
        except (TypeError, ValueError):
            np_dtype = None
        if np_dtype is None or np_dtype.kind not in "iu":
            raise CannotGenerate(f"input '{value.name}' has type {dtype}: gcomp cannot generate it; pass --inputs")
        return np.asarray(_generate_integer(value, shape, np_dtype, rng, notes, offset))
    raise CannotGenerate(f"input '{value.name}' has type {dtype}: cannot generate it; pass --inputs")


def _generate_integer(value: ir.Value, shape, np_dtype, rng, notes: list[str], offset: int = 0) -> np.ndarray:
    name = value.name.lower()
    if "mask" in name:
        return np.ones(shape, dtype=np_dtype)
    if "token_type" in name or "segment" in name:
        return np.zeros(shape, dtype=np_dtype)
    if "position" in name and len(shape) >= 1:
        return np.broadcast_to(np.arange(offset, offset + shape[-1], dtype=np_dtype), shape).copy()
    high = None
    for node, index in value.uses():
        if node.op_type in ("Gather", "GatherElements") and index == 1 and node.domain == "":
            table = node.inputs[0]
            axis = node.attributes.get_int("axis", 0)
            rank = len(table.shape) if table is not None and table.shape is not None else 0
            if rank and -rank <= axis < rank:
                dim = table.shape[axis]
                if isinstance(dim, int):
                    high = dim if high is None else min(high, dim)
        elif (node.op_type, index) in _SHAPE_LIKE_USES:
            notes.append(
                f"input '{value.name}' is used as {node.op_type} input {index} "
                "(a shape, size or bound): generated values may not make sense; pass --inputs"
            )
    if high is not None and high > 0:
        return rng.integers(0, high, size=shape).astype(np_dtype)
    low = 0
    return rng.integers(low, 2, size=shape).astype(np_dtype)


MIN_CALIBRATION_SAMPLES = 8


def load_calibration(path: str | os.PathLike, model: ir.Model, *, option: str = "--calibration",
                     minimum: int = MIN_CALIBRATION_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Samples (one feed dict each) for calibration and accuracy checks, checked against
    ``model``'s inputs.

    ``path`` is a folder of ``.npz`` files (one sample each), a folder of ONNX
    ``test_data_set_*`` folders, or one ``.npz`` whose arrays carry one extra leading
    sample axis before the model's own dims. Every sample must name exactly the model's
    runtime inputs, with their element type and rank, and fixed dims equal; at least
    ``minimum`` samples. Anything else is one :class:`OptionError` naming the input.
    """
    p = Path(path)
    if not p.exists():
        raise OptionError(f"{option} {p}: no such file or folder")
    samples = _calibration_samples(p, model, option)
    if len(samples) < minimum:
        raise OptionError(f"{option} {p}: {len(samples)} sample(s); at least {minimum} are needed")
    for i, sample in enumerate(samples):
        _check_sample(sample, model, f"{option} {p} (sample {i})")
    return samples


def _calibration_samples(p: Path, model: ir.Model, option: str) -> list[dict[str, np.ndarray]]:
    if p.is_file():
        stacked = load_inputs(p, model, option=option)
        counts = {k: (a.shape[0] if a.ndim else None) for k, a in stacked.items()}
        if not counts or None in counts.values() or len(set(counts.values())) != 1:
            raise OptionError(f"{option} {p}: every array needs the same leading sample axis "
                              f"({', '.join(f'{k}: {c}' for k, c in counts.items())})")
        n = next(iter(counts.values()))
        return [{k: a[i] for k, a in stacked.items()} for i in range(n)]
    try:
        entries = list(p.iterdir())
    except OSError as e:
        raise OptionError(f"{option} {p}: cannot read the folder ({e.strerror})") from None
    sets = sorted(d for d in entries if d.is_dir() and d.name.startswith("test_data_set"))
    files = sorted(f for f in entries if f.suffix == ".npz")
    if not sets and not files:
        raise OptionError(f"{option} {p}: the folder holds no .npz files and no test_data_set_* folders")
    return [load_inputs(d, model, option=option) for d in sets] + [load_inputs(f, model, option=option) for f in files]


def _check_sample(sample: dict[str, np.ndarray], model: ir.Model, where: str) -> None:
    expected = {v.name: v for v in runtime_inputs(model)}
    unknown = sorted(set(sample) - set(expected))
    missing = sorted(set(expected) - set(sample))
    if unknown or missing:
        raise OptionError(f"{where}: input names {sorted(sample)} do not match the model's "
                          f"{sorted(expected)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    for name, value in expected.items():
        array = sample[name]
        want = value.dtype.numpy() if value.dtype is not None else None
        if want is not None and array.dtype != want:
            raise OptionError(f"{where}: input '{name}' is {array.dtype}, the model expects {np.dtype(want)}")
        if value.shape is None:
            continue
        dims = list(value.shape)
        fixed = [d if isinstance(d, int) else None for d in dims]
        if array.ndim != len(dims) or any(f is not None and f != s for f, s in zip(fixed, array.shape)):
            shown = "x".join(str(d) if d is not None else "?" for d in fixed)
            raise OptionError(f"{where}: input '{name}' has shape {list(array.shape)}, the model expects [{shown}]")
