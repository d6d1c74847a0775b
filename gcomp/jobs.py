"""The work behind ``gcomp optimize``, as core functions the CLI calls after parsing.

:func:`optimize_file` optimizes a model file into an output file: pipeline, verification,
the decision to write (never a failed or, with ``strict``, an unverified model), the
report document, the optional before/after profiles and backend choice, and the report
file. The CLI only parses options and prints; everything it prints comes from the
returned :class:`Outcome`.

:func:`output_file` and :func:`report_file` say where ``-o`` and ``--report`` write: ``-o``
naming a folder (an existing one, or any path ending in a separator) means that folder,
under the model's own file name; ``--report`` given as a bare format (``html``, ``md``,
``json``) means beside the output, as ``<output name>.report.<format>``.

:func:`optimize_folder` optimizes every ``.onnx`` model under a folder (an optimum or
Olive export: encoder, decoder, decoder with past, their external data, config and
tokenizer files) into an output folder, model by model, at the same relative paths. A
model that fails is reported and not written; the others are still done. Every other
file is copied, except the external data the models read (each optimized model writes
its own) and hidden files and folders (``.git``, caches).
"""

from __future__ import annotations

__all__ = [
    "FolderOutcome", "ModelRun", "OptimizeRequest", "Outcome", "VerificationFailed", "optimize_file",
    "optimize_folder", "output_file", "report_file",
]

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcomp import io
from gcomp import report as reports
from gcomp.errors import GcompError, ModelLoadError, ModelSaveError, OptionError, first_line
from gcomp.pipeline import ProgressCallback, Result, optimize


@dataclass(frozen=True)
class OptimizeRequest:
    """What ``gcomp optimize`` was asked to do, parsed."""

    model: Path
    output: Path
    pipeline: str
    options: Mapping[str, Any] = field(default_factory=dict)  # pass options (and precision=...)
    verify: bool = True
    inputs: Path | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    max_tensor_bytes: int | None = None
    verify_timeout: float | None = None
    bisect: bool = True
    strict: bool = False
    external_data: bool | None = None
    report: Path | None = None
    profile: bool | None = None  # None: profile before/after when the report is HTML
    profile_iters: int = 20
    pass_errors: bool = False
    pass_latency: bool = False
    select_backend: bool = False
    provider: str | None = None  # the ONNX Runtime execution provider of the backend choice's ORT candidate
    provider_options: Mapping[str, str] = field(default_factory=dict)
    quantize: str | None = None  # "int8", "int8-dynamic", "int8-weights", "int4" (gcomp.quantize)
    calibration: Path | None = None
    metric: str | None = None
    speed_gate: bool = True
    static: bool = False  # fix every dim at the input shapes (gcomp.optimize's static)
    create_folder: bool = False  # make output's missing folders (removed again if nothing is written)

    @property
    def html(self) -> bool:
        return self.report is not None and self.report.suffix.lower() == ".html"


@dataclass
class Outcome:
    result: Result
    doc: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


