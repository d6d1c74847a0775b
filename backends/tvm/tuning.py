"""MetaSchedule tuning for the TVM backend, into the database gcomp owns
(:mod:`gcomp.backends.tvm.database`).

- A kernel is tuned only for the trials it lacks: the database folder keeps how many
  trials each workload has had, so a second compile of the same model with the same
  budget makes no trials and only applies the records, and a larger budget tunes each
  kernel up to its new share.
- Tuning runs one task at a time, heaviest first, in a private copy of the database; after
  every task the copy's complete lines are committed into the cache folder. An interrupt
  (Ctrl-C, SIGTERM, a spent time budget) loses at most the task in progress and never
  leaves a half-written database.
- Candidates are built and timed in this process (no worker pool: on a loaded 2-core
  machine, MetaSchedule's pool workers time out while importing TVM).
"""

from __future__ import annotations

__all__ = ["DEFAULT_EVALUATOR", "TuningStats", "best_seconds", "search_round", "trial_shares", "tune"]

import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gcomp.backends.tvm.database import DB_FILES, commit, database_dir, read_attempts, snapshot
from gcomp.backends.tvm.diagnostics import quiet_meta_schedule
from gcomp.backends.tvm.measure import fast_inspect, in_process_builder_runner

_INDEXING = re.compile(r"take|gather|scatter|index|embedding|one_hot")
_ROUND = 64  # candidates per search round (MetaSchedule's default)
_MIN_ROUND = 8  # the smallest search round worth running
_POPULATION_PER_CANDIDATE = 4  # evolutionary population per candidate measured in a round
_MIN_TRIALS = 16  # below two search rounds of 8, MetaSchedule rarely beats its first guess
# How candidates are timed: 3 runs of at least 50 ms each, one repeat.
DEFAULT_EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 50}

# A kernel's time per call, guessed from its work before any tuning: FLOPs at a tuned
# kernel's rate plus the bytes its buffers hold at memory speed (docs/measurements.md:
# 324 GFLOP/s peak, 19.2 GB/s measured here; tuned TVM kernels reach about half the peak).
_GUESS_FLOPS = 150e9
_GUESS_BYTES_PER_S = 15e9

# A first guess only: the rate is re-measured after each kernel. Measured here (2 cores,
# build + time + search): 0.53 s per trial on a mini-BERT's kernels, 0.78 on a mini CNN's,
# 1.65 on ResNet-18's convolutions (bench/TVM.md).
_GUESS_SECONDS_PER_TRIAL = 0.5


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
    quiet_meta_schedule()  # its logging config resets the level on every call
    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [task], str(work / "logs"), strategy=strategy, num_threads=os.cpu_count() or 1, seed=seed
    )
    ms.tune_tasks(
        tasks=ctxs, task_weights=weights, work_dir=str(work), max_trials_global=n, max_trials_per_task=n,
        num_trials_per_iter=n, builder=builder, runner=runner, database=db, cost_model=cost_model,
        task_scheduler="round-robin",
    )


