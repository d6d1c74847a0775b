"""Profiling end to end, for ``gcomp profile``, ``gcomp optimize --report`` and ``gcomp report``.

- :func:`profile_model` compiles a model on a backend, runs it on the given (or
  generated, seeded) inputs and returns an annotated :class:`~gcomp.perf.Profile`:
  whatever backend produced it, the rows get gcomp's FLOPs, bytes and roofline bounds.
- :func:`print_profile` is the terminal table; :func:`write_outputs` writes the report
  and trace files the options asked for.
- :func:`interleaved_speed` times the models before and after optimization in one
  process, in alternating blocks, for the optimize report's speed headline
  (:mod:`gcomp.report.speed` words it);
- :func:`load_profiles` reads saved profile JSON files for ``gcomp report`` with clear
  errors (not a file, not JSON, not a gcomp profile, a newer major schema).

The CLI commands stay thin and call these.
"""

from __future__ import annotations

__all__ = [
    "finish_profile",
    "interleaved_speed",
    "load_profiles",
    "optimize_profiles",
    "print_profile",
    "profile_model",
    "spinner",
    "write_outputs",
]

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gcomp.errors import GcompError, OptionError


@contextlib.contextmanager
def spinner(text: str, *, quiet: bool):
    """A transient rich spinner with elapsed time on stderr (nothing when quiet)."""
    if quiet:
        yield lambda _text: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(text, total=None)
    progress.start()
    try:
        yield lambda new: progress.update(task, description=new)
    finally:
        progress.stop()


def profile_model(
    model,
    *,
    backend: str = "ort",
    device: str = "cpu",
    iters: int = 50,
    warmup: int = 5,
    inputs: str | os.PathLike | None = None,
    feeds: Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_tensor_bytes: int | None = None,
    compile_options: Mapping[str, Any] | None = None,
    status=None,
):
    """Profile ``model`` (a path or an ``ir.Model``) on ``backend``/``device``.

    Returns ``(profile, notes)``; notes say how inputs were generated. ``feeds`` (the
    arrays to run on) wins over ``inputs``/``input_shapes``.
    """
    import onnx_ir as ir

    from gcomp import io
    from gcomp.backends import get_backend
    from gcomp.inputs import generate_inputs, load_inputs

    status = status or (lambda _text: None)
    m = model if isinstance(model, ir.Model) else io.load(model)
    notes: list[str] = []
    if feeds is None:
        given = load_inputs(inputs, m) if inputs else None
        kwargs = {"max_bytes": max_tensor_bytes} if max_tensor_bytes is not None else {}
        feeds, notes = generate_inputs(m, shapes=dict(input_shapes or {}), given=given, **kwargs)
    status(f"compiling for {backend}/{device}")
    options = dict(compile_options or {})
    source = model
    if backend == "tvm":  # the backend compiles what the pipeline prepared for it
        from gcomp.autoselect import prepare_for_tvm

        source = prepare_for_tvm(m, options.pop("input_shapes", None), target=device)
    exe = get_backend(backend).compile(source, device, **options)
    status(
        f"profiling on {backend}/{device}: {warmup} warm-up + {iters} timed runs, then per-op times"
    )
    prof = exe.profile(feeds, iters=iters, warmup=warmup)
    return finish_profile(
        prof, m, feeds, path=model if isinstance(model, (str, os.PathLike)) else None, status=status
    ), notes


def finish_profile(prof, model, feeds, *, path=None, status=None):
    """Whatever the backend reported, add gcomp's costs and roofline (when the backend did
    not) and the model's path."""
    import numpy as np

    from gcomp.backends.ort_providers import NEEDS_NVIDIA_GPU

    if prof.roofline is None:  # a backend that reports times only: gcomp adds the rest
        if status:
            status("pricing ops (FLOPs, bytes) and the roofline")
        prof.annotate(model, {k: tuple(np.asarray(v).shape) for k, v in feeds.items()})
    if path is not None:
        prof.model["path"] = str(path)
    on_gpu = prof.backend.get("target") == "cuda" or prof.backend.get("provider") in NEEDS_NVIDIA_GPU
    if on_gpu and "gpu_peak_bytes" not in prof.memory:
        from gcomp.perf import gpu_memory_of_process

        prof.memory["gpu_peak_bytes"] = gpu_memory_of_process()
    return prof


