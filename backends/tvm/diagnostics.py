"""Keeping TVM quiet and its errors short.

TVM writes C++ log lines straight to file descriptor 2, MetaSchedule logs a table per
task, and TVM's exceptions carry a native traceback before their message. gcomp reports
its own progress and one-line errors: these helpers silence the noise around a call
(errors still arrive as exceptions) and cut an exception down to its message.
"""

from __future__ import annotations

__all__ = ["first_line", "native_stderr_off", "quiet_meta_schedule", "warnings_off"]

import contextlib
import logging

# The artifact loader travels alone (gcomp bundle), so the helper lives there.
from gcomp.backends.tvm.artifact import native_stderr_off


def first_line(e: BaseException) -> str:
    """The message of a TVM exception (at most 300 characters), without its traceback."""
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors put the message after a traceback; the last line is the message.
    for line in reversed(lines):
        if not line.startswith(("  File", "File ", "Traceback", "  ")):
            return line.strip()[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]


@contextlib.contextmanager
def warnings_off():
    """Python warnings off around a call (the ONNX importer warns per op)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quiet_meta_schedule() -> None:
    """MetaSchedule's loggers to warnings only, not propagated: it logs a table per task
    to stdout, and gcomp shows its own progress."""
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
