"""Running gcomp on fuzz cases in a worker process; the parent owns the clock.

Each case is written to a temporary file and run, in a worker process, through the CLI's
own code (``gcomp.cli.cli.main(..., standalone_mode=False)``: exactly what the ``gcomp``
command runs, minus the ``sys.exit`` mapping of errors) as

    gcomp optimize MODEL -o OUT -O 0 -q      (verification on, the default)
    gcomp optimize MODEL -o OUT -O 1 -q
    gcomp optimize MODEL -o OUT -O 3 -q      (fusion for ort-cpu)
    gcomp inspect MODEL --json

followed, on every ``optimize`` (and on the real command of :func:`cli_check`), by the
campaign's pass-through arguments, if any (``gcomp_args``: e.g. ``--quantize int8-dynamic
--no-speed-gate``; :func:`check_gcomp_args` parses them with the command's own click
parser first). Each case records them (``CaseResult.gcomp_args``), and each successful
``optimize`` records the quantization mode its output carries (``OpResult.quantized``,
the output's ``gcomp.quantize`` metadata), so a run shows whether the arguments took effect.
Each run is classified (:data:`OUTCOMES`, mildest first; a case counts as its worst):

- ``success``: it returned; ``optimize`` wrote OUT, which ``onnx.load`` reads and
  ``onnx.checker.check_model`` accepts; ``inspect`` printed JSON;
- ``gcomp_error``: a :class:`gcomp.errors.GcompError` whose message is one line, not
  empty, and names something concrete (the file, a quoted name, a number); gcomp
  declining to quantize (``gcomp.quantize.QuantizationDeclined``) is one of these;
- ``bug``: any other exception (type, message, traceback recorded), a GcompError with a
  bad message, an output that fails to load or check, no output, ``inspect`` not JSON;
- ``crash``: the worker died (signal or exit code; the tail of its stderr is kept,
  with the Python stack that ``faulthandler`` writes on a fatal signal);
- ``hang``: a command of the case ran past the timeout (each gets the full timeout, so
  a slow command does not push the next one into a false hang). The parent asks the
  worker for its Python stack (:data:`DUMP_SIGNAL`; kept like a crash's), kills the
  worker (a Python-level timeout cannot interrupt ONNX Runtime's native code) and
  starts a fresh one; the case's remaining commands are not run.

The worker runs with an address-space limit (4 GiB by default): a runaway allocation
fails inside it (``MemoryError``, a ``bug``; or ONNX Runtime aborting, a ``crash``)
instead of exhausting the machine: the fuzzed models are a few MB at most.

The worker is a ``spawn`` process (no state inherited from the parent) talking over a
pipe. :func:`run_cases` drives ``jobs`` workers from threads. :func:`cli_check` runs a
sample of the rejected models through the real ``gcomp`` command in a subprocess: one
``gcomp: error:`` line on stderr, exit status non-zero, nothing written.
"""

from __future__ import annotations

__all__ = [
    "FAILURES",
    "OPS",
    "OUTCOMES",
    "CaseResult",
    "CliCheck",
    "OpResult",
    "Worker",
    "check_gcomp_args",
    "cli_check",
    "format_failures",
    "run_cases",
    "run_file",
    "save_case",
    "signature",
    "summarize",
]

import contextlib
import io
import json
import multiprocessing
import os
import queue
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

OPS = ("optimize-O0", "optimize-O1", "optimize-O3", "inspect")
OUTCOMES = ("success", "gcomp_error", "bug", "crash", "hang")
FAILURES = ("bug", "crash", "hang")
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MEMORY_BYTES = 4 << 30  # address space of a worker (ORT reserves some virtual memory up front)
START_TIMEOUT_S = 120.0  # a cold worker imports onnx, onnx-ir, onnxruntime and gcomp
DUMP_SIGNAL = signal.SIGUSR1  # a worker writes its Python stack to its log on this signal