def print_profile(prof, *, title: str, top: int, console) -> None:
    """The latency table, then the top ``top`` ops with costs and bounds."""
    from dataclasses import asdict

    from rich.table import Table

    from gcomp.perf.profile import provider_counts
    from gcomp.report.roof import kernel_roof_text

    lat = prof.latency
    t = Table(title=title, title_justify="left")
    for col in ("mean ms", "p50", "p90", "p99", "min", "stdev", "iters", "per s"):
        t.add_column(col, justify="right")
    t.add_row(
        f"{lat.mean_ms:.3f}",
        f"{lat.p50_ms:.3f}",
        f"{lat.p90_ms:.3f}",
        f"{lat.p99_ms:.3f}",
        f"{lat.min_ms:.3f}",
        f"{lat.stdev_ms:.3f}",
        str(lat.iterations),
        f"{lat.throughput_per_s:.1f}",
    )
    console.print(t)
    providers = provider_counts(prof.ops)
    _print_providers(providers, console)
    ops = Table(title=f"top {min(top, len(prof.ops))} of {len(prof.ops)} ops", title_justify="left")
    several = len(providers) > 1  # which provider ran each node, when it was not one for all
    for col in ("node", "op type", *(["provider"] if several else []), "ms", "share", "GFLOP/s", "GB/s", "bound",
                "of roof"):
        ops.add_column(col, justify="right" if col not in ("node", "op type", "provider", "bound") else "left")
    for o in prof.ops[:top]:
        ops.add_row(
            o.node,
            o.op_type,
            *([(o.provider or "-").removesuffix("ExecutionProvider")] if several else []),
            f"{o.time_ms:.4f}",
            f"{o.share * 100:.1f}%",
            f"{o.gflops_per_s:.1f}" if o.gflops_per_s is not None else "-",
            f"{o.gb_per_s:.2f}" if o.gb_per_s is not None else "-",
            o.bound or "-",
            kernel_roof_text(asdict(o)),
        )
    console.print(ops)
    _print_figures(prof, console)


def _print_providers(providers: dict[str, int], console) -> None:
    """Which execution providers ran the kernels, when it is not the CPU's alone."""
    if list(providers) in ([], ["CPUExecutionProvider"]):
        return
    console.print("execution providers: " + ", ".join(f"{p} ran {n} kernel{'s' * (n != 1)}"
                                                      for p, n in providers.items()), soft_wrap=True, markup=False)


def _print_figures(prof, console) -> None:
    """Work per run against the peak, where the roofs came from, and the memory figures."""
    from gcomp.report.roof import peak_share_text, roof_origin
    from gcomp.report.units import human_bytes, model_memory_words

    totals, roof, memory = prof.totals or {}, prof.roofline or {}, prof.memory or {}
    if totals.get("graph_flops"):
        achieved = totals.get("achieved_gflops_per_s")
        share = peak_share_text(achieved, roof)
        console.print(
            f"{totals['graph_flops'] / 1e9:.3f} GFLOP per run ({(totals.get('graph_macs') or 0) / 1e9:.3f} G multiply-adds)"
            + (f"; achieved {achieved:.1f} GFLOP/s" if achieved else "")
            + (f" = {share}" if share else ""), soft_wrap=True, markup=False,
        )
    if roof:
        console.print(f"roofline: {roof_origin(roof)}", soft_wrap=True, markup=False)
    if memory.get("peak_rss_bytes") is not None:
        console.print(f"process peak RSS {human_bytes(memory['peak_rss_bytes'])} (the whole Python process)"
                      + (f"; model memory {human_bytes(memory['model_bytes_estimate'])} (estimate: "
                         f"{model_memory_words(memory)})" if memory.get("model_bytes_estimate") is not None else ""),
                      soft_wrap=True, markup=False)


def write_outputs(doc: dict[str, Any], *, report: Path | None, trace: Path | None) -> list[Path]:
    """Write the report (.json/.md/.html) and the Chrome trace (.json) asked for."""
    from gcomp import report as reports
    from gcomp.report import trace as traces

    # Build the trace first: a profile without a timeline fails before any file is written.
    events = traces.trace_events(doc) if trace is not None else None
    written = []
    if report is not None:
        written.append(reports.write_report(doc, report))
    if trace is not None:
        written.append(traces.write_trace(doc, trace, events=events))
    return written


