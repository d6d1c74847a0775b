"""The one registry of passes and pipelines.

The CLI (``gcomp passes``, ``-O``, ``--passes``, ``--set``), the Python API
(:func:`gcomp.optimize`) and the docs all read it, so an option is declared exactly
once: as a keyword-only parameter of the pass's ``__init__``, annotated with
``Annotated[type, "help"]``::

    @register_pass("my-pass")
    class MyPass(ir.passes.InPlacePass):
        \"\"\"One line that `gcomp passes` shows.\"\"\"

        def __init__(self, *, limit: Annotated[int, "largest tensor touched"] = 1024):
            super().__init__()
            self.limit = limit

A pipeline is a named sequence of stages; a stage is a group of passes run in order
and, when ``repeat > 1``, re-run until no pass in it reports a change (at most
``repeat`` rounds). Later pipelines extend earlier ones (``O1`` = ``O0`` + cleanup).

The registry is the bottom layer: it never imports a pass. The core
(:mod:`gcomp.pipeline`) imports :mod:`gcomp.passes`, which registers the built-in passes.

A pass that needs more than the model (to run a model: precision ``auto``, calibration;
to know what a target accepts: fusion) declares a keyword-only ``context`` parameter;
the pipeline hands it a :class:`PassContext`. ``context`` is not an option: ``gcomp
passes`` does not list it and ``--set`` cannot give it.
"""

from __future__ import annotations

__all__ = [
    "OptionInfo",
    "PassInfo",
    "Stage",
    "Pipeline",
    "register_pass",
    "register_pipeline",
    "get_pass",
    "get_pipeline",
    "passes",
    "pipelines",
    "resolve",
    "parse_option_value",
    "canonical_name",
    "pipeline_options",
    "PassContext",
    "Runtime",
    "Capabilities",
    "CONTEXT",
]

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from gcomp.errors import OptionError

_PASSES: dict[str, PassInfo] = {}
_PIPELINES: dict[str, Pipeline] = {}

# The keyword-only ``__init__`` parameter through which a pass receives a PassContext.
CONTEXT = "context"


class Runtime(Protocol):
    """How a pass runs a model. The core provides it (:mod:`gcomp.runtime`); a pass never
    imports a runtime itself."""

    def run(
        self,
        model: Any,  # an ir.Model, or an onnx.ModelProto (small single-node models)
        feeds: Mapping[str, np.ndarray],
        *,
        threads: int | None = None,
        emulate: bool = False,
    ) -> dict[str, np.ndarray]:
        """The graph's outputs by name.

        ``emulate``: evaluate an fp16/bf16 model as verification does (fp32 compute, every
        reduced-precision value rounded where it is made), not as the runtime would.
        Raises :class:`gcomp.errors.BackendError` when the model does not run.
        """
        ...


class Capabilities(Protocol):
    """What one compilation target accepts (defined by :mod:`gcomp.backends`)."""

    name: str  # "portable", "ort-cpu", ...
    backend: str | None  # "ort", "tvm"; None for portable
    device: str | None  # "cpu", "cuda", "llvm"; None for portable

    def accepts(self, domain: str, op_type: str, version: int) -> bool:
        """Whether the target runs ``domain::op_type`` in a model of opset ``version``."""
        ...


