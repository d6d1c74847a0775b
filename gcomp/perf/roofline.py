"""The machine's roofline: peak FLOP/s and memory bandwidth, and where an op sits under it.

Peaks come from two sources, both reported:

- *theoretical*: fp32 SIMD lanes (from the CPU's vector extensions in ``/proc/cpuinfo``:
  AVX-512 16, AVX2/AVX 8, SSE/NEON 4) x 2 (a fused multiply-add is 2 FLOPs) x FMA units
  per core (assumed 2 with FMA, 1 without: ``/proc/cpuinfo`` does not say) x cores x
  clock (``cpuinfo_max_freq`` where the kernel exposes it, else ``cpu MHz``);
- *measured*, by a short calibration in each process (about 1 s; docs/measurements.md):
  square float32 matrix products of several sizes (:data:`GEMM_SIZES`) with numpy's BLAS
  and with ONNX Runtime's MatMul (MLAS, the library the profiled kernels use; weights
  constant, so pre-packed as in a model), all cores, the best GFLOP/s of any; and a
  large array copy (read + write, buffers well past the last-level cache) for bandwidth.

The roofline uses the measured figures (what software reaches); the theoretical peak is
drawn as a second roof. ``Machine.peak_method``/``bandwidth_method`` say how each figure
was obtained, and reports print them. The calibration is kept for the life of the
process only: a figure measured on a busy machine must not outlive the moment it was
taken. A kernel measured above the roof (:func:`judge`) is a calibration (or timing)
error, never an efficiency above 100 %.
"""

from __future__ import annotations

__all__ = ["GEMM_SIZES", "Machine", "RoofJudgement", "attainable", "classify", "cpu_features", "cpu_model", "judge",
           "machine"]

import base64
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
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
# Square float32 matrix products timed for the compute roof (n x n by n x n each).
GEMM_SIZES = (256, 512, 1024)
# Bytes copied for the bandwidth (well past the last-level cache of the CPUs we run on).
COPY_BYTES = 256 << 20


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
    cached: bool = False  # kept for old readers: calibrations are no longer cached on disk
    peak_method: str = ""  # how peak_gflops was obtained, in words
    bandwidth_method: str = ""  # how bandwidth_gbs was obtained, in words
    gemm_gflops: dict[str, float] | None = None  # every timed product: "numpy 512" -> GFLOP/s

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


def _best_seconds(run: Callable[[], object], seconds: float, min_runs: int = 3) -> float:
    """The fastest of repeated calls of ``run`` (after one untimed call), for about
    ``seconds`` and at least ``min_runs`` times."""
    run()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def _numpy_gemm(n: int) -> Callable[[], object]:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    return lambda: np.matmul(a, b, out=c)


def gemm_model(n: int) -> bytes:
    """A one-node ONNX model: MatMul of an n x n input by a constant n x n weight."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random((n, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _ort_gemm(model: bytes | None, n: int) -> Callable[[], object] | None:
    """ONNX Runtime running ``model`` (:func:`gemm_model` of ``n``); None without either."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return None
    if model is None:
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = {"a": np.random.default_rng(1).random((n, n), dtype=np.float32)}
    return lambda: session.run(None, feeds)


def _measure_flops(models: dict[int, bytes] | None = None, seconds: float = 0.3) -> dict[str, float]:
    """GFLOP/s of every square float32 matrix product of :data:`GEMM_SIZES`, with numpy's
    BLAS and with ONNX Runtime's MatMul on ``models`` (:func:`gemm_model` by size; built
    here when not given), ``seconds`` in all: ``{"numpy 512": ...}``."""
    if models is None:
        models = {n: gemm_model(n) for n in GEMM_SIZES}
    makers = (("numpy", lambda n: _numpy_gemm(n)), ("onnxruntime", lambda n: _ort_gemm(models.get(n), n)))
    share = seconds / (len(makers) * len(GEMM_SIZES))
    figures = {}
    for library, make in makers:
        for n in GEMM_SIZES:
            run = make(n)
            if run is not None:
                figures[f"{library} {n}"] = 2 * n**3 / _best_seconds(run, share) / 1e9
    return figures


def _measure_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 3) -> float:
    import numpy as np

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = _best_seconds(lambda: np.copyto(dst, src), 0.0, min_runs=repeats)
    return 2 * nbytes / best / 1e9  # read + write


_MEMO: dict[str, Machine] = {}
CALIBRATION_TIMEOUT_S = 120