def optimize_profiles(
    result,
    source,
    *,
    iters: int,
    warmup: int,
    inputs=None,
    input_shapes=None,
    max_tensor_bytes: int | None = None,
    backend: str = "ort",
    device: str = "cpu",
    output: str | None = None,
    status=None,
) -> dict[str, Any] | None:
    """Profile the input model and the optimized one on the same inputs and backend
    (None when there is no input file to profile)."""
    from gcomp.inputs import generate_inputs, load_inputs

    if source is None:
        return None
    given = load_inputs(inputs, result.model) if inputs else None
    kwargs = {"max_bytes": max_tensor_bytes} if max_tensor_bytes is not None else {}
    feeds, _ = generate_inputs(result.model, shapes=dict(input_shapes or {}), given=given, **kwargs)
    before, _ = profile_model(
        source,
        backend=backend,
        device=device,
        iters=iters,
        warmup=warmup,
        feeds=feeds,
        status=status,
    )
    optimized = output if output is not None else result.model
    after, _ = profile_model(
        optimized,
        backend=backend,
        device=device,
        iters=iters,
        warmup=warmup,
        feeds=feeds,
        status=status,
    )
    speed = interleaved_speed(source, optimized, feeds, backend=backend, device=device, status=status)
    return {"before": before.to_dict(), "after": after.to_dict(), "speed": speed}


# The interleaved before/after timing: this many block pairs, sized to about this budget.
SPEED_BLOCKS = 12
SPEED_BUDGET_MS = 3000.0


def interleaved_speed(before, after, feeds, *, backend: str = "ort", device: str = "cpu",
                      blocks: int = SPEED_BLOCKS, budget_ms: float = SPEED_BUDGET_MS, status=None) -> dict[str, Any]:
    """Time ``before`` and ``after`` (paths or ``ir.Model``) in one process, in alternating
    blocks (:func:`gcomp.runtime.time_interleaved`), and word the result by the rule of
    :mod:`gcomp.report.speed`. Blocks hold 3-25 runs, as many as fit ``budget_ms`` in all."""
    from gcomp.backends import get_backend
    from gcomp.report.speed import speed_summary
    from gcomp.runtime import time_interleaved

    if status:
        status(f"timing before and after interleaved on {backend}/{device}")
    a = get_backend(backend).compile(before, device)
    b = get_backend(backend).compile(after, device)
    one_ms = max(_one_run_ms(a, feeds), _one_run_ms(b, feeds), 1e-3)
    block = int(min(25, max(3, budget_ms / (2 * blocks * one_ms))))
    timing = time_interleaved(a, b, feeds, blocks=blocks, block=block)
    return speed_summary(timing.a_ms, timing.b_ms, timing.block_ratios, block=block,
                         backend=f"{backend}/{device}")


def _one_run_ms(exe, feeds, runs: int = 3) -> float:
    """The fastest of ``runs`` timed runs after an untimed one (the first run pays for
    allocation; one slow run on a busy machine must not shrink every block to 3 runs)."""
    import time

    exe.run(feeds)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        exe.run(feeds)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def load_profiles(paths: list[Path]) -> list[dict[str, Any]]:
    """Saved profile documents, checked enough to render them."""
    from gcomp.perf import SCHEMA_VERSION

    docs = []
    major = SCHEMA_VERSION.split(".")[0]
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise OptionError(f"{p}: no such file")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GcompError(f"{p}: not a JSON file ({e})") from None
        if not isinstance(doc, dict) or "schema_version" not in doc:
            raise GcompError(f"{p}: not a gcomp report (no schema_version)")
        if str(doc["schema_version"]).split(".")[0] != major:
            raise GcompError(
                f"{p}: schema {doc['schema_version']} is not readable by this gcomp (schema {SCHEMA_VERSION})"
            )
        if doc.get("kind") == "optimize" and doc.get("profiles"):
            docs.extend([doc["profiles"]["before"], doc["profiles"]["after"]])
            continue
        if doc.get("kind") != "profile":
            raise GcompError(
                f"{p}: a gcomp {doc.get('kind')} report, not a profile (write one with gcomp profile --report x.json)"
            )
        for key in ("model", "backend", "latency", "ops"):
            if key not in doc:
                raise GcompError(f"{p}: profile has no '{key}'")
        docs.append(doc)
    return docs