class VerificationFailed(GcompError):
    """The optimized model's outputs differ from the original's; nothing was written."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


# A phase after the passes ("profiling before and after"): a context manager giving a
# status callback, the CLI's spinner.
Phase = Callable[[str], contextlib.AbstractContextManager]


def optimize_file(request: OptimizeRequest, *, progress: ProgressCallback | None = None,
                  phase: Phase | None = None) -> Outcome:
    """Optimize ``request.model`` into ``request.output`` (atomically; never over the input)."""
    phase = phase or (lambda text: contextlib.nullcontext(lambda _status: None))
    folder = request.output.parent
    with _made_folder(folder) if request.create_folder else contextlib.nullcontext():
        if request.report is not None:
            reports.check_report_path(request.report)
        io.check_writable(request.output, source=request.model)
        result = _optimize(request, progress)
        warnings = _decide_to_write(request, result)
        result.save(request.output, external_data=request.external_data)
    doc = reports.optimize_document(result, output=str(request.output), input_path=str(request.model))
    _add_measurements(request, result, doc, phase)
    if request.report is not None:
        reports.write_report(doc, request.report)
    return Outcome(result, doc, warnings)


def output_file(model: Path, output: str | os.PathLike) -> tuple[Path, bool]:
    """Where ``-o OUTPUT`` writes ``model``, and whether OUTPUT named a folder: one that
    exists, or any path ending in a separator (created when missing); then the model's
    own file name inside it."""
    text = os.fspath(output)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return Path(text) / model.name, True
    return Path(text), False


def report_file(report: str | os.PathLike | None, output: Path) -> Path | None:
    """Where ``--report`` writes: a bare format (``html``, ``.md``, ``json``) means beside
    ``output`` as ``<output name without .onnx>.report.<format>``; a path is itself."""
    if report is None:
        return None
    fmt = report_format(report)
    if fmt is None:
        return Path(report)
    stem = output.name[:-len(".onnx")] if output.name.lower().endswith(".onnx") else output.name
    return output.with_name(f"{stem}.report.{fmt}")


def report_format(report: str | os.PathLike) -> str | None:
    """``"html"`` for ``--report html`` or ``.html`` (a format, no file name); else None."""
    text = os.fspath(report)
    bare = text.lower().lstrip(".")
    return bare if f".{bare}" in reports.FORMATS and os.sep not in text and "/" not in text else None


@contextlib.contextmanager
def _made_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` and its missing parents; on failure, remove those still empty."""
    made = []
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        made.append(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelSaveError(f"{folder}: cannot create the folder: {e.strerror}") from None
    try:
        yield
    except BaseException:
        for path in made:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _optimize(request: OptimizeRequest, progress: ProgressCallback | None) -> Result:
    # An HTML report draws the per-pass error and latency: measure them when verifying.
    return optimize(
        request.model, request.pipeline, verify=request.verify, inputs=request.inputs,
        input_shapes=request.input_shapes, bisect=request.bisect, progress=progress,
        max_tensor_bytes=request.max_tensor_bytes, verify_timeout=request.verify_timeout, static=request.static,
        pass_errors=(request.pass_errors or request.html) and request.verify,
        pass_latency=(request.pass_latency or request.html) and request.verify,
        **_quantization(request), **request.options,
    )


def _quantization(request: OptimizeRequest) -> dict[str, Any]:
    if request.quantize is None:
        return {}
    return {"quantize": request.quantize, "calibration": request.calibration, "metric": request.metric,
            "speed_gate": request.speed_gate}


def _decide_to_write(request: OptimizeRequest, result: Result) -> list[str]:
    """Raise when the output must not be written; the warnings to show when it may."""
    v = result.verification
    if v is None:
        return []
    if v.status == "failed":
        raise VerificationFailed(f"{v.summary()}; nothing written", result)
    if v.status == "unverified":
        if request.strict:
            raise GcompError(f"{v.summary()} (--strict); nothing written")
        return [f"{v.summary()}; writing the output marked unverified"]
    return []


def _add_measurements(request: OptimizeRequest, result: Result, doc: dict[str, Any], phase: Phase) -> None:
    """Profiles before/after and the backend choice, when asked, into the report document."""
    if request.html if request.profile is None else request.profile:
        from gcomp.profiling import optimize_profiles

        with phase("profiling before and after") as status:
            doc["profiles"] = optimize_profiles(
                result, request.model, iters=request.profile_iters, warmup=3, inputs=request.inputs,
                input_shapes=request.input_shapes, max_tensor_bytes=request.max_tensor_bytes,
                output=str(request.output), status=status,
            )
    if request.select_backend:
        from gcomp.autoselect import optimize_selection

        with phase("choosing a backend") as status:
            doc["backend_selection"] = optimize_selection(
                result.model, inputs=request.inputs, input_shapes=request.input_shapes,
                max_tensor_bytes=request.max_tensor_bytes, provider=request.provider,
                provider_options=request.provider_options, progress=status,
            )


@dataclass
class ModelRun:
    """One model of a folder: where it went, its sizes on disk, and its outcome or error."""

    name: str  # the path relative to the input folder
    output: Path
    seconds: float
    bytes_before: int  # the model file and the external data it reads
    bytes_after: int | None = None  # the written model and its .data file
    outcome: Outcome | None = None
    error: str | None = None  # one line, when the model was not written
    exit_code: int = 0
    result: Result | None = None  # also when verification failed

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class FolderOutcome:
    """What :func:`optimize_folder` did: one run per model, the other files copied, and
    what was left out (one line each)."""

    runs: list[ModelRun]
    copied: list[str]
    skipped: list[str]

    @property
    def failed(self) -> list[ModelRun]:
        return [r for r in self.runs if not r.ok]

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.failed), default=0)