def machine(*, calibrate: bool = True, refresh: bool = False) -> Machine:
    """This machine's peaks; calibrates once per process (``refresh=True``: again).

    ``calibrate=False`` never measures: it returns this process's calibration if there is
    one, else the theoretical peak and no bandwidth. A calibration that fails leaves the
    theoretical peak, with the reason in ``peak_method``.
    """
    if not refresh and "measured" in _MEMO:
        return _MEMO["measured"]
    info = _cpuinfo()
    cores = os.cpu_count() or 1
    cpu = info.get("model name") or platform.processor() or "unknown"
    bits, fma, clock, theoretical = _theoretical(info, cores)
    base = Machine(cpu, cores, bits, fma, clock, theoretical, None, None, theoretical, "theoretical",
                   peak_method=_theory_words(bits, fma, cores, clock))
    if not calibrate:
        return base
    t0 = time.perf_counter()
    try:
        gemms, bandwidth = _calibrate()
    except (OSError, ValueError, KeyError, TypeError, subprocess.SubprocessError) as e:
        base.peak_method += f" (calibration failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r})"
        return base
    best = max(gemms, key=gemms.get)
    result = Machine(
        cpu, cores, bits, fma, clock, theoretical, gemms[best], bandwidth, gemms[best], "measured",
        calibration_seconds=time.perf_counter() - t0,
        peak_method=(f"measured for this run: best of float32 matrix products {_sizes_words()} with numpy "
                     f"and ONNX Runtime MatMul on {cores} cores ({best} fastest)"),
        bandwidth_method=f"measured for this run: best of 3 copies of {COPY_BYTES >> 20} MiB (read + write)",
        gemm_gflops=gemms,
    )
    _MEMO["measured"] = result
    return result


def _calibrate() -> tuple[dict[str, float], float]:
    """(GFLOP/s per matrix product, bandwidth GB/s), measured in a child process.

    A child, so the calibration's buffers (two of :data:`COPY_BYTES`) never count in this
    process's peak RSS, which profiles report, and its BLAS threads do not linger here
    beside the runtime being profiled. It runs this file alone, without gcomp or onnx
    (half a second to import): the MatMul models are built here and sent on its stdin."""
    try:
        models = {str(n): base64.b64encode(gemm_model(n)).decode() for n in GEMM_SIZES}
    except ImportError:  # no onnx: numpy's products only
        models = {}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--calibrate"], input=json.dumps(models),
                          capture_output=True, text=True, timeout=CALIBRATION_TIMEOUT_S, check=True)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    gemms = {str(k): float(v) for k, v in figures["gemm_gflops"].items()}
    if not gemms:
        raise ValueError("no matrix product could be timed")
    return gemms, float(figures["bandwidth_gbs"])


def _sizes_words() -> str:
    return ", ".join(f"{n}x{n}" for n in GEMM_SIZES)


def _theory_words(bits: int, fma: int, cores: int, clock: float | None) -> str:
    if not bits or clock is None:
        return "unknown: no vector width or clock in /proc/cpuinfo"
    return f"theoretical: {bits}-bit vectors x 2 (FMA) x {fma} FMA units x {cores} cores x {clock:.2f} GHz"


def attainable(peak_gflops: float | None, bandwidth_gbs: float | None, intensity: float | None) -> float | None:
    """The roof at ``intensity`` FLOP/byte: min(compute peak, intensity x bandwidth), GFLOP/s."""
    if not peak_gflops or not bandwidth_gbs or intensity is None:
        return None
    return min(peak_gflops, intensity * bandwidth_gbs)


@dataclass(frozen=True)
class RoofJudgement:
    """Where a measured rate sits under its roof. ``efficiency`` is None when the rate is
    above the roof: that is a calibration (or timing) error, not an efficiency."""

    attainable_gflops: float | None
    efficiency: float | None
    above_roof: bool


def judge(gflops: float | None, roof_gflops: float | None) -> RoofJudgement:
    """``gflops`` measured where the roof allows ``roof_gflops``: its share of the roof, or
    ``above_roof`` (efficiency None) when it exceeds it; nothing known without both."""
    if gflops is None or not roof_gflops or roof_gflops <= 0:
        return RoofJudgement(roof_gflops, None, False)
    share = gflops / roof_gflops
    if share > 1.0:
        return RoofJudgement(roof_gflops, None, True)
    return RoofJudgement(roof_gflops, share, False)


def classify(flops: int | None, nbytes: int | None, ridge: float | None) -> str | None:
    """ "compute" when the op's arithmetic intensity reaches the ridge point, else "memory";
    None when the op's FLOPs are unknown. Ops with no arithmetic are memory-bound."""
    if flops is None or not nbytes or ridge is None:
        return None
    return "compute" if flops / nbytes >= ridge else "memory"


if __name__ == "__main__" and sys.argv[1:] == ["--calibrate"]:  # the child of _calibrate
    _models = {int(n): base64.b64decode(data) for n, data in json.loads(sys.stdin.read() or "{}").items()}
    print(json.dumps({"gemm_gflops": _measure_flops(_models), "bandwidth_gbs": _measure_bandwidth()}))