@dataclass
class OpResult:
    op: str
    outcome: str
    seconds: float = 0.0
    error_type: str | None = None  # exception class, "InvalidOutput", "SIGSEGV", "timeout", ...
    message: str | None = None
    traceback: str | None = None
    cause: str | None = None  # for a GcompError: the type of the exception it wraps, if any
    quantized: str | None = None  # a successful optimize: the output's "gcomp.quantize" metadata (the mode)


@dataclass
class CaseResult:
    case: Any  # a mutations.Case
    description: str
    size: int
    ops: list[OpResult] = field(default_factory=list)
    cli: CliCheck | None = None
    gcomp_args: list[str] = field(default_factory=list)  # appended to every `gcomp optimize`

    @property
    def outcome(self) -> str:
        worst = max((OUTCOMES.index(o.outcome) for o in self.ops if o.outcome in OUTCOMES), default=0)
        if self.cli is not None and not self.cli.ok:
            worst = max(worst, OUTCOMES.index("bug"))
        return OUTCOMES[worst]

    def failures(self) -> list[OpResult]:
        return [o for o in self.ops if o.outcome in FAILURES]

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.to_dict() if hasattr(self.case, "to_dict") else str(self.case),
            "description": self.description,
            "gcomp_args": list(self.gcomp_args),
            "bytes": self.size,
            "outcome": self.outcome,
            "ops": [asdict(o) for o in self.ops],
            "cli": asdict(self.cli) if self.cli else None,
        }


@dataclass
class CliCheck:
    ok: bool
    returncode: int | None
    stderr: str
    problem: str = ""


VERIFY_TIMEOUT_S = 5

# --------------------------------------------------------------------------- the worker side