@dataclass
class _Planned:
    path: Path
    inputs: set[str] | None  # None: the model could not be read ahead (its run says why)
    data_files: set[Path]
    bytes_before: int


def optimize_folder(request: OptimizeRequest, *, progress: ProgressCallback | None = None,
                    phase: Phase | None = None,
                    on_model: Callable[[str, int, int], None] | None = None) -> FolderOutcome:
    """Optimize every ``.onnx`` model under the folder ``request.model`` into the folder
    ``request.output`` (created when missing), keeping relative paths; copy the other files.

    A model that fails (load, pass, verification, write) is reported in its
    :class:`ModelRun` and not written; the others still run. ``request.report``, when
    given, is a format (``html``, ``md``, ``json``): each model's report goes beside it
    in the output folder. ``request.input_shapes`` are given to the models that have
    those inputs; a name no model has is an :class:`OptionError`, before any work.
    ``on_model(name, index, count)`` is called before each model.
    """
    source, target = request.model, request.output
    fmt = _check_folder_request(request)
    models, others, skipped = _scan(source, target)
    planned = [_plan_model(path) for path in models]
    shapes = _shapes_by_model(request.input_shapes or {}, planned)
    data_files = set().union(*(p.data_files for p in planned))
    with _made_folder(target):
        copied = _copy_files(source, target, [f for f in others if f.resolve() not in data_files])
        runs = []
        for index, plan in enumerate(planned):
            if on_model is not None:
                on_model(plan.path.relative_to(source).as_posix(), index, len(planned))
            job = dataclasses.replace(
                request, model=plan.path, output=target / plan.path.relative_to(source), create_folder=True,
                input_shapes=shapes[plan.path] or None, report=None,
            )
            if fmt is not None:
                job = dataclasses.replace(job, report=report_file(fmt, job.output))
            runs.append(_run_model(job, plan, source, progress, phase))
    return FolderOutcome(runs, copied, skipped)


def _check_folder_request(request: OptimizeRequest) -> str | None:
    """Options a folder of models cannot take; the report format, if any."""
    source, target = request.model, request.output
    for option, value in (("--inputs", request.inputs), ("--calibration", request.calibration)):
        if value is not None:
            raise OptionError(f"{option}: {source} is a folder of models and {option} holds one model's inputs: "
                              "give --input-shape, or optimize the models one by one")
    if target.exists() and not target.is_dir():
        raise OptionError(f"-o {target}: {source} is a folder of models, so -o must be a folder (this is a file)")
    if not target.exists() and target.suffix.lower() == ".onnx":
        raise OptionError(f"-o {target}: {source} is a folder of models, so -o must be a folder: "
                          f"end it with '/' to create it")
    if target.exists() and target.resolve() == source.resolve():
        raise ModelSaveError(f"-o {target}: is the input folder; refusing to write over its models")
    if request.report is None:
        return None
    fmt = report_format(request.report)
    if fmt is None:
        raise OptionError(f"--report {request.report}: with a folder of models give a format (json, md or html): "
                          "each model's report is written beside it in the output folder")
    return fmt


