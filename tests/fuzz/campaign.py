"""A fuzz campaign from the command line; failing cases are saved for reproduction.

    .venv/bin/python -m tests.fuzz.campaign --cases 1000 --seed 7 --jobs 2
    .venv/bin/python -m tests.fuzz.campaign --cases 600 --seed 1 --gcomp-args "--quantize int8-dynamic --no-speed-gate"
    .venv/bin/python -m tests.fuzz.campaign --replay /tmp/gcomp-fuzz/seed-7/failures/00042-cycle-cnn.onnx
    .venv/bin/python -m tests.fuzz.campaign --case /tmp/gcomp-fuzz/seed-7/failures/00042-cycle-cnn.json

Prints progress, then the counts (success / gcomp_error / bug / crash / hang by mutation
kind) and the first failures. Every bug, crash and hang is written to
``OUT/failures/<index>-<kind>-<seed>.onnx`` with a ``.json`` beside it (the case, which
re-creates the same bytes, what the mutation did, the pass-through arguments, and each
command's outcome, message and traceback); ``OUT/results.jsonl`` has one line per case
and ``OUT/summary.txt`` the counts. Exit status: 0 when nothing failed, 1 otherwise
(2 for pass-through arguments ``gcomp optimize`` does not accept).

``--gcomp-args "ARGS"`` passes gcomp's own options through: the string is split like a
shell command line (``shlex``) and appended to every ``gcomp optimize`` the harness runs
(the in-process ``-O 0/1/3`` commands of each case, which go through the CLI's own click
code, and the real command of the CLI check); ``gcomp inspect`` takes none. The harness
checks them with ``gcomp optimize``'s parser before the first case, and refuses those
that would change the model, the output or the pipeline level it sets (``-o``, ``-O``,
``--passes``). A GcompError they lead to (gcomp declining to quantize, say:
``QuantizationDeclined``) is a clean ``gcomp_error``. Each case records them
(``gcomp_args`` in ``results.jsonl`` and in a saved case's ``.json``); the summary names
them and counts the quantized outputs. ``--case FILE.json`` and ``--replay FILE.onnx``
(with its ``.json`` beside it) rerun with the recorded arguments, unless ``--gcomp-args``
is given (``--gcomp-args ""``: none).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from tests.fuzz.runner import DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S

    p = argparse.ArgumentParser(prog="python -m tests.fuzz.campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000, help="number of cases (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed: same seed, same cases")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a command of a case may run before it is a hang (default 20)")
    p.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_BYTES / 2**30,
                   help="address-space limit of a worker, GiB (0: none)")
    p.add_argument("--kinds", default="", help="comma-separated mutation kinds (default: all)")
    p.add_argument("--gcomp-args", default=None, metavar="ARGS",
                   help='options appended to every `gcomp optimize`, one shell-quoted string, e.g. '
                        '"--quantize int8-dynamic --no-speed-gate" (default: none; --case/--replay: as recorded)')
    p.add_argument("--cli-sample", type=int, default=20,
                   help="cases rejected with a GcompError to re-run through the real `gcomp` command")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: <tmp>/gcomp-fuzz/seed-N)")
    p.add_argument("--replay", type=Path, nargs="+", help="run these .onnx files instead of a campaign")
    p.add_argument("--case", type=Path, nargs="+", help="re-create and run cases from their saved .json")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def _given_args(args: argparse.Namespace) -> list[str] | None:
    """The pass-through from the command line, checked; None when ``--gcomp-args`` is absent."""
    from tests.fuzz.runner import check_gcomp_args

    return None if args.gcomp_args is None else check_gcomp_args(shlex.split(args.gcomp_args))


def _recorded_args(saved: Path) -> list[str]:
    """The pass-through a saved case ran with (none for a file from before it was recorded)."""
    from tests.fuzz.runner import check_gcomp_args

    if not saved.exists():
        return []
    return check_gcomp_args(json.loads(saved.read_text()).get("gcomp_args") or [])


def _replay(paths: list[Path], args: argparse.Namespace) -> int:
    from tests.fuzz.runner import FAILURES, run_file

    given = _given_args(args)
    failed = 0
    for path in paths:
        gcomp_args = given if given is not None else _recorded_args(path.with_suffix(".json"))
        if gcomp_args:
            print(f"{path.name}: gcomp optimize ... {shlex.join(gcomp_args)}")
        for r in run_file(path, timeout=args.timeout, memory_bytes=_memory(args), gcomp_args=gcomp_args):
            failed += r.outcome in FAILURES
            print(f"{path.name}: {r.op}: {r.outcome} {r.error_type or ''} {r.message or ''}".rstrip())
            if r.outcome in FAILURES and r.traceback:
                # a bug: the innermost frames; a crash or hang: the worker's log tail (its stack, innermost first)
                lines = r.traceback.strip().splitlines()
                print("    " + "\n    ".join(lines[-12:] if r.outcome == "bug" else lines))
    return 1 if failed else 0


def _memory(args: argparse.Namespace) -> int | None:
    return int(args.memory_gb * 2**30) or None


def _batches(args: argparse.Namespace) -> list[tuple[list[str], list]]:
    """(pass-through, cases) to run: one batch for a campaign; saved cases grouped by what they recorded."""
    from tests.fuzz.mutations import Case, draw_cases

    given = _given_args(args)
    if not args.case:
        kinds = [k for k in args.kinds.split(",") if k] or None
        return [(given or [], draw_cases(args.cases, seed=args.seed, kinds=kinds))]
    batches: dict[tuple[str, ...], list] = {}
    for path in args.case:
        case = Case.from_dict(json.loads(path.read_text())["case"])
        batches.setdefault(tuple(given if given is not None else _recorded_args(path)), []).append(case)
    return [(list(gcomp_args), cases) for gcomp_args, cases in batches.items()]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from tests.fuzz.mutations import materialize
    from tests.fuzz.runner import (
        FAILURES,
        cli_check,
        format_failures,
        run_cases,
        save_case,
        summarize,
    )

    try:
        if args.replay:
            return _replay(args.replay, args)
        batches = _batches(args)
    except ValueError as e:  # pass-through arguments gcomp optimize does not take
        print(f"campaign: error: {e}", file=sys.stderr)
        return 2
    total = sum(len(cases) for _, cases in batches)
    out = args.out or Path(tempfile.gettempdir()) / "gcomp-fuzz" / f"seed-{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    failures = out / "failures"
    log = (out / "results.jsonl").open("w")
    counts: Counter = Counter()
    t0 = time.perf_counter()

    def on_result(r) -> None:
        counts[r.outcome] += 1
        log.write(json.dumps(r.to_dict()) + "\n")
        log.flush()
        if r.outcome in FAILURES:
            save_case(r, failures, materialize(r.case)[0])
        done = sum(counts.values())
        if r.outcome in FAILURES and not args.quiet:
            first = r.failures()[0]
            print(f"  {r.outcome.upper()}: {r.case.label}: {first.op}: {first.error_type}: "
                  f"{(first.message or '')[:160]}", flush=True)
        if not args.quiet and (done % 50 == 0 or done == total):
            rate = (time.perf_counter() - t0) / done
            print(f"[{done}/{total}] " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                  + f"  ({rate:.2f} s/case)", flush=True)

    print(f"gcomp fuzz: {total} cases, seed {args.seed}, {args.jobs} job(s), "
          f"timeout {args.timeout:g} s per command; results in {out}", flush=True)
    results = []
    for gcomp_args, cases in batches:
        if gcomp_args:
            print(f"gcomp optimize pass-through: {shlex.join(gcomp_args)} ({len(cases)} case(s))", flush=True)
        results += run_cases(cases, jobs=args.jobs, timeout=args.timeout, memory_bytes=_memory(args),
                             workdir=out / "work", on_result=on_result, gcomp_args=gcomp_args)
    if args.cli_sample:
        for r in cli_check(results, sample=args.cli_sample, jobs=args.jobs):
            log.write(json.dumps({"cli": r.case.label, "gcomp_args": r.gcomp_args, **r.to_dict()["cli"]}) + "\n")
            if not r.cli.ok:
                save_case(r, failures, materialize(r.case)[0])
    log.close()
    seconds = time.perf_counter() - t0
    summary = summarize(results, seconds)
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    failing = [r for r in results if r.outcome in FAILURES]
    if failing:
        print(f"\n{len(failing)} failing case(s), saved under {failures}:")
        print(format_failures(results, limit=20))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
