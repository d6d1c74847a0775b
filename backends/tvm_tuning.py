"""MetaSchedule tuning for the TVM backend, with a persistent database gcomp owns.

- The database is MetaSchedule's JSON database (``database_workload.json`` plus
  ``database_tuning_record.json``), one folder per target under the cache directory
  (:func:`cache_dir`; ``GCOMP_CACHE_DIR`` or ``~/.cache/gcomp``): records are keyed by
  the workload (structural hash of the kernel) inside it, so any model with an identical
  kernel for the same target reuses the record.
- A kernel is tuned only for the trials it lacks: the folder also keeps how many trials
  each workload has had (``gcomp-trials.json``), so a second compile of the same model
  with the same budget makes no trials and only applies the records, and a larger budget
  tunes each kernel up to its new share.
- Tuning runs one task at a time, heaviest first, in a private copy of the database; after
  every task the copy's complete lines are committed into the cache folder by atomic
  rename under a file lock. An interrupt (Ctrl-C, SIGTERM, a spent time budget) loses at
  most the task in progress and never leaves a half-written database.
- Candidates are built and timed in this process (no worker pool: on a loaded 2-core
  machine, MetaSchedule's pool workers time out while importing TVM).
"""

from __future__ import annotations

__all__ = ["TuningStats", "apply_database", "cache_dir", "count_records", "database_dir", "search_round", "tune"]

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_DB_FILES = ("database_workload.json", "database_tuning_record.json")
_INDEXING = re.compile(r"take|gather|scatter|index|embedding|one_hot")