def best_seconds(db, task) -> float | None:
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
    records live in :func:`gcomp.backends.tvm.database.database_dir`.
    """
    from tvm.s_tir import meta_schedule as ms

    quiet_meta_schedule()
    fast_inspect()
    db_dir = database_dir(target, root)
    stats = TuningStats(database=str(db_dir))
    start = time.perf_counter()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    stats.tasks = len(tasks)
    work = Path(tempfile.mkdtemp(prefix="gcomp-tune-"))
    try:
        snapshot(db_dir, work)
        tuner = _Tuner(ms, work, db_dir, stats, deadline=math.inf if seconds is None else start + seconds,
                       progress=progress, seed=seed)
        tuner.plan_kernels(tasks, trials)
        if trials <= 0 or not tuner.plan:
            return stats
        tuner.start_measuring(evaluator or DEFAULT_EVALUATOR)
        tuner.first_rounds()
        tuner.more_rounds(trials)
        tuner.count_outcome()
    except BaseException:
        stats.interrupted = True
        if (work / DB_FILES[0]).is_file():
            commit(work, db_dir, None)  # keep the tasks finished before the interrupt
        raise
    finally:
        stats.seconds = time.perf_counter() - start
        shutil.rmtree(work, ignore_errors=True)
    return stats


class _Tuner:
    """One tuning call: its plan (heaviest kernel first), the work database, and the
    rates measured so far, which decide how large the next rounds may be."""

    def __init__(self, ms, work: Path, db_dir: Path, stats: TuningStats, *, deadline: float,
                 progress: Callable[[str], None] | None, seed: int) -> None:
        self.ms = ms
        self.work = work
        self.db_dir = db_dir
        self.stats = stats
        self.deadline = deadline  # perf_counter() time the call must end by (inf: none)
        self.progress = progress
        self.seed = seed
        self.db = ms.database.JSONDatabase(work_dir=str(work))
        self.attempts = read_attempts(db_dir)  # trials per workload, this call's included
        self.plan: list[_Kernel] = []
        self.rates: dict[str, float] = {}  # seconds per trial, measured per kernel
        self.measured_trials = 0  # over every round of this call
        self.measured_seconds = 0.0
        self.tuned: set[str] = set()
        self.builder = self.runner = self.cost_model = None

    def plan_kernels(self, tasks, trials: int) -> None:
        """The plan: every tunable kernel with its share of ``trials``, heaviest first."""
        import tvm_ffi

        # Kernels that index with data (take/gather/scatter) read out of bounds on the
        # random arguments candidates are timed with, and in this process that is a
        # segfault (measured: a take kernel, TVMBackendParallelLaunch). They stay on the
        # default schedule; they are memory-bound copies anyway.
        tunable = [t for t in tasks if not _INDEXING.search(t.task_name)]
        self.stats.skipped = len(tasks) - len(tunable)
        costs = [_task_cost(t) for t in tunable]
        shares = trial_shares(costs, trials)
        for task, share, cost in sorted(zip(tunable, shares, costs), key=lambda item: -item[2]):
            key = str(tvm_ffi.structural_hash(task.dispatched[0]))
            had = self.attempts.get(key)
            first = min(_ROUND, share)
            if had is None and _task_is_tuned(self.db, task):
                had = first  # records from elsewhere: count them as its first round
            self.plan.append(_Kernel(task, key, had or 0, first, cost))

    def start_measuring(self, evaluator: dict) -> None:
        """The in-process builder and runner, and one cost model for the whole call, so a
        kernel's first round is already guided by what the kernels before it measured
        (MetaSchedule shares it the same way when it tunes tasks together)."""
        self.builder, self.runner = in_process_builder_runner(self.work, evaluator)
        self.cost_model = self.ms.CostModel.create("xgb", num_tuning_cores=os.cpu_count() or 1)

    def left(self) -> float:
        """Seconds left in the call's budget (inf without one)."""
        return self.deadline - time.perf_counter()

    def rate_of(self, kernel: _Kernel) -> float:
        """Seconds per trial: the kernel's own measured rate, else the call's, else a guess."""
        if kernel.key in self.rates:
            return self.rates[kernel.key]
        if self.measured_trials:
            return self.measured_seconds / self.measured_trials
        return _GUESS_SECONDS_PER_TRIAL

    def affordable(self, kernel: _Kernel) -> float:
        """Trials of ``kernel`` the time left pays for."""
        return min(self.left() / self.rate_of(kernel), 1e9)

    def time_per_trial(self, kernel: _Kernel) -> float:
        """The kernel's measured (else guessed) time per model run, per trial it has had."""
        best = best_seconds(self.db, kernel.task)
        calls = max(1, int(kernel.task.weight))
        return (best if best is not None else kernel.cost) * calls / max(1, kernel.had)

    def run_round(self, i: int, kernel: _Kernel, n: int) -> None:
        """One search round of ``n`` candidates for plan entry ``i``, then commit."""
        if self.progress:
            self.progress(f"tuning task {i + 1}/{len(self.plan)} {kernel.task.task_name} ({n} trials)")
        t0, before = time.perf_counter(), len(self.db)
        search_round(self.ms, kernel.task, n, work=self.work, db=self.db, builder=self.builder,
                     runner=self.runner, cost_model=self.cost_model, seed=self.seed)
        spent, made = time.perf_counter() - t0, len(self.db) - before
        self.stats.trials += made
        self.measured_trials += max(1, made)
        self.measured_seconds += spent
        self.rates[kernel.key] = spent / max(1, made)
        if kernel.task.task_name not in self.stats.task_names:
            self.stats.task_names.append(kernel.task.task_name)
        self.tuned.add(kernel.key)
        kernel.had += n
        self.attempts[kernel.key] = kernel.had
        commit(self.work, self.db_dir, self.attempts)

    def first_rounds(self) -> None:
        """Phase 1: one round for every kernel that lacks it, scaled to the time left."""
        pending = [(i, k) for i, k in enumerate(self.plan) if k.lacks >= _MIN_ROUND]
        for j, (i, kernel) in enumerate(pending):
            planned = sum(k.lacks for _, k in pending[j:])
            fits = self.affordable(kernel)
            n = min(_fit(kernel.lacks, planned, fits), int(fits))
            if n < _MIN_ROUND:
                break
            self.run_round(i, kernel, n)

    def more_rounds(self, trials: int) -> None:
        """Phase 2: the rest of the budget where the measured time is."""
        remaining = trials - sum(max(k.had, k.first) for k in self.plan)
        while remaining >= _MIN_ROUND and self.left() > 0:
            i, kernel = max(enumerate(self.plan), key=lambda item: self.time_per_trial(item[1]))
            n = min(_ROUND, remaining, int(self.affordable(kernel)))
            if n < _MIN_ROUND:
                break
            self.run_round(i, kernel, n)
            remaining -= n

    def count_outcome(self) -> None:
        """Tuned, reused and skipped kernels into the stats."""
        stats = self.stats
        stats.tuned = len(self.tuned)
        unfinished = sum(1 for k in self.plan if k.key not in self.tuned and k.lacks >= _MIN_ROUND)
        stats.skipped += unfinished
        stats.reused = len(self.plan) - stats.tuned - unfinished


def _task_is_tuned(db, task) -> bool:
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return False
    return db.query_tuning_record(mod, task.target, "main") is not None


def _fit(budget: int, planned: int, affordable: float) -> int:
    """``budget`` scaled down so that the kernels still planned fit the time left.

    Without this a time budget spent itself on the first kernels' large shares and left
    the rest on default schedules (mini CNN: 3 of 10 kernels tuned in 19 min); scaled,
    every kernel gets its proportion of what the time allows (at least 8 trials), and
    the rate is re-measured after each kernel.
    """
    if planned <= affordable:
        return budget
    return max(_MIN_ROUND, int(budget * affordable / max(1, planned)))


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
    floor = min(_MIN_TRIALS, max(_MIN_ROUND, trials // n))
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
