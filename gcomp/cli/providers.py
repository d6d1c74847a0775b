"""``--provider NAME`` and ``--provider-option KEY=VALUE``: which ONNX Runtime execution
provider a command runs on (``verify``, ``profile``, ``run``, and ``--backend auto`` of
``profile`` and ``optimize``).

What is guaranteed: a provider is named as ``onnxruntime.get_available_providers()``
spells it or by its short name, in any case (:mod:`gcomp.backends.ort_providers`); an
unknown name or one this build does not offer is one line listing those it offers, exit
2; a malformed ``KEY=VALUE`` likewise. Where a command has ``--device``, ``--device cuda``
means ``--provider CUDAExecutionProvider`` and ``--device cpu`` the CPU's; giving both
with different providers is one line, exit 2. Options without a provider to take them
are refused the same way. A provider other than the CPU gets ``CPUExecutionProvider``
after it as the fallback for the nodes it does not take.
"""

from __future__ import annotations

__all__ = ["DEVICE_PROVIDERS", "chosen_provider", "provider_options"]

import click
from click.core import ParameterSource

from gcomp.errors import OptionError

# What --device means where a command has it.
DEVICE_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

_PROVIDER_HELP = (
    "ONNX Runtime execution provider, as onnxruntime.get_available_providers() spells it "
    "(CUDAExecutionProvider, TensorrtExecutionProvider, ...) or short: cpu, cuda, tensorrt, openvino, dml, "
    "coreml, rocm... (any case); it must be one this ONNX Runtime build offers. A provider other than the "
    "CPU gets CPUExecutionProvider after it, as the fallback for the nodes it does not take; a session "
    "that cannot use the provider at all is an error, never a silent run on the CPU."
)


def provider_options(f=None, *, help: str = _PROVIDER_HELP):
    """``--provider`` (parameter ``provider``) and ``--provider-option`` (``provider_option``,
    a tuple of ``KEY=VALUE`` strings)."""
    if f is None:
        return lambda g: provider_options(g, help=help)
    f = click.option("--provider-option", "provider_option", multiple=True, metavar="KEY=VALUE",
                     help="An option of --provider's (repeatable), as ONNX Runtime names it, e.g. "
                          "device_id=1 or trt_fp16_enable=1. CUDA gets use_tf32=0 (full fp32) unless given.")(f)
    return click.option("--provider", default=None, metavar="NAME", help=help)(f)


def _given(name: str) -> bool:
    """Whether the current command's parameter ``name`` was given (not its default)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    source = ctx.get_parameter_source(name)
    return source is not None and source is not ParameterSource.DEFAULT


def chosen_provider(provider: str | None, options: tuple[str, ...], *, device: str | None = None,
                    backend: str = "ort") -> tuple[str | None, dict[str, str]]:
    """(ORT's name of the provider asked for, or None when none was; its options).

    ``device`` is the command's ``--device`` value, if it has one: given explicitly for
    ``backend`` ``ort``, it names a provider too and must agree with ``--provider``."""
    from gcomp.backends.ort_providers import check_machine, parse_provider_options, resolve_provider

    parsed = parse_provider_options(options)
    if provider is not None and backend == "tvm":
        raise OptionError("--provider names an ONNX Runtime execution provider: use it with --backend ort or auto")
    chosen = resolve_provider(provider) if provider is not None else None
    if device is not None and _given("device"):
        implied = DEVICE_PROVIDERS.get(device)
        if chosen is not None and implied is not None and implied != chosen:
            raise OptionError(f"--device {device} conflicts with --provider {provider} (--device {device} means "
                              f"--provider {implied}); give one of them")
        if chosen is None and backend == "ort" and implied is not None:
            chosen = resolve_provider(device, what="--device")
    if parsed and chosen is None:
        raise OptionError(f"--provider-option {options[0]}: no --provider to take it (give --provider NAME)")
    if chosen is not None:
        check_machine(chosen)  # a GPU provider on a machine without one: one line before any work
    return chosen, parsed