@dataclass(frozen=True)
class PassContext:
    """What the pipeline hands a pass that declares a ``context`` parameter.

    ``runtime`` runs models (the reference runtime: ONNX Runtime, optimizations off).
    ``capabilities`` maps a target name to what it accepts; it raises
    :class:`gcomp.errors.OptionError` for an unknown name. ``specialize(model, mesh)``
    returns ``model`` fixed to gcomp's default input shapes for a sharding mesh and
    folded (pipeline O1), for passes that must see through exporters' shape arithmetic.
    ``inputs(model, path)`` returns feeds for every input of ``model``, made the way
    verification makes its own (the arrays read from ``path``, an ``.npz`` or
    ``test_data_set`` folder, when given; the user's inputs; the rest generated, seeded),
    so calibration sees the values verification checks.
    """

    runtime: Runtime | None = None
    capabilities: Callable[[str], Capabilities] | None = None
    specialize: Callable[[ir.Model, Any], ir.Model] | None = None
    inputs: Callable[[ir.Model, str | None], dict[str, np.ndarray]] | None = None
    # The samples a calibrating pass (static int8) measures activation ranges on: a list of
    # feed dicts; the core sets it from --calibration.
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None
    # Results a pass may keep between its runs on copies of one model with the same samples
    # (the quantization core gives each job one: its accuracy budget quantizes the same float
    # model again with other nodes left float); None: nothing kept.
    memo: dict[Any, Any] | None = None

    def target(self, name: str) -> Capabilities:
        if self.capabilities is None:
            raise OptionError(
                f"target '{name}': this pass needs the targets' capabilities; run it through "
                "gcomp.optimize or give it context=gcomp.runtime.pass_context()"
            )
        return self.capabilities(name)

    def need_runtime(self, what: str) -> Runtime:
        if self.runtime is None:
            raise OptionError(
                f"{what} runs the model: run it through gcomp.optimize or give the pass "
                "context=gcomp.runtime.pass_context()"
            )
        return self.runtime


@dataclass(frozen=True)
class OptionInfo:
    """One keyword-only option of a pass."""

    name: str
    type: type
    default: Any
    help: str

    def parse(self, text: str) -> Any:
        return parse_option_value(self, text)


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its name, class, one-line summary and options."""

    name: str
    cls: type[ir.passes.PassBase]
    summary: str
    options: tuple[OptionInfo, ...]
    takes_context: bool = False

    def create(self, *, context: PassContext | None = None, **options: Any) -> ir.passes.PassBase:
        known = {o.name: o for o in self.options}
        for key, value in options.items():
            if key not in known:
                raise OptionError(
                    f"pass '{self.name}' has no option '{key}'"
                    + (f" (options: {', '.join(known)})" if known else " (it takes none)")
                )
            _check_type(known[key], value, self.name)
        if self.takes_context and context is not None:
            return self.cls(context=context, **options)
        return self.cls(**options)


@dataclass(frozen=True)
class Stage:
    """Passes run in order; with ``repeat > 1`` the group re-runs until nothing changes."""

    passes: tuple[str, ...]
    repeat: int = 1


@dataclass(frozen=True)
class Pipeline:
    name: str
    summary: str
    stages: tuple[Stage, ...] = field(default_factory=tuple)


def register_pass(name: str, *, summary: str | None = None) -> Callable[[type], type]:
    """Class decorator: register an onnx-ir pass under ``name``.

    The summary defaults to the first line of the class docstring; options are read
    from the keyword-only parameters of ``__init__`` (``Annotated[type, "help"]``).
    """

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, ir.passes.PassBase)):
            raise TypeError(f"register_pass('{name}'): {cls!r} is not an onnx-ir pass class")
        if name in _PIPELINES:
            raise ValueError(f"pass name '{name}' clashes with a pipeline")
        doc = inspect.getdoc(cls) or ""
        text = summary or (doc.splitlines()[0] if doc else cls.__name__)
        takes_context = CONTEXT in inspect.signature(cls.__init__).parameters
        _PASSES[name] = PassInfo(name, cls, text, _options_of(cls), takes_context)
        return cls

    return decorate


def register_pipeline(name: str, summary: str, *stages: Stage | Sequence[str]) -> Pipeline:
    """Register (or replace) a named pipeline made of stages of registered pass names."""
    if name in _PASSES:
        raise ValueError(f"pipeline name '{name}' clashes with a pass")
    built = tuple(s if isinstance(s, Stage) else Stage(tuple(s)) for s in stages)
    pipeline = Pipeline(name, summary, built)
    _PIPELINES[name] = pipeline
    return pipeline


def passes() -> dict[str, PassInfo]:
    return dict(_PASSES)


def pipelines() -> dict[str, Pipeline]:
    return dict(_PIPELINES)


def get_pass(name: str) -> PassInfo:
    try:
        return _PASSES[name]
    except KeyError:
        raise OptionError(
            f"unknown pass '{name}' (passes: {', '.join(sorted(_PASSES))})"
        ) from None


def get_pipeline(name: str) -> Pipeline:
    key = canonical_name(name)
    try:
        return _PIPELINES[key]
    except KeyError:
        raise OptionError(
            f"unknown pipeline '{name}' (pipelines: {', '.join(_PIPELINES)})"
        ) from None


def resolve(spec: str | Sequence[str | ir.passes.PassBase]) -> Pipeline | list:
    """Turn a pipeline spec into stages.

    ``spec`` is a pipeline name (``"O1"``, ``"1"``), a comma-separated string of
    pipeline and pass names (``"O1,my-pass"``), or a list mixing names and pass
    instances. Returns a list of :class:`Stage` or pass instances, in order.
    """
    items: list[str | ir.passes.PassBase]
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
        if not items:
            raise OptionError("empty pipeline")
    else:
        items = list(spec)
    steps: list = []
    for item in items:
        if isinstance(item, ir.passes.PassBase):
            steps.append(item)
        elif not isinstance(item, str):
            raise OptionError(f"pipeline entries must be names or onnx-ir passes, got {item!r}")
        elif canonical_name(item) in _PIPELINES:
            steps.extend(_PIPELINES[canonical_name(item)].stages)
        elif item in _PASSES:
            steps.append(Stage((item,)))
        else:
            raise OptionError(
                f"unknown pipeline or pass '{item}' "
                f"(pipelines: {', '.join(_PIPELINES)}; passes: {', '.join(sorted(_PASSES))})"
            )
    return steps


def pipeline_options(spec: str | Sequence[str | ir.passes.PassBase]) -> dict[str, OptionInfo]:
    """Every option declared by the registered passes of a pipeline spec, by name."""
    declared: dict[str, OptionInfo] = {}
    for step in resolve(spec):
        if isinstance(step, Stage):
            for name in step.passes:
                for option in get_pass(name).options:
                    declared.setdefault(option.name, option)
    return declared


def parse_option_value(option: OptionInfo, text: str) -> Any:
    """Parse a CLI string into the option's declared type."""
    t = option.type
    try:
        if t is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if t is int:
            return int(float(text)) if "e" in text.lower() else int(text, 0)
        if t is float:
            return float(text)
        if t in (tuple, list) or typing.get_origin(t) in (tuple, list):
            return tuple(s.strip() for s in text.split(",") if s.strip())
        return t(text)
    except (TypeError, ValueError):
        raise OptionError(
            f"option '{option.name}' expects {getattr(t, '__name__', t)}, got '{text}'"
        ) from None


