"""``gcomp profile``, ``gcomp compile`` and ``gcomp report``: measure, compile, compare.

``profile`` times a model and its ops on a backend (:mod:`gcomp.profiling`),
``compile`` compiles (and tunes) it and exports the artifact (:mod:`gcomp.autoselect`),
``report`` puts saved profiles side by side (:mod:`gcomp.report`). With ``--backend auto``
the first two choose the fastest backend whose outputs match the reference. With ``-q``
they print nothing but errors when they write a file (``--report``, ``-o``), else their
answer in one line; ``-v`` prints each step as a timed line instead of the spinner.
"""

from __future__ import annotations

__all__ = ["compile_", "profile", "report"]

import json
from pathlib import Path

import click

from gcomp.cli.group import CONTEXT, PathIn, Say, cli, input_options, stderr, stdout, verbosity_options
from gcomp.cli.providers import provider_options
from gcomp.errors import OptionError


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("--backend", type=click.Choice(["ort", "tvm", "auto"]), default="ort", show_default=True,
              help="Runtime to profile on; auto: the fastest that matches the reference (all are recorded).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu or cuda; for ONNX Runtime, --device cuda means --provider CUDAExecutionProvider.")
@provider_options
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="ONNX Runtime graph optimization level.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads (0: runtime default).")
@input_options
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Ops to list.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Write the profile: .json, .md or .html (a self-contained page with charts).")
@click.option("--trace", type=click.Path(path_type=Path), default=None,
              help="Write one profiled run as a Chrome/Perfetto trace (.json).")
@click.option("--decode", type=click.IntRange(min=2), default=None, metavar="N",
              help="A decoder LLM: decode N tokens greedily with its KV cache (ONNX Runtime) and report the "
                   "prefill latency, decode tokens/s, the last decode step's per-op profile and the KV cache's memory.")
@click.option("--prompt-ids", default=None, metavar="ID,ID,...",
              help="--decode: the prompt as token ids. [default: 16 seeded ids from the vocabulary]")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON on stdout (implies --quiet).")
def profile(model, backend, device, iters, warmup, optimization, threads, inputs, input_shapes, max_tensor_bytes,
            verify_timeout, top, report, as_json, trace=None, quiet=False, verbose=False, provider=None,
            provider_option=(), decode=None, prompt_ids=None):
    """Measure MODEL's latency and per-op times on a backend.

    Each op row gets its FLOPs, bytes moved, achieved GFLOP/s and GB/s, and whether it is
    compute- or memory-bound on this machine's roofline. With --decode N, MODEL is a
    decoder LLM: the profile is of its decode steps (see gcomp generate).
    """
    from gcomp import io
    from gcomp import report as reports
    from gcomp.cli.providers import chosen_provider
    from gcomp.inputs import generate_inputs, load_inputs, parse_input_shapes
    from gcomp.profiling import finish_profile, print_profile, write_outputs

    say = Say(quiet, verbose, json=as_json)
    quiet = quiet or as_json
    provider, options = chosen_provider(provider, provider_option, device=device, backend=backend)
    if provider is not None and backend == "ort":
        from gcomp.backends.ort_providers import short_name

        device = short_name(provider)
    if report is not None:
        reports.check_report_path(report)
    if trace is not None:
        reports.check_report_path(trace, option="--trace", formats=(".json",))
    m = io.load(model)
    if decode is not None or prompt_ids is not None:
        return _profile_decode(model, m, decode, prompt_ids, backend=backend, provider=provider or device,
                               options=options, optimization=optimization, threads=threads, iters=iters,
                               warmup=warmup, top=top, report=report, trace=trace, as_json=as_json, say=say,
                               given=inputs is not None or bool(input_shapes))
    given = load_inputs(inputs, m) if inputs else None
    feeds, notes = generate_inputs(m, shapes=parse_input_shapes(input_shapes), given=given, max_bytes=max_tensor_bytes)
    with say.progress(f"compiling for {backend}/{device}") as status:
        from gcomp.autoselect import compile_for_profile

        exe, selection = compile_for_profile(backend, device, model, m, feeds, optimization=optimization,
                                             threads=threads or None, provider=provider,
                                             provider_options=options, progress=status)
        if selection is not None:
            backend, device = selection.chosen.backend, selection.chosen.target
        status(f"profiling on {backend}/{device}: {warmup} warm-up + {iters} timed runs, then per-op times")
        prof = exe.profile(feeds, iters=iters, warmup=warmup)
        prof = finish_profile(prof, m, feeds, path=model, status=status)
    doc = prof.to_dict()
    if selection is not None:
        doc["backend_selection"] = selection.to_dict()
    written = write_outputs(doc, report=report, trace=trace)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    if quiet:  # the latency is the answer when no file holds it
        if not written:
            lat = prof.latency
            click.echo(f"{model} on {backend}/{device}: p50 {lat.p50_ms:.3f} ms, min {lat.min_ms:.3f} ms "
                       f"over {iters} runs")
        return
    out = stdout()
    for note in notes:
        out.print(f"note: {note}")
    print_profile(prof, title=f"{model} on {backend}/{device} ({optimization} optimizations)", top=top, console=out)
    for c in (selection.candidates if selection is not None else []):
        figure = f"p50 {c.p50_ms:.3f} ms" if c.p50_ms is not None else c.error
        out.print(f"backend {'*' if c.chosen else ' '} {c.backend}/{c.target}: {c.status}, {figure}", soft_wrap=True,
                  markup=False)
    if written:
        stderr().print("wrote " + " and ".join(str(p) for p in written))
    say.done()