@dataclass
class TuningStats:
    """What one tuning call did. ``trials`` counts candidates measured in this call."""

    database: str
    tasks: int = 0
    reused: int = 0
    tuned: int = 0
    skipped: int = 0
    trials: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    task_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    """Where gcomp keeps tuning databases: ``$GCOMP_CACHE_DIR`` or ``~/.cache/gcomp``."""
    env = os.environ.get("GCOMP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gcomp"


def database_dir(target, root: str | os.PathLike | None = None) -> Path:
    """The database folder for ``target`` (a tvm Target): readable kind/cpu plus a hash."""
    text = json.dumps(_target_json(target), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    cfg = _target_json(target)
    label = "-".join(str(cfg.get(k)) for k in ("kind", "mcpu", "arch") if cfg.get(k))
    base = Path(root) if root is not None else cache_dir()
    return base / "tvm" / f"{label}-{digest}"


def _target_json(target) -> dict:
    try:
        return dict(json.loads(str(target)))
    except (ValueError, TypeError):
        return {"target": str(target)}


def count_records(db_dir: str | os.PathLike) -> int:
    """Complete tuning-record lines in a database folder (0 when there is none)."""
    path = Path(db_dir) / _DB_FILES[1]
    if not path.is_file():
        return 0
    return len(_complete_lines(path))


def _complete_lines(path: Path) -> list[str]:
    """Lines that parse as JSON: a line cut by an interrupt is dropped."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            continue
        lines.append(line)
    return lines


@contextlib.contextmanager
def _locked(db_dir: Path):
    db_dir.mkdir(parents=True, exist_ok=True)
    with open(db_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _commit(work: Path, db_dir: Path, attempts: dict[str, int] | None = None) -> None:
    """Copy the work database's complete lines into ``db_dir``, each file by atomic rename.

    The work copy started from ``db_dir``'s content and only appended, so workload
    indices in the records stay valid. Workloads are written before records.
    """
    with _locked(db_dir):
        for name in _DB_FILES:
            src = work / name
            if not src.is_file():
                continue
            lines = _complete_lines(src)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=db_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
            os.replace(tmp, db_dir / name)
        if attempts is not None:
            merged = {**_read_attempts(db_dir), **attempts}
            fd, tmp = tempfile.mkstemp(prefix=f".{_ATTEMPTS}.", dir=db_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(merged, f)
            os.replace(tmp, db_dir / _ATTEMPTS)


def _snapshot(db_dir: Path, work: Path) -> None:
    with _locked(db_dir):
        for name in _DB_FILES:
            src = db_dir / name
            lines = _complete_lines(src) if src.is_file() else []
            (work / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _quiet_meta_schedule() -> None:
    # MetaSchedule logs a table per task to stdout; gcomp shows its own progress.
    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        # MetaSchedule rebuilds its logging config from the names of this logger's handlers
        # (``handler.get_name().format(...)``); a handler left unnamed — after a tuning run
        # interrupted mid-configuration — crashes every later tuning in the process.
        for handler in list(logger.handlers):
            if handler.get_name() is None:
                logger.removeHandler(handler)


def _fast_inspect() -> None:
    """Make MetaSchedule's first use take seconds, not minutes.

    Importing ``tvm.s_tir.tensor_intrin`` parses ~500 TVMScript functions, each calling
    ``inspect.stack()``; for the frozen importlib frames on the stack ``inspect.getmodule``
    finds no cached file and scans all of ``sys.modules`` (thousands with torch loaded):
    100 s on this machine. Telling inspect which modules those frozen files are makes
    every lookup a cache hit (6 s). Harmless: it is the answer inspect would find.
    """
    import inspect

    for frozen in ("importlib._bootstrap", "importlib._bootstrap_external"):
        inspect.modulesbyfile.setdefault(f"<frozen {frozen}>", frozen)


def _in_process_builder_runner(work: Path, evaluator: dict):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder, local_builder
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, local_runner

    artifacts = work / "artifacts"
    artifacts.mkdir(exist_ok=True)
    counter = iter(range(1 << 30))

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            from tvm.support.tar import tar

            results = []
            for item in build_inputs:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)  # tvm.build, inside TVM
                        rt_mod = local_builder.default_build(item.mod, item.target, None)
                    # MetaSchedule's measure callback deletes the artifact's folder.
                    folder = Path(tempfile.mkdtemp(prefix=f"c{next(counter)}-", dir=artifacts))
                    path = folder / f"cand.{tar.output_format}"
                    rt_mod.export_library(str(path), fcompile=tar)
                    results.append(BuilderResult(str(path), None))
                except Exception as e:  # a candidate that does not build is a result, not an error
                    results.append(BuilderResult(None, f"in-process build: {e}"))
            return results

    config = EvaluatorConfig(**evaluator)

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            for item in runner_inputs:
                try:
                    costs = local_runner._worker_func(
                        None, None, None, config, 1, str(item.artifact_path), str(item.device_type),
                        tuple(a.as_json() for a in item.args_info),
                    )
                    futures.append(local_runner.LocalRunnerFuture(res=costs, error_message=None))
                except Exception as e:
                    futures.append(local_runner.LocalRunnerFuture(res=None, error_message=str(e)))
            return futures

    return InProcessBuilder(), InProcessRunner()


_ROUND = 64  # candidates per search round (MetaSchedule's default)
_POPULATION_PER_CANDIDATE = 4  # evolutionary population per candidate measured in a round


def _task_is_tuned(db, task) -> bool:
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return False
    return db.query_tuning_record(mod, task.target, "main") is not None


@dataclass
class _Kernel:
    """One tunable kernel in a tuning call's plan."""

    task: Any
    key: str  # structural hash of the kernel: its entry in gcomp-trials.json
    had: int  # trials it has had (this call included)
    first: int  # the size of its first round (phase 1)
    cost: float  # guessed seconds per model run, until a measured time exists

    @property
    def lacks(self) -> int:
        return self.first - self.had


def search_round(ms, task, n: int, *, work: Path, db, builder, runner, cost_model="xgb", seed: int = 0) -> None:
    """One MetaSchedule search round of ``n`` candidates for ``task``, records into ``db``.

    The population is sized to the round: the default (512, 50 unmeasured seeds) costs a
    minute of search per task even for 8 trials.
    """
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=min(512, max(32, n * _POPULATION_PER_CANDIDATE)),
        init_min_unmeasured=min(50, max(8, n)),
    )
    _quiet_meta_schedule()  # its logging config resets the level on every call
    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [task], str(work / "logs"), strategy=strategy, num_threads=os.cpu_count() or 1, seed=seed
    )
    ms.tune_tasks(
        tasks=ctxs, task_weights=weights, work_dir=str(work), max_trials_global=n, max_trials_per_task=n,
        num_trials_per_iter=n, builder=builder, runner=runner, database=db, cost_model=cost_model,
        task_scheduler="round-robin",
    )


def _best_seconds(db, task) -> float | None:
    """The fastest measured time of ``task``'s kernel in ``db`` (None: not measured)."""
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    if not top or not top[0].run_secs:
        return None
    secs = [float(x) for x in top[0].run_secs]
    return sum(secs) / len(secs)


