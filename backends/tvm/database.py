"""The tuning database gcomp owns: where it lives, how it is written, how it is applied.

- It is MetaSchedule's JSON database (``database_workload.json`` plus
  ``database_tuning_record.json``), one folder per target under the cache directory
  (:func:`cache_dir`; ``GCOMP_CACHE_DIR`` or ``~/.cache/gcomp``): records are keyed by
  the workload (structural hash of the kernel) inside it, so any model with an identical
  kernel for the same target reuses the record.
- The folder also keeps how many trials each workload has had (``gcomp-trials.json``,
  :func:`read_attempts`), so tuning makes only the trials a kernel lacks.
- Tuning works in a private copy (:func:`snapshot`) and :func:`commit` copies its
  complete lines back by atomic rename under a file lock: an interrupt never leaves a
  half-written database, and a line cut by one is dropped on reading.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPTS_FILE",
    "DB_FILES",
    "apply_database",
    "cache_dir",
    "commit",
    "count_records",
    "database_dir",
    "read_attempts",
    "snapshot",
]

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from gcomp.backends.tvm.diagnostics import quiet_meta_schedule

DB_FILES = ("database_workload.json", "database_tuning_record.json")
ATTEMPTS_FILE = "gcomp-trials.json"


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
    path = Path(db_dir) / DB_FILES[1]
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


def _replace_text(db_dir: Path, name: str, text: str) -> None:
    """``db_dir/name`` replaced atomically by ``text`` (a temp file, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=db_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, db_dir / name)


def commit(work: Path, db_dir: Path, attempts: dict[str, int] | None = None) -> None:
    """Copy the work database's complete lines into ``db_dir``, each file by atomic rename.

    The work copy started from ``db_dir``'s content and only appended, so workload
    indices in the records stay valid. Workloads are written before records.
    ``attempts`` (trials per workload) is merged into the folder's own.
    """
    with _locked(db_dir):
        for name in DB_FILES:
            src = work / name
            if not src.is_file():
                continue
            _replace_text(db_dir, name, "".join(line + "\n" for line in _complete_lines(src)))
        if attempts is not None:
            merged = {**read_attempts(db_dir), **attempts}
            _replace_text(db_dir, ATTEMPTS_FILE, json.dumps(merged))


def snapshot(db_dir: Path, work: Path) -> None:
    """Copy ``db_dir``'s complete lines into the work folder (empty files when none)."""
    with _locked(db_dir):
        for name in DB_FILES:
            src = db_dir / name
            lines = _complete_lines(src) if src.is_file() else []
            (work / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_attempts(db_dir: Path) -> dict[str, int]:
    """``{workload key: trials it has had}`` from the folder (empty when unreadable)."""
    try:
        data = json.loads((db_dir / ATTEMPTS_FILE).read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def apply_database(mod, target, root: str | os.PathLike | None = None):
    """``mod`` with every kernel that has a record in the target's database scheduled."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    db_dir = database_dir(target, root)
    if count_records(db_dir) == 0:
        return mod
    quiet_meta_schedule()
    work = Path(tempfile.mkdtemp(prefix="gcomp-apply-"))
    try:
        snapshot(db_dir, work)
        db = ms.database.JSONDatabase(work_dir=str(work))
        with target, db:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    finally:
        shutil.rmtree(work, ignore_errors=True)
