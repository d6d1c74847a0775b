"""The machine's roofline: peak FLOP/s and memory bandwidth, and where an op sits under it.

Peaks come from two sources, both reported:

- *theoretical*: fp32 SIMD lanes (from the CPU's vector extensions in ``/proc/cpuinfo``:
  AVX-512 16, AVX2/AVX 8, SSE/NEON 4) x 2 (a fused multiply-add is 2 FLOPs) x FMA units
  per core (assumed 2 with FMA, 1 without: ``/proc/cpuinfo`` does not say) x cores x
  clock (``cpuinfo_max_freq`` where the kernel exposes it, else ``cpu MHz``);
- *measured*, by a short calibration (about 2 s; docs/measurements.md): a float32 matrix
  product with numpy's BLAS on all cores for FLOP/s, and a large array copy (read +
  write, one thread, buffers well past the last-level cache) for bandwidth.

The roofline uses the measured figures (what software reaches); the theoretical peak is
drawn as a second roof. Calibration results are cached per machine (CPU model, cores,
vector features) in ``$GCOMP_CACHE_DIR`` or ``~/.cache/gcomp`` so later profiles and tests
do not pay for it; a broken or unwritable cache only means calibrating again.
"""

from __future__ import annotations

__all__ = ["Machine", "machine", "classify", "cpu_features", "cpu_model"]

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Vector extensions worth naming in an environment block (a subset of /proc/cpuinfo flags).
_NOTABLE_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)
CACHE_VERSION = 1


@dataclass
class Machine:
    """Peaks of this machine. ``peak_gflops``/``bandwidth_gbs`` are what the roofline uses."""

    cpu: str
    cores: int
    vector_bits: int
    fma_units: int
    clock_ghz: float | None
    theoretical_gflops: float | None
    measured_gflops: float | None
    bandwidth_gbs: float | None
    peak_gflops: float | None
    peak_source: str  # "measured" or "theoretical"
    calibration_seconds: float = 0.0
    cached: bool = False

    @property
    def ridge(self) -> float | None:
        """Arithmetic intensity (FLOP/byte) where the memory roof meets the compute roof."""
        if not self.peak_gflops or not self.bandwidth_gbs:
            return None
        return self.peak_gflops / self.bandwidth_gbs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ridge_flop_per_byte"] = self.ridge
        return d


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in info:
                    info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says, else "unknown"."""
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_features() -> list[str]:
    """The notable vector/matrix extensions of this CPU (empty when unknown)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in _NOTABLE_FLAGS if f in flags]


def _theoretical(info: dict[str, str], cores: int) -> tuple[int, int, float | None, float | None]:
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if "avx512f" in flags:
        bits = 512
    elif "avx2" in flags or "avx" in flags:
        bits = 256
    elif flags & {"sse2", "sse4_2", "asimd", "neon"}:
        bits = 128
    else:
        bits = 0
    fma = 2 if flags & {"fma", "asimd"} else 1
    clock = None
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text().strip()
        clock = int(khz) / 1e6
    except (OSError, ValueError):
        try:
            clock = float(info["cpu MHz"]) / 1e3
        except (KeyError, ValueError):
            clock = None
    if not bits or clock is None:
        return bits, fma, clock, None
    lanes = bits // 32
    return bits, fma, clock, lanes * 2 * fma * cores * clock


def _measure_flops(seconds: float = 0.4) -> float:
    import numpy as np

    n = 1024
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)  # warm the BLAS threads
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e9


def _measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 4) -> float:
    import numpy as np

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9  # read + write


def _cache_file(key: str) -> Path:
    root = Path(os.environ.get("GCOMP_CACHE_DIR") or Path.home() / ".cache" / "gcomp")
    return root / f"machine-{key}.json"


_MEMO: dict[str, Machine] = {}


def machine(*, calibrate: bool = True, refresh: bool = False) -> Machine:
    """This machine's peaks; calibrates once per machine and caches the result.

    ``calibrate=False`` never measures (uses a cached calibration if there is one, else
    the theoretical peak and no bandwidth). ``refresh=True`` measures again.
    """
    info = _cpuinfo()
    cores = os.cpu_count() or 1
    cpu = info.get("model name") or platform.processor() or "unknown"
    bits, fma, clock, theoretical = _theoretical(info, cores)
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{cpu}|{cores}|{' '.join(cpu_features())}|{platform.machine()}".encode()
    ).hexdigest()[:16]
    if not refresh and key in _MEMO:
        return _MEMO[key]
    path = _cache_file(key)
    found = None if refresh else _read_cache(path)
    cached = found is not None
    measured, bandwidth, seconds = found or (None, None, 0.0)
    if not cached and calibrate:
        t0 = time.perf_counter()
        measured, bandwidth = _measure_flops(), _measure_bandwidth()
        seconds = time.perf_counter() - t0
        _write_cache(path, {"measured_gflops": measured, "bandwidth_gbs": bandwidth,
                            "calibration_seconds": seconds, "cpu": cpu, "cores": cores})
    peak, source = (measured, "measured") if measured else (theoretical, "theoretical")
    result = Machine(cpu, cores, bits, fma, clock, theoretical, measured, bandwidth, peak, source,
                     seconds, cached)
    if measured or not calibrate:
        _MEMO[key] = result
    return result


def _read_cache(path: Path) -> tuple[float, float, float] | None:
    """(measured GFLOP/s, bandwidth GB/s, calibration seconds) from a cached calibration."""
    try:
        data = json.loads(path.read_text())
        return (float(data["measured_gflops"]), float(data["bandwidth_gbs"]),
                float(data.get("calibration_seconds", 0.0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, data: dict) -> None:
    """Write a calibration atomically (a temporary file renamed); failing only loses the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


def classify(flops: int | None, nbytes: int | None, ridge: float | None) -> str | None:
    """ "compute" when the op's arithmetic intensity reaches the ridge point, else "memory";
    None when the op's FLOPs are unknown. Ops with no arithmetic are memory-bound."""
    if flops is None or not nbytes or ridge is None:
        return None
    return "compute" if flops / nbytes >= ridge else "memory"