def tune(
    mod,
    target,
    *,
    trials: int,
    seconds: float | None = None,
    root: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    evaluator: dict | None = None,
    seed: int = 0,
) -> TuningStats:
    """Tune the kernels of a fused Relax module ``mod`` for ``target``, ``trials`` in all.

    Two phases, like MetaSchedule's gradient scheduler but with a clock:

    1. Every tunable kernel, heaviest first, gets one search round: its guessed share of
       the model's time (:func:`trial_shares`), at most :data:`_ROUND` candidates. A
       kernel left on its default schedule costs far more than a tuned one gains from a
       second round (ResNet-18: an untuned 3x3 convolution 72 ms, tuned 0.6-1.7 ms).
    2. The trials left go in rounds of :data:`_ROUND` to the kernel with the most
       measured time per trial given (best time x calls / trials so far).

    The database folder remembers how many trials each workload has had
    (``gcomp-trials.json``): the same budget again makes no trials, a larger one tunes
    up to it. ``seconds`` bounds the call: a round is shrunk or skipped when the time
    left (at the rate measured so far) does not fit it, so a long kernel no longer runs
    the budget over; phase 1 scales every kernel's round to fit (at least 8), and a
    kernel cut short is tuned further by the next call with the same budget. The
    records live in :func:`database_dir`.
    """
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    _quiet_meta_schedule()
    _fast_inspect()
    db_dir = database_dir(target, root)
    stats = TuningStats(database=str(db_dir))
    start = time.perf_counter()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    stats.tasks = len(tasks)
    work = Path(tempfile.mkdtemp(prefix="gcomp-tune-"))

    def left() -> float:
        return math.inf if seconds is None else seconds - (time.perf_counter() - start)

    try:
        _snapshot(db_dir, work)
        db = ms.database.JSONDatabase(work_dir=str(work))
        attempts = _read_attempts(db_dir)
        # Kernels that index with data (take/gather/scatter) read out of bounds on the
        # random arguments candidates are timed with, and in this process that is a
        # segfault (measured: a take kernel, TVMBackendParallelLaunch). They stay on the
        # default schedule; they are memory-bound copies anyway.
        tunable = [t for t in tasks if not _INDEXING.search(t.task_name)]
        stats.skipped = len(tasks) - len(tunable)
        costs = [_task_cost(t) for t in tunable]
        shares = trial_shares(costs, trials)
        plan: list[_Kernel] = []  # heaviest first
        for task, share, cost in sorted(zip(tunable, shares, costs), key=lambda item: -item[2]):
            key = str(tvm_ffi.structural_hash(task.dispatched[0]))
            had = attempts.get(key)
            first = min(_ROUND, share)
            if had is None and _task_is_tuned(db, task):
                had = first  # records from elsewhere: count them as its first round
            plan.append(_Kernel(task, key, had or 0, first, cost))
        if trials <= 0 or not plan:
            return stats
        builder, runner = _in_process_builder_runner(
            work, evaluator or {"number": 3, "repeat": 1, "min_repeat_ms": 50}
        )
        # One cost model for the whole call, so a kernel's first round is already guided
        # by what the kernels before it measured (MetaSchedule shares it the same way
        # when it tunes tasks together).
        cost_model = ms.CostModel.create("xgb", num_tuning_cores=os.cpu_count() or 1)
        rates: dict[str, float] = {}  # seconds per trial, measured per kernel
        measured = {"trials": 0, "seconds": 0.0}
        tuned: set[str] = set()

        def rate_of(kernel: _Kernel) -> float:
            if kernel.key in rates:
                return rates[kernel.key]
            if measured["trials"]:
                return measured["seconds"] / measured["trials"]
            return _GUESS_SECONDS_PER_TRIAL

        def affordable(kernel: _Kernel) -> float:
            return min(left() / rate_of(kernel), 1e9)

        def run_round(i: int, kernel: _Kernel, n: int) -> None:
            if progress:
                progress(f"tuning task {i + 1}/{len(plan)} {kernel.task.task_name} ({n} trials)")
            t0, before = time.perf_counter(), len(db)
            search_round(ms, kernel.task, n, work=work, db=db, builder=builder, runner=runner,
                         cost_model=cost_model, seed=seed)
            spent, made = time.perf_counter() - t0, len(db) - before
            stats.trials += made
            measured["trials"] += max(1, made)
            measured["seconds"] += spent
            rates[kernel.key] = spent / max(1, made)
            if kernel.task.task_name not in stats.task_names:
                stats.task_names.append(kernel.task.task_name)
            tuned.add(kernel.key)
            kernel.had += n
            attempts[kernel.key] = kernel.had
            _commit(work, db_dir, attempts)

        def measured_time_per_trial(kernel: _Kernel) -> float:
            best = _best_seconds(db, kernel.task)
            calls = max(1, int(kernel.task.weight))
            return (best if best is not None else kernel.cost) * calls / max(1, kernel.had)

        # Phase 1: one round for every kernel that lacks it, scaled to the time left.
        pending = [(i, k) for i, k in enumerate(plan) if k.lacks >= 8]
        for j, (i, kernel) in enumerate(pending):
            planned = sum(k.lacks for _, k in pending[j:])
            fits = affordable(kernel)
            n = min(_fit(kernel.lacks, planned, fits), int(fits))
            if n < 8:
                break
            run_round(i, kernel, n)
        # Phase 2: the rest of the budget where the measured time is.
        remaining = trials - sum(max(k.had, k.first) for k in plan)
        while remaining >= 8 and left() > 0:
            i, kernel = max(enumerate(plan), key=lambda item: measured_time_per_trial(item[1]))
            n = min(_ROUND, remaining, int(affordable(kernel)))
            if n < 8:
                break
            run_round(i, kernel, n)
            remaining -= n
        stats.tuned = len(tuned)
        unfinished = sum(1 for k in plan if k.key not in tuned and k.lacks > 7)
        stats.skipped += unfinished
        stats.reused = len(plan) - stats.tuned - unfinished
    except BaseException:
        stats.interrupted = True
        if (work / _DB_FILES[0]).is_file():
            _commit(work, db_dir, None)  # keep the tasks finished before the interrupt
        raise
    finally:
        stats.seconds = time.perf_counter() - start
        shutil.rmtree(work, ignore_errors=True)
    return stats


