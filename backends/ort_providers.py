"""ONNX Runtime execution providers: their names, which this build offers, and sessions
that really run on the one asked for.

What is guaranteed:

- :func:`resolve_provider` accepts a provider as ``onnxruntime.get_available_providers()``
  spells it (``CUDAExecutionProvider``) or by its short name (``cuda``, ``tensorrt``,
  ``openvino``, ``dml``, ``coreml``, ``rocm``...), case-insensitively, and returns ORT's
  spelling. A name ORT does not know, or one this build does not offer, is an
  :class:`~gcomp.errors.OptionError` (exit 2) listing, in one line, those it offers.
- :func:`short_name` is the ORT backend's target name of a provider (``cuda``).
- :func:`parse_provider_options` turns ``KEY=VALUE`` strings into the provider's options;
  a malformed one is an OptionError.
- :func:`session_request` is what ``InferenceSession`` gets: the provider with its options,
  then ``CPUExecutionProvider`` as the fallback for the nodes it does not take.
- :func:`effective_options`: the options given, over gcomp's defaults for the provider
  (:data:`DEFAULT_OPTIONS`: CUDA computes fp32 in full fp32, not TF32, unless told).
- :func:`check_machine` refuses, before any library loads, a provider that needs an NVIDIA
  GPU on a machine without one. onnxruntime-gpu *reports* CUDA and TensorRT as available
  whatever the machine; asked for them without a GPU, CUDA's session silently runs every
  node on the CPU (its library fails to load, ORT logs it and carries on) and TensorRT's
  prints a banner on stdout and retries on the CPU (``docs/measurements.md``).
- :func:`check_session` refuses a session that left the provider out anyway (its
  ``get_providers()`` is the truth), naming ORT's reason from its log
  (:func:`native_stderr` captures it), and an option the provider did not take. No
  fallback to the CPU is ever silent: it is a :class:`ProviderError`. An option the
  provider rejects outright (:func:`option_error`) is an OptionError, exit 2.
"""

from __future__ import annotations

__all__ = [
    "CPU",
    "DEFAULT_OPTIONS",
    "NEEDS_NVIDIA_GPU",
    "ProviderError",
    "available_providers",
    "check_machine",
    "check_session",
    "effective_options",
    "native_stderr",
    "option_error",
    "parse_provider_options",
    "resolve_provider",
    "session_request",
    "short_name",
]

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping

from gcomp.backends._device import nvidia_gpu_present

from gcomp.errors import BackendError, OptionError

CPU = "CPUExecutionProvider"
_SUFFIX = "ExecutionProvider"
# Providers that run on an NVIDIA GPU: refused up front on a machine without one.
NEEDS_NVIDIA_GPU = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")
# Short names that are not the provider's name less "ExecutionProvider", lower-cased.
# ROCm left ORT's list of providers in 1.23; its name is still recognised (and refused as
# not available) rather than called unknown.
_ALIASES = {"trt": "TensorrtExecutionProvider", "directml": "DmlExecutionProvider",
            "rocm": "ROCMExecutionProvider", "tensorrt-rtx": "NvTensorRTRTXExecutionProvider"}


# Options gcomp gives a provider unless the command line gives them. CUDA runs fp32 MatMul
# and Conv in TF32 on Ampere and later GPUs by default (use_tf32=1): on an H200 that put the
# 2-layer test model 1.9e-3 off the CPU reference, 3486 of its 4096 outputs beyond fp32
# tolerances, against 1.7e-6 with use_tf32=0 (docs/measurements.md). gcomp verifies and
# chooses backends at fp32 tolerances, so TF32 is something a user opts into
# (--provider-option use_tf32=1), and profiles time what verification checked.
DEFAULT_OPTIONS: dict[str, dict[str, str]] = {"CUDAExecutionProvider": {"use_tf32": "0"}}


class ProviderError(BackendError):
    """The execution provider asked for cannot run here (exit 1): no GPU for it, its
    library does not load, or ONNX Runtime left it out of the session."""


def _ort():
    from gcomp.deps import ensure_onnxruntime

    ensure_onnxruntime()  # one line when two ONNX Runtime builds share its folder, or none is installed
    import onnxruntime

    return onnxruntime


def available_providers() -> list[str]:
    """The providers this ONNX Runtime build offers, in ORT's order of preference."""
    return list(_ort().get_available_providers())