def _scan(source: Path, target: Path) -> tuple[list[Path], list[Path], list[str]]:
    """The models, the other files, and what is left out; hidden files and folders and
    the output folder (when inside the input) are not visited."""
    root = source.resolve()
    inside = target.resolve()
    models: list[Path] = []
    others: list[Path] = []
    skipped: list[str] = []
    for folder, dirs, files in os.walk(source):
        here = Path(folder)
        for name in [d for d in dirs if (here / d).is_symlink()]:
            skipped.append(f"{(here / name).relative_to(source).as_posix()}: a linked folder, not copied")
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink()
                         and (here / d).resolve() != inside)
        for name in sorted(files):
            path = here / name
            if name.startswith("."):
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                skipped.append(f"{path.relative_to(source).as_posix()}: a link to outside the folder, not copied")
                continue
            (models if name.lower().endswith(".onnx") else others).append(path)
    if not models:
        raise ModelLoadError(f"{source}: no .onnx model in this folder")
    return models, others, skipped


def _plan_model(path: Path) -> _Planned:
    """The model's input names and the external data it reads (its graph is parsed here
    and again when it runs; its weights are not read)."""
    try:
        model = io.load(path, check=False)
    except GcompError:  # its run says why; its data files are still not copied
        model = None
    if model is None:
        inputs, data_files = None, io.external_data_files(path)
    else:
        inputs = {v.name for v in model.graph.inputs if v.const_value is None}
        data_files = {Path(t.path).resolve() for t in io.external_tensors(model)}
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files if f.is_file())
    return _Planned(path, inputs, data_files, size)


def _shapes_by_model(shapes: Mapping[str, tuple[int, ...]], planned: list[_Planned]) -> dict[Path, dict]:
    """Each model's share of ``--input-shape``; a name that no model has is refused."""
    unused = set(shapes) - set().union(*(p.inputs or set() for p in planned))
    if unused and all(p.inputs is not None for p in planned):
        raise OptionError(f"--input-shape {sorted(unused)[0]}: no model of the folder has this input")
    return {p.path: {k: v for k, v in shapes.items() if p.inputs is None or k in p.inputs} for p in planned}


def _run_model(job: OptimizeRequest, plan: _Planned, source: Path, progress, phase) -> ModelRun:
    """One model's :func:`optimize_file`; its failure is recorded, not raised."""
    name = plan.path.relative_to(source).as_posix()
    t0 = time.perf_counter()
    run = ModelRun(name, job.output, 0.0, plan.bytes_before)
    try:
        run.outcome = optimize_file(job, progress=progress, phase=phase)
        run.result = run.outcome.result
        data = job.output.with_name(job.output.name + ".data")
        run.bytes_after = job.output.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    except GcompError as e:
        run.error, run.exit_code = str(e).removeprefix(f"{plan.path}: "), e.exit_code
        run.result = getattr(e, "result", None)
    except Exception as e:  # noqa: BLE001 - a gcomp bug on one model: the others still run
        run.error, run.exit_code = f"internal error: {type(e).__name__}: {first_line(e)}", 3
    run.seconds = time.perf_counter() - t0
    return run


def _copy_files(source: Path, target: Path, files: list[Path]) -> list[str]:
    """Copy each file to the same relative path under ``target``, atomically (a temporary
    file beside it, renamed); the relative paths copied."""
    copied = []
    for path in files:
        rel = path.relative_to(source)
        dest = target / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            try:
                shutil.copyfile(path, tmp)
                shutil.copymode(path, tmp)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as e:
            raise ModelSaveError(f"{dest}: cannot copy {rel.as_posix()} there: {e.strerror}") from None
        copied.append(rel.as_posix())
    return copied