def _profile_decode(model, m, decode, prompt_ids, *, backend, provider, options, optimization, threads, iters,
                    warmup, top, report, trace, as_json, say, given) -> None:
    """``profile --decode N``: the decode figures, then the last decode step's profile."""
    from gcomp import decode as decoding
    from gcomp.cli.generate import parse_token_ids
    from gcomp.profiling import print_profile, write_outputs

    if decode is None:
        raise OptionError("--prompt-ids is for --decode N")
    if backend != "ort":
        raise OptionError(f"--decode runs on ONNX Runtime: use --backend ort, not {backend}")
    if given:
        raise OptionError("--decode makes its own inputs (a prompt, then one token per step): "
                          "--inputs and --input-shape do not apply")
    layout = decoding.layout_of(m)
    prompt = parse_token_ids(prompt_ids) if prompt_ids is not None else decoding.default_prompt(layout, decode)
    with say.progress(f"decoding on ort/{provider}") as status:
        prof, gen = decoding.profile_decode(model, m, prompt, decode, target=provider, optimization=optimization,
                                            threads=threads or None, provider_options=options, iters=iters,
                                            warmup=warmup, status=status)
    doc = {**prof.to_dict(), "decode": gen.to_dict()}
    written = write_outputs(doc, report=report, trace=trace)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    if say.quiet:
        if not written:
            click.echo(f"{model}: {_decode_line(doc['decode'])}")
        return
    out = stdout()
    for note in gen.notes:
        out.print(f"note: {note}", markup=False, soft_wrap=True)
    step = (f"1 token after {gen.cache_length - 1} cached" if gen.cache_length is not None
            else f"the whole {len(prompt) + decode - 1} tokens again, no cache")
    print_profile(prof, title=f"{model}: the last decode step ({step}) on ort/{provider} ({optimization} "
                              "optimizations)", top=top, console=out)
    out.print(_decode_line(doc["decode"]), markup=False, soft_wrap=True)
    if written:
        stderr().print("wrote " + " and ".join(str(p) for p in written))
    say.done()


def _decode_line(d: dict) -> str:
    """prefill, decode rate and KV-cache memory in one line."""
    from gcomp.report.units import human_bytes

    kv = d["kv_cache"]
    cache = (f"KV cache {human_bytes(kv['bytes'])} at {kv['positions']} positions "
             f"({human_bytes(kv['bytes_per_token'])} per token)" if kv else "no KV cache")
    return (f"decode: prefill {d['prefill_ms']:.2f} ms ({d['prompt_tokens']} tokens); {d['new_tokens']} new tokens, "
            f"{d['decode_tokens_per_s']:.1f} tokens/s (median of {d['decode_steps']} step{'s' * (d['decode_steps'] != 1)}); "
            f"{cache}")