def _check_type(option: OptionInfo, value: Any, pass_name: str) -> None:
    t = option.type
    ok = True
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(t, type):
        ok = isinstance(value, t)
    if not ok:
        raise OptionError(
            f"option '{option.name}' of pass '{pass_name}' expects "
            f"{getattr(t, '__name__', t)}, got {value!r}"
        )


def _options_of(cls: type) -> tuple[OptionInfo, ...]:
    init = cls.__init__
    if init is object.__init__:
        return ()
    sig = inspect.signature(init)
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception:
        hints = {}
    options = []
    for p in sig.parameters.values():
        if p.name in ("self", CONTEXT) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.kind is not p.KEYWORD_ONLY:
            raise TypeError(
                f"{cls.__name__}.__init__: option '{p.name}' must be keyword-only (put it after *)"
            )
        if p.default is p.empty:
            raise TypeError(f"{cls.__name__}.__init__: option '{p.name}' needs a default")
        hint = hints.get(p.name, type(p.default))
        help_text = ""
        if typing.get_origin(hint) is typing.Annotated:
            base, *extras = typing.get_args(hint)
            help_text = next((e for e in extras if isinstance(e, str)), "")
            hint = base
        if not isinstance(hint, type):
            hint = type(p.default)
        options.append(OptionInfo(p.name, hint, p.default, help_text))
    return tuple(options)


def canonical_name(name: str) -> str:
    """``"1"``, ``"o1"`` -> ``"O1"``; other names unchanged."""
    name = name.strip()
    if name.isdigit():
        return f"O{name}"
    if len(name) == 2 and name[0] in "oO" and name[1].isdigit():
        return "O" + name[1]
    return name

