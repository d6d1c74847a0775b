"""The one exception family of gcomp.

Every error a user can cause (a bad file, a bad option, a model gcomp cannot
handle) is a :class:`GcompError`. The CLI prints its message as one line and
exits with its ``exit_code``; anything else escaping is a bug in gcomp.
"""

from __future__ import annotations

__all__ = [
    "GcompError",
    "ModelLoadError",
    "ModelSaveError",
    "OptionError",
    "PassFailedError",
    "VerificationError",
    "BackendError",
    "first_line",
]


class GcompError(Exception):
    """Base of every error gcomp raises on purpose."""

    exit_code = 1


class ModelLoadError(GcompError):
    """The input model cannot be read: missing, not ONNX, corrupt, invalid, missing data."""


class ModelSaveError(GcompError):
    """The output cannot be written where asked (same as the input, unwritable, ...)."""


class OptionError(GcompError):
    """An unknown pipeline, pass or option, or an option value of the wrong type."""

    exit_code = 2


class PassFailedError(GcompError):
    """A pass raised while transforming the model; names the pass."""


class VerificationError(GcompError):
    """The transformed model's outputs differ from the original's beyond tolerance."""


class BackendError(GcompError):
    """A backend could not compile or run the model."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none:
    what gcomp shows of an error it did not raise itself."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