@cli.command("compile", context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("--backend", type=click.Choice(["tvm", "ort", "auto"]), default="tvm", show_default=True,
              help="Backend to compile for; auto: the fastest that matches the reference.")
@click.option("--target", default="llvm", show_default=True,
              help="tvm: llvm (this CPU, its real features) or cuda; ort: cpu or cuda.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact: a folder (tvm: model.so + gcomp-tvm.json) or an .onnx file (ort).")
@click.option("--tune-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="MetaSchedule trials split over the model's kernels (tvm); each kernel gets only the "
                   "trials the tuning database has not given it yet, so a repeat makes none.")
@click.option("--tune-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop tuning after this many minutes (finished kernels are kept).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Tuning database root. [default: $GCOMP_CACHE_DIR or ~/.cache/gcomp]")
@click.option("--inputs", "inputs", type=click.Path(path_type=Path), default=None,
              help="Inputs: an .npz file or an ONNX test_data_set folder of input_*.pb.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Shape to compile for (repeatable); symbolic dims are bound to it.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the executable's outputs against ONNX Runtime before writing.")
@click.option("--weights", type=click.Choice(["embedded", "separate"]), default="embedded", show_default=True,
              help="tvm: weights inside model.so, or beside it in weights.safetensors (model.so holds code only).")
@click.option("--cuda-arch", default=None, metavar="sm_XY",
              help="tvm --target cuda: GPU architecture to generate code for (e.g. sm_90). "
                   "[default: this machine's GPU, else sm_80]")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def compile_(model, backend, target, output, tune_trials, tune_minutes, cache_dir, inputs, input_shapes, verify,
             as_json, weights="embedded", cuda_arch=None, quiet=False, verbose=False):
    """Compile MODEL for a backend (tuning it with --tune-trials) and export the artifact."""
    from gcomp.autoselect import compile_model
    from gcomp.inputs import parse_input_shapes

    say = Say(quiet, verbose, json=as_json)
    if backend == "ort" and target == "llvm":
        target = "cpu"
    tvm_options = {"weights": weights, "cuda_arch": cuda_arch}
    if backend != "tvm" and weights != "embedded":
        raise OptionError(f"--weights {weights} is for --backend tvm")
    if cuda_arch is not None:
        _check_cuda_arch(backend, target, cuda_arch)
    with say.progress(f"compiling for {backend}/{target}") as status:
        doc = compile_model(model, backend=backend, target=target, output=output,
                            input_shapes=parse_input_shapes(input_shapes), inputs=inputs, tune_trials=tune_trials,
                            tune_seconds=tune_minutes * 60 if tune_minutes else None, cache_dir=cache_dir,
                            verify=verify, progress=status, tvm_options=tvm_options)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    elif quiet:  # the verdict is the answer when no artifact holds it
        if not doc["output"]:
            click.echo(_compiled_line(doc))
    else:
        _print_compiled(doc)
    say.done()


def _check_cuda_arch(backend: str, target: str, arch: str) -> None:
    """--cuda-arch only with --backend tvm --target cuda, spelled as nvcc spells it."""
    from gcomp.backends.tvm.targets import check_cuda_arch
    from gcomp.errors import BackendError

    if backend != "tvm" or target not in ("cuda", "gpu"):
        raise OptionError("--cuda-arch is for --backend tvm --target cuda")
    try:
        check_cuda_arch(arch)
    except BackendError as e:
        raise OptionError(f"--cuda-arch: {str(e).removeprefix('tvm: ')}") from None


def _compiled_line(doc: dict) -> str:
    v = doc["verification"]
    return (f"compiled for {doc['backend']}/{doc['target']} in {doc['compile_seconds']:.1f} s; verification "
            + (f"{v['status']} (max abs error {v['max_abs_error']:.2g})" if "max_abs_error" in v else v["status"]))


def _print_compiled(doc: dict) -> None:
    """Notes, backend candidates, tuning and verification of a ``compile_model`` summary."""
    out = stdout()
    for note in doc["notes"]:
        out.print(f"note: {note}")
    if doc["selection"]:
        for c in doc["selection"]["candidates"]:
            figure = f"p50 {c['p50_ms']:.3f} ms" if c["p50_ms"] is not None else c["error"]
            out.print(f"  {'*' if c['chosen'] else ' '} {c['backend']}/{c['target']}: {c['status']}, {figure}",
                      soft_wrap=True, markup=False)
    t = doc["tuning"]
    if t:
        out.print(f"tuning: {t['tasks']} kernels, {t['reused']} from the database, {t['tuned']} tuned with "
                  f"{t['trials']} trials in {t['seconds']:.1f} s, {t['skipped']} left untuned"
                  + (" (interrupted)" if t["interrupted"] else "") + f"; database {t['database']}")
    out.print(_compiled_line(doc))
    art = doc.get("artifact") or {}
    if art.get("cuda_code") == "source":
        out.print("note: no nvcc found, so the artifact holds CUDA C source, which TVM's runtime cannot load: "
                  "install nvidia-cuda-nvcc (or put nvcc on PATH) and compile again", soft_wrap=True, markup=False)
    elif art.get("cuda_code"):
        kinds = ", ".join(f"{k} sm_{a}" for k, a in art.get("fatbin", []))
        out.print(f"CUDA kernels for {art.get('cuda_arch')} compiled by nvcc ({kinds})", markup=False)
    if doc["output"]:
        stderr().print(f"wrote {doc['output']}")


@cli.command(context_settings=CONTEXT)
@click.argument("profiles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the comparison: .html, .md or .json.")
@click.option("--label", "labels", multiple=True, help="A name per profile, in order (repeatable).")
@verbosity_options
def report(profiles, output, labels, quiet=False, verbose=False):
    """Compare saved profiles (gcomp profile --report x.json) in one report.

    E.g. two backends, two versions of a model, before/after an optimization; the first
    profile is the baseline. An optimize report with profiles counts as its two profiles.
    """
    from gcomp import report as reports
    from gcomp.profiling import load_profiles

    say = Say(quiet, verbose)
    reports.check_report_path(output, option="--output")
    docs = load_profiles(list(profiles))
    say.step(f"read {len(docs)} profile(s)")
    if labels and len(labels) != len(docs):
        raise OptionError(f"--label given {len(labels)} times for {len(docs)} profiles")
    reports.write_report(reports.compare_document(docs, list(labels) or None), output)
    if not quiet:
        stderr().print(f"wrote {output}", markup=False)
    say.done()