def _gcomp_args(op: str, model: str, out: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line of ``op``; ``extra`` (the pass-through) follows every ``optimize``."""
    if op == "inspect":
        return ["inspect", model, "--json"]
    level = op.rsplit("-O", 1)[1]
    # Verification's own deadline, well inside the harness's per-case timeout: a model
    # whose reference run never ends must come back "unverified", not hang.
    return ["optimize", model, "-o", out, "-O", level, "-q", "--verify-timeout", str(VERIFY_TIMEOUT_S), *extra]


# What the harness itself sets on each optimize: the pass-through must leave them alone.
_HARNESS_PARAMS = {"model": "MODEL", "output": "OUT", "level": "1", "pass_spec": None}


def check_gcomp_args(extra: Sequence[str]) -> list[str]:
    """``extra`` as a list, once ``gcomp optimize``'s own click parser accepts it after the
    harness's arguments; ValueError (one line) if it does not, or if it would change the
    model, the output or the pipeline level that the harness sets."""
    import click

    from gcomp.cli import cli

    command = cli.commands["optimize"]
    if {"-h", "--help"} & set(extra):  # would print the help and stop every command
        raise ValueError(f"--gcomp-args {' '.join(extra)!r}: asks for the help, not a run")
    argv = _gcomp_args("optimize-O1", "MODEL", "OUT", extra)[1:]
    try:
        with command.make_context("optimize", list(argv)) as ctx:
            params = dict(ctx.params)
    except click.ClickException as e:
        raise ValueError(f"--gcomp-args {' '.join(extra)!r}: {e.format_message()}") from None
    changed = [name for name, value in _HARNESS_PARAMS.items()
               if (None if params.get(name) is None else str(params[name])) != value]
    if changed:
        raise ValueError(f"--gcomp-args {' '.join(extra)!r}: sets {', '.join(changed)}, which the harness "
                         "sets itself (each case runs -O 0, 1 and 3 on its own model and output)")
    return list(extra)


def message_problem(message: str, model_path: str) -> str | None:
    """What is wrong with a GcompError's message, or None: one line, not empty, concrete."""
    text = message.strip()
    if not text:
        return "empty message"
    if "\n" in text:
        return f"message spans {len(text.splitlines())} lines"
    concrete = (
        Path(model_path).name in text
        or re.search(r"'[^']+'|\"[^\"]+\"|\d", text) is not None
    )
    if not concrete or len(text) < 12:
        return "message names nothing concrete (no file, quoted name or number)"
    return None


def _check_output(out: str) -> tuple[str | None, str | None]:
    """(what is wrong with the output or None, the quantization mode its metadata names or None)."""
    import onnx

    if not os.path.exists(out):
        return "returned without error but wrote no output", None
    try:
        model = onnx.load(out)
        onnx.checker.check_model(out)
    except Exception as e:  # noqa: BLE001 - any failure to read back the output is the finding
        return f"output does not load/check: {type(e).__name__}: {_one_line(e)}", None
    return None, next((p.value for p in model.metadata_props if p.key == "gcomp.quantize"), None)


def _one_line(e: BaseException | str, limit: int = 500) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_op(op: str, model: str, out: str, extra: Sequence[str] = ()) -> OpResult:
    """Run one gcomp command (``extra`` after an optimize's own arguments) in this process
    and classify it (never raises)."""
    from click import ClickException

    from gcomp.cli import cli
    from gcomp.errors import GcompError

    stdout = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(stdout):
            if op.startswith("_selftest:"):  # the harness's own tests: misbehave on purpose
                _selftest(op.split(":", 1)[1], model)
            cli.main(args=_gcomp_args(op, model, out, extra), prog_name="gcomp", standalone_mode=False)
    except GcompError as e:
        seconds = time.perf_counter() - t0
        message = str(e)
        cause = type(e.__cause__).__name__ if e.__cause__ is not None else None
        problem = message_problem(message, model)
        if problem:
            return OpResult(op, "bug", seconds, f"{type(e).__name__} (bad message: {problem})", message,
                            traceback.format_exc(), cause)
        tb = "".join(traceback.format_exception(e.__cause__)) if e.__cause__ is not None else None
        return OpResult(op, "gcomp_error", seconds, type(e).__name__, message, tb, cause)
    except ClickException as e:  # a usage error: the harness passes valid arguments
        return OpResult(op, "bug", time.perf_counter() - t0, type(e).__name__, e.format_message(),
                        traceback.format_exc())
    except BaseException as e:  # noqa: BLE001 - everything else is a bug in gcomp (SystemExit included)
        return OpResult(op, "bug", time.perf_counter() - t0, type(e).__name__, _one_line(e) or "(no message)",
                        traceback.format_exc())
    seconds = time.perf_counter() - t0
    if op == "inspect":
        try:
            info = json.loads(stdout.getvalue())
            missing = {"opsets", "inputs", "outputs"} - set(info)
            problem = f"JSON lacks {sorted(missing)}" if missing else None
        except ValueError as e:
            problem = f"not JSON: {e}"
        if problem:
            return OpResult(op, "bug", seconds, "BadInspectOutput", problem)
        return OpResult(op, "success", seconds)
    problem, quantized = _check_output(out)
    if problem:
        return OpResult(op, "bug", seconds, "InvalidOutput", problem)
    return OpResult(op, "success", seconds, quantized=quantized)


def _selftest(what: str, model: str) -> None:
    from gcomp.errors import GcompError

    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif what == "exit":
        os._exit(7)
    elif what == "hang":
        while True:
            time.sleep(1)
    elif what == "raise":
        raise KeyError("selftest")
    elif what == "gcomp_error":
        raise GcompError(f"{model}: selftest error in node 'n'")
    elif what == "bad_message":
        raise GcompError("failed\nbadly")
    raise ValueError(f"unknown selftest {what!r}")


def _serve(conn, memory_bytes: int | None, log_path: str) -> None:
    """The worker's main loop: receive (op, model, out, extra), send an OpResult, until None or EOF."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)  # native code (ONNX Runtime, protobuf) writes here; kept for crash reports
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import faulthandler

    # The Python stack goes to the log on a fatal signal, and on DUMP_SIGNAL, which the
    # parent sends before it kills a hung worker: a crash or a hang shows where it was.
    log_file = os.fdopen(os.dup(2), "w")
    faulthandler.enable(log_file, all_threads=True)
    faulthandler.register(DUMP_SIGNAL, log_file, all_threads=True)
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("onnx_ir", "onnxscript"):  # as gcomp.cli.main does
        logging.getLogger(name).setLevel(logging.ERROR)
    import onnx  # noqa: F401 - import the heavy modules before reporting ready
    import onnxruntime  # noqa: F401

    import gcomp.cli
    import gcomp.pipeline  # noqa: F401

    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        op, model, out, extra = job
        os.write(2, f"\n=== {shlex.join([op, model, *extra])}\n".encode())
        conn.send(run_op(op, model, out, extra))


# --------------------------------------------------------------------------- the parent side

class Worker:
    """One worker process; ``call`` runs an op under a deadline, restarting it as needed."""

    def __init__(self, log_dir: str | os.PathLike, *, memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
                 context: str = "spawn", name: str = "worker") -> None:
        self.ctx = multiprocessing.get_context(context)
        self.memory_bytes = memory_bytes
        self.log_path = str(Path(log_dir) / f"{name}.stderr.log")
        self.process = None
        self.conn = None
        self.starts = 0

    def start(self) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        self.process = self.ctx.Process(target=_serve, args=(child, self.memory_bytes, self.log_path), daemon=True)
        self.process.start()
        child.close()  # so that the worker's death shows as EOF here
        self.conn = parent
        self.starts += 1
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"fuzz worker did not start within {START_TIMEOUT_S:.0f} s (log: {self.log_path})")
        try:
            self.conn.recv()
        except EOFError:
            self.process.join(5)
            code = self.process.exitcode
            self.kill()
            raise RuntimeError(f"fuzz worker died while starting (exit {code}; log: {self.log_path})") from None

    def call(self, op: str, model: str, out: str, timeout: float, gcomp_args: Sequence[str] = ()) -> OpResult:
        """Run ``op`` in the worker; a crash or a timeout is a result too, never an exception."""
        if self.process is None or not self.process.is_alive():
            self.start()
        log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        job = (op, model, out, tuple(gcomp_args))
        try:
            self.conn.send(job)
        except OSError:  # it died after its last answer: start afresh
            self.kill()
            self.start()
            self.conn.send(job)
        t0 = time.monotonic()
        ready = wait([self.conn, self.process.sentinel], timeout=max(timeout, 0.0))
        seconds = time.monotonic() - t0
        if self.conn in ready:
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass  # died while answering: a crash
        if not ready:  # the deadline passed with the worker still busy
            self._dump_stack()
            self.kill()
            return OpResult(op, "hang", seconds, "timeout",
                            f"no answer after {timeout:.1f} s; worker killed and restarted",
                            self._log_tail(log_offset))
        self.process.join(5)
        code = self.process.exitcode
        self.kill()
        if code is not None and code < 0:
            try:
                kind = signal.Signals(-code).name
            except ValueError:
                kind = f"signal {-code}"
        else:
            kind = f"exit code {code}"
        return OpResult(op, "crash", seconds, kind, f"worker died: {kind}", self._log_tail(log_offset))

    def _dump_stack(self) -> None:
        """Ask a hung worker for its Python stack (written to its log by faulthandler)."""
        with contextlib.suppress(OSError):
            os.kill(self.process.pid, DUMP_SIGNAL)
            time.sleep(0.5)

    def _log_tail(self, offset: int, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def kill(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(10)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(None)
            self.process.join(5)
        self.kill()


def run_case_file(worker: Worker, model_path: str, workdir: str, timeout: float,
                  ops: Sequence[str] = OPS, gcomp_args: Sequence[str] = ()) -> list[OpResult]:
    """Run ``ops`` on one model file, each command within ``timeout`` seconds (worker start excluded),
    ``gcomp_args`` appended to each optimize.

    After a crash the next command runs in a fresh worker; after a hang the case stops
    there (its other commands would most likely hang as well, 20 s each).
    """
    results: list[OpResult] = []
    for op in ops:
        out = os.path.join(workdir, f"out-{op}.onnx")
        if worker.process is None:
            worker.start()  # outside the command's time
        result = worker.call(op, model_path, out, timeout, gcomp_args)
        if result.outcome == "hang":
            result.message = f"{op} still running after {timeout:g} s; worker killed and restarted"
        results.append(result)
        for leftover in (out, out + ".data"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        if result.outcome == "hang":
            break
    return results


def run_cases(
    cases: Sequence[Any],
    *,
    jobs: int = 2,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
    workdir: str | os.PathLike | None = None,
    materialize: Callable[[Any], tuple[bytes, str]] | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    gcomp_args: Sequence[str] = (),
    ops: Sequence[str] = OPS,
) -> list[CaseResult]:
    """Run every case (materialized in the parent's threads) on ``jobs`` workers; results in case order.

    ``gcomp_args`` follow every ``gcomp optimize`` (see :func:`check_gcomp_args`)."""
    if materialize is None:
        from tests.fuzz.mutations import materialize
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gcomp-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    todo: queue.Queue = queue.Queue()
    for i, case in enumerate(cases):
        todo.put((i, case))
    results: list[CaseResult | None] = [None] * len(cases)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def drive(slot: int) -> None:
        folder = root / f"w{slot}"
        folder.mkdir(exist_ok=True)
        worker = Worker(root, memory_bytes=memory_bytes, name=f"w{slot}")
        try:
            while not errors:
                try:
                    i, case = todo.get_nowait()
                except queue.Empty:
                    return
                data, description = materialize(case)
                path = folder / "model.onnx"
                path.write_bytes(data)
                op_results = run_case_file(worker, str(path), str(folder), timeout, ops, gcomp_args)
                result = CaseResult(case, description, len(data), op_results, gcomp_args=list(gcomp_args))
                results[i] = result
                if on_result:
                    with lock:
                        on_result(result)
        except BaseException as e:  # noqa: BLE001 - a harness failure (worker cannot start, disk full): stop all
            errors.append(e)
        finally:
            worker.close()

    threads = [threading.Thread(target=drive, args=(slot,), daemon=True) for slot in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return [r for r in results if r is not None]


def run_file(path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT_S,
             memory_bytes: int | None = DEFAULT_MEMORY_BYTES, gcomp_args: Sequence[str] = ()) -> list[OpResult]:
    """Run one model file (a saved failing case, say) through the ops in a fresh worker."""
    with tempfile.TemporaryDirectory(prefix="gcomp-fuzz-") as tmp:
        model = Path(tmp) / "model.onnx"
        shutil.copyfile(path, model)
        worker = Worker(tmp, memory_bytes=memory_bytes)
        try:
            return run_case_file(worker, str(model), tmp, timeout, gcomp_args=gcomp_args)
        finally:
            worker.close()


# --------------------------------------------------------------------------- the real command

def _gcomp_command() -> list[str]:
    return [sys.executable, "-m", "gcomp"]


def cli_check_one(data: bytes, *, timeout: float = 120.0, gcomp_args: Sequence[str] = ()) -> CliCheck:
    """``gcomp optimize`` (``-O 1``, verification on, then ``gcomp_args``) of a model gcomp
    rejects, as a subprocess."""
    with tempfile.TemporaryDirectory(prefix="gcomp-fuzz-cli-") as tmp:
        model, out = Path(tmp) / "model.onnx", Path(tmp) / "out.onnx"
        model.write_bytes(data)
        cmd = [*_gcomp_command(), "optimize", str(model), "-o", str(out), "-O", "1", "-q", *gcomp_args]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=tmp,
                                  start_new_session=True)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return CliCheck(False, None, stderr[-2000:], f"no exit within {timeout:.0f} s")
        lines = proc.stderr.strip().splitlines()
        problems = []
        if proc.returncode == 0:
            problems.append("exit status 0")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        elif not lines[0].startswith("gcomp: error: "):
            problems.append("stderr is not 'gcomp: error: ...'")
        if "Traceback" in proc.stderr:
            problems.append("a traceback")
        if proc.stdout.strip():
            problems.append("output on stdout")
        if out.exists():
            problems.append("an output was written")
        return CliCheck(not problems, proc.returncode, proc.stderr[-2000:], "; ".join(problems))


def cli_check(results: Sequence[CaseResult], *, sample: int, jobs: int = 2,
              materialize: Callable[[Any], tuple[bytes, str]] | None = None) -> list[CaseResult]:
    """Run the real command on up to ``sample`` cases whose ``optimize-O1`` ended in a GcompError.

    The sample takes kinds in turn (first case of each kind, then the second, ...), so it
    is deterministic and spread over the kinds. Each runs with its case's ``gcomp_args``.
    Sets ``result.cli``; returns the checked.
    """
    if materialize is None:
        from tests.fuzz.mutations import materialize
    by_kind: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        if any(o.op == "optimize-O1" and o.outcome == "gcomp_error" for o in r.ops):
            by_kind[getattr(r.case, "kind", "?")].append(r)
    chosen: list[CaseResult] = []
    for rank in range(max((len(v) for v in by_kind.values()), default=0)):
        for kind in sorted(by_kind):
            if rank < len(by_kind[kind]) and len(chosen) < sample:
                chosen.append(by_kind[kind][rank])
    from concurrent.futures import ThreadPoolExecutor

    def check(r: CaseResult) -> None:
        r.cli = cli_check_one(materialize(r.case)[0], gcomp_args=r.gcomp_args)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(check, chosen))
    return chosen


# --------------------------------------------------------------------------- reporting

def summarize(results: Sequence[CaseResult], seconds: float | None = None) -> str:
    """Counts by outcome and by mutation kind, the GcompError types, and the CLI check."""
    kinds = sorted({getattr(r.case, "kind", "?") for r in results},
                   key=lambda k: min(getattr(r.case, "index", 0) for r in results if getattr(r.case, "kind", "?") == k))
    table: dict[str, Counter] = {k: Counter() for k in kinds}
    for r in results:
        table[getattr(r.case, "kind", "?")][r.outcome] += 1
    total = Counter(r.outcome for r in results)
    width = max([len(k) for k in kinds] + [8])
    lines = [f"{'kind':<{width}} " + " ".join(f"{o:>11}" for o in OUTCOMES) + f" {'cases':>6}"]
    for k in kinds:
        row = " ".join(f"{table[k][o]:>11}" for o in OUTCOMES)
        lines.append(f"{k:<{width}} {row} {sum(table[k].values()):>6}")
    lines.append(f"{'TOTAL':<{width}} " + " ".join(f"{total[o]:>11}" for o in OUTCOMES) + f" {len(results):>6}")
    ops = Counter((o.op, o.outcome) for r in results for o in r.ops)
    lines.append("per command: " + "; ".join(
        f"{op}: " + ", ".join(f"{o} {ops[op, o]}" for o in OUTCOMES if ops[op, o]) for op in OPS))
    errors = Counter(o.error_type for r in results for o in r.ops if o.outcome == "gcomp_error")
    if errors:
        lines.append("GcompError types: " + ", ".join(f"{t} {n}" for t, n in errors.most_common()))
    lines.extend(_pass_through_lines(results))
    verify_failed = sum(1 for r in results for o in r.ops
                        if o.outcome == "gcomp_error" and (o.message or "").startswith("verification FAILED"))
    if verify_failed:
        lines.append(f"verification failures (reported as GcompError): {verify_failed}")
    checked = [r for r in results if r.cli is not None]
    if checked:
        bad = sum(not r.cli.ok for r in checked)
        lines.append(f"CLI check (gcomp optimize in a subprocess): {len(checked)} checked, "
                     f"{bad} not one clean error line")
    slowest = sorted(((o.seconds, r, o) for r in results for o in r.ops if o.outcome != "hang"),
                     key=lambda t: -t[0])[:3]
    if slowest and slowest[0][0] >= 1.0:
        lines.append("slowest commands (hangs aside): " + "; ".join(
            f"{getattr(r.case, 'label', '?')} {o.op} {t:.1f} s ({o.outcome})" for t, r, o in slowest))
    if seconds is not None:
        lines.append(f"{len(results)} cases in {seconds:.1f} s ({seconds / max(len(results), 1):.2f} s/case)")
    return "\n".join(lines)


def _pass_through_lines(results: Sequence[CaseResult]) -> list[str]:
    """The pass-through arguments, and how many successful optimizes wrote a quantized model."""
    arg_sets = Counter(shlex.join(r.gcomp_args) for r in results if r.gcomp_args)
    lines = [f"gcomp optimize pass-through: {args} ({n} case(s))" for args, n in sorted(arg_sets.items())]
    written = [o for r in results for o in r.ops if o.op.startswith("optimize") and o.outcome == "success"]
    modes = Counter(o.quantized for o in written if o.quantized)
    if arg_sets or modes:
        lines.append(f"quantized outputs: {sum(modes.values())} of {len(written)} successful optimize commands"
                     + "".join(f"; {mode} {n}" for mode, n in sorted(modes.items())))
    return lines


def signature(o: OpResult) -> str:
    """What tells one failure from another: outcome, type, the innermost gcomp frame, the message's gist."""
    where = ""
    if o.traceback:
        frames = re.findall(r'File "([^"]+)", line \d+,? in (\S+)', o.traceback)
        if "most recent call first" in o.traceback:  # a faulthandler dump (a crash or a hang)
            frames.reverse()
        ours = [f for f in frames
                if f[0].endswith(".py") and "site-packages" not in f[0] and "/tests/fuzz/" not in f[0]]
        if ours or frames:
            path, func = (ours or frames)[-1]
            where = f" in {Path(path).name}:{func}"
    gist = re.sub(r"\d+", "N", _one_line(o.message or ""))[:90]
    return f"{o.outcome} {o.error_type}{where}: {gist}"


def format_failures(results: Sequence[CaseResult], limit: int = 10) -> str:
    """The failures grouped by :func:`signature`: count, commands, and the first case of each."""
    groups: dict[str, list[tuple[CaseResult, str]]] = defaultdict(list)
    for r in results:
        for o in r.failures():
            groups[signature(o)].append((r, o.op))
        if r.cli is not None and not r.cli.ok:
            groups[f"cli: {r.cli.problem}"].append((r, "gcomp optimize (subprocess)"))
    lines = []
    for sig, hits in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:limit]:
        first = hits[0][0]
        cases = len({id(r) for r, _ in hits})
        ops = ", ".join(sorted({op for _, op in hits}))
        case = first.case.to_dict() if hasattr(first.case, "to_dict") else first.case
        lines.append(f"- {sig}\n  {cases} case(s); {ops}\n  first: {json.dumps(case)}\n  mutation: {first.description}"
                     + (f"\n  gcomp optimize ... {shlex.join(first.gcomp_args)}" if first.gcomp_args else ""))
    if len(groups) > limit:
        lines.append(f"... and {len(groups) - limit} more kinds of failure")
    return "\n".join(lines)


def save_case(result: CaseResult, folder: str | os.PathLike, data: bytes) -> Path:
    """Write ``<label>.onnx`` (the mutated model) and ``<label>.json`` (case, outcome, messages)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    label = result.case.label if hasattr(result.case, "label") else f"case-{id(result)}"
    (folder / f"{label}.onnx").write_bytes(data)
    (folder / f"{label}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return folder / f"{label}.onnx"
