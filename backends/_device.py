"""What the backends share about the machine they run on.

- :func:`nvidia_gpu_present`: whether the NVIDIA driver's device files exist. Each
  backend asks this before asking its runtime about CUDA, so a machine without a GPU
  never loads CUDA libraries (onnxruntime-gpu prints loud errors when it tries).
- :func:`peak_memory`: the process's peak resident memory, for a profile's ``memory``.
"""

from __future__ import annotations

__all__ = ["nvidia_gpu_present", "peak_memory"]

from pathlib import Path


def nvidia_gpu_present() -> bool:
    """True when the NVIDIA driver's device files exist (a CUDA device may be usable)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def peak_memory() -> dict:
    """``{"peak_rss_bytes": n}``: this process's high-water resident memory; ``{}`` where
    the platform cannot say."""
    try:
        import resource

        return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    except (ImportError, OSError):
        return {}