_ATTEMPTS = "gcomp-trials.json"


def _read_attempts(db_dir: Path) -> dict[str, int]:
    try:
        data = json.loads((db_dir / _ATTEMPTS).read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


# A kernel's time per call, guessed from its work before any tuning: FLOPs at a tuned
# kernel's rate plus the bytes its buffers hold at memory speed (FACTS.md: 324 GFLOP/s
# peak, 19.2 GB/s measured here; tuned TVM kernels reach about half the peak).
_GUESS_FLOPS = 150e9
_GUESS_BYTES_PER_S = 15e9
_MIN_TRIALS = 16  # below two search rounds of 8, MetaSchedule rarely beats its first guess


# A first guess only: the rate is re-measured after each kernel. Measured here (2 cores,
# build + time + search): 0.53 s per trial on a mini-BERT's kernels, 0.78 on a mini CNN's,
# 1.65 on ResNet-18's convolutions (bench/TVM.md).
_GUESS_SECONDS_PER_TRIAL = 0.5


def _fit(budget: int, planned: int, affordable: float) -> int:
    """``budget`` scaled down so that the kernels still planned fit the time left.

    Without this a time budget spent itself on the first kernels' large shares and left
    the rest on default schedules (mini CNN: 3 of 10 kernels tuned in 19 min); scaled,
    every kernel gets its proportion of what the time allows (at least 8 trials), and
    the rate is re-measured after each kernel.
    """
    if planned <= affordable:
        return budget
    return max(8, int(budget * affordable / max(1, planned)))


def trial_shares(costs: list[float], trials: int) -> list[int]:
    """Split ``trials`` over kernels by their share of the model's (guessed) time.

    Every kernel gets at least ``_MIN_TRIALS`` (or an even split when the budget is too
    small for that), and what is left goes in proportion to ``costs``: a mini-BERT's FFN
    GEMMs are ~60 % of its time, its layer norms ~3 %, and an even split gave both the
    same 114 trials (bench/TVM.md). The shares sum to at most ``max(trials, 8 * n)``.
    """
    n = len(costs)
    if n == 0:
        return []
    floor = min(_MIN_TRIALS, max(8, trials // n))
    spare = max(0, trials - floor * n)
    total = sum(max(c, 0.0) for c in costs)
    if total <= 0:
        return [floor + spare // n] * n
    return [floor + int(spare * max(c, 0.0) / total) for c in costs]


def _task_cost(task) -> float:
    """Guessed seconds the task's kernel takes per model run (every call of it)."""
    func = task.dispatched[0]["main"] if hasattr(task.dispatched[0], "functions") else task.dispatched[0]
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        flop = float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # a guess only splits the budget
        flop = 0.0
    nbytes = 0
    try:
        for param in func.params:  # in TVM 0.27 a buffer parameter carries its shape
            shape = getattr(param, "shape", None)
            if shape is not None:
                bits = param.dtype.bits * param.dtype.lanes
                nbytes += math.prod(int(dim) for dim in shape) * ((bits + 7) // 8)
    except Exception:  # symbolic shapes: FLOPs alone
        pass
    return max(1, int(task.weight)) * (flop / _GUESS_FLOPS + nbytes / _GUESS_BYTES_PER_S)


def apply_database(mod, target, root: str | os.PathLike | None = None):
    """``mod`` with every kernel that has a record in the target's database scheduled."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    db_dir = database_dir(target, root)
    if count_records(db_dir) == 0:
        return mod
    _quiet_meta_schedule()
    work = Path(tempfile.mkdtemp(prefix="gcomp-apply-"))
    try:
        _snapshot(db_dir, work)
        db = ms.database.JSONDatabase(work_dir=str(work))
        with target, db:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    finally:
        shutil.rmtree(work, ignore_errors=True)