def short_name(provider: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda``: the ORT backend's target name for it."""
    base = provider.removesuffix(_SUFFIX)
    return base.lower()


def resolve_provider(name: str, *, what: str = "--provider") -> str:
    """ORT's spelling of ``name`` (full or short, any case), which this build must offer."""
    ort = _ort()
    available = available_providers()
    names: dict[str, str] = {}
    for provider in [*ort.get_all_providers(), *_ALIASES.values(), *available]:
        names[provider.lower()] = provider
        names[short_name(provider)] = provider
    names.update(_ALIASES)
    found = names.get(str(name).strip().lower())
    offered = ", ".join(available)
    if found is None:
        raise OptionError(f"{what} {name}: not an ONNX Runtime execution provider; available here: {offered}")
    if found not in available:
        raise OptionError(f"{what} {name}: {found} is not in this ONNX Runtime build ({ort.__version__}); "
                          f"available here: {offered}")
    return found


def parse_provider_options(items: Iterable[str], *, what: str = "--provider-option") -> dict[str, str]:
    """``["device_id=0", "gpu_mem_limit=2147483648"]`` -> ``{"device_id": "0", ...}``
    (ORT takes provider options as strings); later entries win."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise OptionError(f"{what} '{item}': expected KEY=VALUE, e.g. device_id=0")
        options[key.strip()] = value.strip()
    return options


def effective_options(provider: str, options: Mapping[str, str] | None) -> dict[str, str]:
    """``options`` over :data:`DEFAULT_OPTIONS` of ``provider``: what its session gets."""
    return {**DEFAULT_OPTIONS.get(provider, {}), **dict(options or {})}


def option_error(provider: str, error: BaseException) -> OptionError | None:
    """An OptionError when ORT refused the session over an option the provider does not
    have (CUDA: ``Unknown provider option: "x"``), else None."""
    m = re.search(r'Unknown provider option: "?([^"\s]+)"?', str(error))
    if m is None:
        return None
    return OptionError(f"--provider-option {m.group(1)}: {provider} has no such option")


def session_request(provider: str, options: Mapping[str, str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """(providers, provider_options) for ``InferenceSession``: ``provider`` with its
    options, then the CPU for the nodes it does not take (the CPU alone for the CPU)."""
    if provider == CPU:
        return [CPU], [dict(options or {})]
    return [provider, CPU], [dict(options or {}), {}]


def check_machine(provider: str) -> None:
    """Refuse a GPU provider on a machine without an NVIDIA GPU, before ORT loads its
    library (which would fail loudly and leave a CPU-only session)."""
    if provider in NEEDS_NVIDIA_GPU and not nvidia_gpu_present():
        raise ProviderError(
            f"{provider} needs a CUDA GPU and this machine has none (no /dev/nvidia0): ONNX Runtime would "
            f"run every node on {CPU} instead; use --provider cpu, or a machine with an NVIDIA GPU"
        )


def check_session(session, provider: str, options: Mapping[str, str] | None, log: str = "") -> None:
    """The session must run on ``provider`` and have taken every given option.

    ``log`` is what ORT wrote on stderr while the session was made: its reason when it
    dropped the provider (a library that did not load)."""
    used = list(session.get_providers())
    if provider not in used:
        raise ProviderError(
            f"ONNX Runtime could not use {provider} ({_reason(log)}); the session fell back to "
            f"{', '.join(used)}, so nothing was run"
        )
    if options:
        taken = session.get_provider_options().get(provider, {})
        unknown = [k for k in options if k not in taken]
        if unknown:
            takes = f"it takes: {', '.join(sorted(taken))}" if taken else "it reports no options"
            raise OptionError(f"--provider-option {unknown[0]}: {provider} ignored it ({takes})")


def _reason(log: str) -> str:
    """ORT's own words for a provider it dropped: the library it could not load, else its
    last error line."""
    for line in reversed(log.splitlines()):
        m = re.search(r"Failed to load library (\S+) with error: (.+?)(?:\x1b\[m)?$", line)
        if m:
            return f"{os.path.basename(m.group(1))} did not load: {m.group(2).strip()}"
    errors = [line for line in log.splitlines() if "[E:onnxruntime" in line]
    if errors:
        return re.sub(r"\x1b\[[0-9;]*m", "", errors[-1].split("] ", 1)[-1]).strip()
    return "ONNX Runtime gave no reason"


class _Captured:
    text = ""


@contextlib.contextmanager
def native_stderr() -> Iterator[_Captured]:
    """Capture what native code writes to file descriptor 2 meanwhile (ONNX Runtime's
    logger writes there, not through Python); the text is on the yielded object after
    the block. Python's ``sys.stderr`` is flushed first so nothing of its is lost."""
    captured = _Captured()
    with contextlib.suppress(AttributeError, ValueError):
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", errors="replace")
