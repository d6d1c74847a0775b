"""ONNX Runtime execution providers on the command line: ``--provider`` and
``--provider-option`` on ``verify``, ``profile``, ``run`` and ``--backend auto``, run as
the real commands in a subprocess.

The CPU provider is exercised fully; the others through what a machine without a GPU
(CI's) can show: an unknown name, a provider this build does not offer, a conflict with
``--device``, malformed options, and CUDA asked for where it cannot run, which must be one
clear line, never a silent run on the CPU. Which providers the installed ONNX Runtime
offers is read at run time (onnxruntime-gpu reports CUDA and TensorRT, the plain build
only the CPU), and each case asserts what that build must answer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import onnxruntime
import pytest
from gcomp.backends._device import nvidia_gpu_present

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
CPU = "CPUExecutionProvider"
AVAILABLE = onnxruntime.get_available_providers()
AVAILABLE_LINE = "available here: " + ", ".join(AVAILABLE)
# A provider ONNX Runtime knows but this build does not offer (OpenVINO, DirectML...).
ABSENT = next(p for p in onnxruntime.get_all_providers() if p not in AVAILABLE)
CUDA_BUILT = "CUDAExecutionProvider" in AVAILABLE


def gcomp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=300, cwd=cwd)


def one_line_error(proc, code: int, *contains: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gcomp: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "EP Error" not in proc.stdout
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("providers") / "default.opt.onnx"
    proc = gcomp("optimize", DEFAULT, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    return out


# --- the CPU provider, end to end -----------------------------------------------------------


def test_provider_names_in_any_spelling():
    from gcomp.backends.ort_providers import resolve_provider, short_name

    for spelling in ("CPUExecutionProvider", "cpu", "Cpu", "cpuexecutionprovider", " CPU "):
        assert resolve_provider(spelling) == CPU
    for provider in AVAILABLE:  # every provider this build offers, by its full and its short name
        assert resolve_provider(provider) == resolve_provider(short_name(provider).upper()) == provider
    assert short_name("TensorrtExecutionProvider") == "tensorrt" and short_name("DmlExecutionProvider") == "dml"


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """``gcomp profile --device cpu --provider Cpu`` (they agree): its output and its JSON report."""
    path = tmp_path_factory.mktemp("cpu") / "p.json"
    proc = gcomp("profile", DEFAULT, "--device", "cpu", "--provider", "Cpu", "--iters", "2", "--warmup", "0",
                 "--report", path)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(path.read_text())


def test_profile_on_the_cpu_provider_names_it_per_node(cpu_profile):
    _, doc = cpu_profile
    assert doc["backend"]["provider"] == CPU and doc["backend"]["target"] == "cpu"
    assert doc["backend"]["providers"] == [CPU]  # what the session really used
    assert doc["ops"] and {op["provider"] for op in doc["ops"]} == {CPU}  # always in the JSON


def test_profile_table_has_no_provider_column_when_one_provider_ran(cpu_profile):
    proc, _ = cpu_profile
    assert "on ort/cpu" in proc.stdout and "op type" in proc.stdout
    assert "provider" not in proc.stdout and "execution providers" not in proc.stdout


def test_verify_runs_the_candidate_on_the_provider(optimized):
    proc = gcomp("verify", DEFAULT, optimized, "--provider", "CPU", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "passed"


def test_run_on_the_cpu_provider_says_so():
    proc = gcomp("run", DEFAULT, "--simulate", "--provider", "cpu", "--check")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"2 ranks \(simulated in one process\), \d+ collectives, on {CPU}$", proc.stdout, re.MULTILINE)
    assert "check against the unsharded model" in proc.stdout and "passed" in proc.stdout


@pytest.mark.slow
def test_backend_auto_races_ort_on_the_provider():
    proc = gcomp("profile", DEFAULT, "--backend", "auto", "--provider", "cpu", "--iters", "2", "--warmup", "0",
                 "--json")
    assert proc.returncode == 0, proc.stderr
    candidates = json.loads(proc.stdout)["backend_selection"]["candidates"]
    ort = [c for c in candidates if c["backend"] == "ort"]
    assert [(c["target"], c["status"]) for c in ort] == [("cpu", "ok")]
    assert all(c["target"] in ("llvm", "cpu") for c in candidates)  # the CPU provider's device only


def test_optimize_takes_a_provider_for_the_backend_choice_only(tmp_path):
    plan = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--backend", "auto", "--provider", "cpu",
                 "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert f"backend choice on (ONNX Runtime on {CPU})" in plan.stdout
    proc = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--provider", "cpu")
    one_line_error(proc, 2, "--provider applies to --backend auto")
    assert not (tmp_path / "o.onnx").exists()


def test_a_recipe_holds_the_provider_and_its_options(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('backend = "auto"\nprovider = "cpu"\nprovider-option = ["a=1", "b=2"]\n')
    plan = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--config", recipe, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert f"(ONNX Runtime on {CPU} with a=1, b=2)" in plan.stdout
    for text, message in (('provider = "tpu"', "provider: tpu: not an ONNX Runtime execution provider"),
                          ('provider = "cpu"\nprovider-option = ["a"]', "provider-option: 'a': expected KEY=VALUE")):
        recipe.write_text('backend = "auto"\n' + text + "\n")
        proc = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--config", recipe, "--dry-run")
        one_line_error(proc, 2, f"{recipe}: {message}")


# --- names: unknown, not in this build, conflicting -------------------------------------------

COMMANDS = {
    "profile": ["profile", str(DEFAULT), "--iters", "1"],
    "verify": ["verify", str(DEFAULT), str(DEFAULT)],
    "run": ["run", str(DEFAULT), "--simulate"],
    "optimize-auto": ["optimize", str(DEFAULT), "-o", "{tmp}/o.onnx", "--backend", "auto"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_provider_lists_the_available_ones(command, tmp_path):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    proc = gcomp(*args, "--provider", "tpu")
    one_line_error(proc, 2, "--provider tpu: not an ONNX Runtime execution provider", AVAILABLE_LINE)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("name", [ABSENT.removesuffix("ExecutionProvider").upper(), "rocm"])
def test_a_provider_this_build_lacks_lists_the_available_ones(name):
    proc = gcomp("profile", DEFAULT, "--provider", name, "--iters", "1")
    canonical = "ROCMExecutionProvider" if name == "rocm" else ABSENT  # ROCm left ORT's list in 1.23
    one_line_error(proc, 2, f"--provider {name}: {canonical} is not in this ONNX Runtime build", AVAILABLE_LINE)


def test_device_and_provider_must_agree():
    proc = gcomp("profile", DEFAULT, "--device", "cuda", "--provider", "cpu", "--iters", "1")
    one_line_error(proc, 2, "--device cuda conflicts with --provider cpu",
                   "--device cuda means --provider CUDAExecutionProvider")


def test_provider_is_for_onnx_runtime_only():
    proc = gcomp("profile", DEFAULT, "--backend", "tvm", "--provider", "cpu")
    one_line_error(proc, 2, "--provider names an ONNX Runtime execution provider")


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--provider", "cpu", "--provider-option", "device_id"], "--provider-option 'device_id': expected KEY=VALUE"),
    (["--provider", "cpu", "--provider-option", "=1"], "--provider-option '=1': expected KEY=VALUE"),
    (["--provider", "cpu", "--provider-option", "device_id="], "--provider-option 'device_id=': expected KEY=VALUE"),
    (["--provider-option", "device_id=0"], "--provider-option device_id=0: no --provider to take it"),
    # parsed, then refused by the session: the CPU provider takes no options, and ORT ignores
    # unknown ones silently, so gcomp compares with what the session reports back
    (["--provider", "cpu", "--provider-option", "device_id=0"], "CPUExecutionProvider ignored it"),
], ids=["no-equals", "no-key", "no-value", "no-provider", "not-taken"])
def test_bad_provider_options_are_one_line(args, message):
    proc = gcomp("profile", DEFAULT, "--iters", "1", "--warmup", "0", *args)
    one_line_error(proc, 2, message)


# --- CUDA where it cannot run -----------------------------------------------------------------


@pytest.mark.skipif(nvidia_gpu_present(), reason="an NVIDIA GPU is present: CUDA may run here")
@pytest.mark.parametrize("args", [
    ["profile", str(DEFAULT), "--provider", "cuda", "--iters", "1"],
    ["profile", str(DEFAULT), "--device", "cuda", "--iters", "1"],
    ["verify", str(DEFAULT), str(DEFAULT), "--provider", "cuda"],
    ["run", str(DEFAULT), "--simulate", "--provider", "cuda"],
], ids=["profile", "device", "verify", "run"])
def test_cuda_without_a_gpu_is_one_clear_line(args):
    proc = gcomp(*args)
    flag = "--device" if "--device" in args else "--provider"
    if CUDA_BUILT:  # onnxruntime-gpu reports CUDA whatever the machine: refused before ORT falls back
        one_line_error(proc, 1, "CUDAExecutionProvider needs a CUDA GPU and this machine has none")
    else:
        one_line_error(proc, 2, f"{flag} cuda", "CUDAExecutionProvider is not in this ONNX Runtime build",
                       AVAILABLE_LINE)
    assert proc.stdout == ""


FALLBACK = textwrap.dedent("""
    import sys
    import gcomp.backends.ort_providers as providers
    from gcomp.cli import main

    providers.nvidia_gpu_present = lambda: True  # let the session be made: see what ORT does
    main(sys.argv[1:])
""")


@pytest.mark.skipif(nvidia_gpu_present() or not CUDA_BUILT,
                    reason="needs onnxruntime-gpu on a machine without an NVIDIA GPU")
@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_a_session_that_falls_back_to_the_cpu_is_an_error(provider):
    """Past gcomp's own GPU check, ORT itself is asked: CUDA's session comes back on the CPU
    alone (its library fails to load) and TensorRT's fails to start. Both are one line,
    with ORT's reason, and nothing of ORT's log or banner leaks out."""
    proc = subprocess.run([sys.executable, "-c", FALLBACK, "profile", str(DEFAULT), "--provider", provider,
                           "--iters", "1"], capture_output=True, text=True, check=False, timeout=300)
    line = one_line_error(proc, 1, provider)
    assert f"fell back to {CPU}" in line or f"cannot load the model on {provider}" in line, line
    assert proc.stdout == "" and "[E:onnxruntime" not in proc.stderr


def test_a_session_without_the_provider_is_refused_with_ort_s_reason():
    """The check made on every session, on a real CPU session standing for one that lost
    its provider, with the line ORT logs when a provider library does not load."""
    from gcomp.backends.ort_providers import ProviderError, check_session

    session = onnxruntime.InferenceSession(str(DEFAULT), providers=[CPU])
    log = ("\x1b[1;31m2026-01-01 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] ... Failed to load "
           "library /x/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object "
           "file: No such file or directory\x1b[m")
    with pytest.raises(ProviderError) as e:
        check_session(session, "CUDAExecutionProvider", None, log)
    assert str(e.value) == (
        "ONNX Runtime could not use CUDAExecutionProvider (libonnxruntime_providers_cuda.so did not load: "
        "libcublasLt.so.13: cannot open shared object file: No such file or directory); the session fell back to "
        "CPUExecutionProvider, so nothing was run")
    check_session(session, CPU, None)  # the provider it has: accepted


def test_an_option_the_provider_rejects_is_an_option_error():
    """CUDA refuses an unknown option outright (measured on an H200 with onnxruntime-gpu
    1.31.1: ``Unknown provider option: "bogus_key"``); gcomp makes that exit 2, and gives
    CUDA full fp32 (use_tf32=0) unless told otherwise."""
    from gcomp.backends.ort_providers import effective_options, option_error

    ort_says = RuntimeError('[ONNXRuntimeError] : 1 : FAIL : provider_options_utils.h:182 Parse Unknown provider '
                            'option: "bogus_key".')
    error = option_error("CUDAExecutionProvider", ort_says)
    assert error is not None and error.exit_code == 2
    assert str(error) == "--provider-option bogus_key: CUDAExecutionProvider has no such option"
    assert option_error("CUDAExecutionProvider", RuntimeError("CUDA failure 2: out of memory")) is None
    assert effective_options("CUDAExecutionProvider", None) == {"use_tf32": "0"}
    assert effective_options("CUDAExecutionProvider", {"use_tf32": "1", "device_id": "0"}) == {
        "use_tf32": "1", "device_id": "0"}
    assert effective_options(CPU, None) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA_BUILT and nvidia_gpu_present()), reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_runs_the_nodes_it_takes_and_matches_the_reference(optimized):
    proc = gcomp("profile", DEFAULT, "--provider", "cuda", "--iters", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["backend"]["providers"] == ["CUDAExecutionProvider", CPU]
    assert doc["backend"]["provider_options"] == {"use_tf32": "0"}  # gcomp's default, recorded
    assert "CUDAExecutionProvider" in {op["provider"] for op in doc["ops"]}
    verify = gcomp("verify", DEFAULT, optimized, "--provider", "cuda", "--provider-option", "device_id=0", "-q")
    assert verify.returncode == 0 and verify.stdout.startswith("verified"), verify.stdout + verify.stderr
    bad = gcomp("profile", DEFAULT, "--provider", "cuda", "--provider-option", "bogus_key=1", "--iters", "1")
    one_line_error(bad, 2, "--provider-option bogus_key: CUDAExecutionProvider has no such option")


# --- profiles with several providers ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_provider_doc(cpu_profile) -> dict:
    """A real CPU profile with a third of its nodes relabelled as CUDA's, as ORT's trace names
    them when CUDA takes most of a graph and leaves some nodes to the CPU."""
    doc = json.loads(json.dumps(cpu_profile[1]))
    for op in doc["ops"][::3]:
        op["provider"] = "CUDAExecutionProvider"
    return doc


def test_reports_name_the_provider_of_each_node_when_several_ran(two_provider_doc, tmp_path):
    from rich.console import Console

    from gcomp.perf import Profile
    from gcomp.profiling import print_profile
    from gcomp.report import write_report

    console = Console(record=True, width=200)
    print_profile(Profile.from_dict(two_provider_doc), title="t", top=len(two_provider_doc["ops"]), console=console)
    text = console.export_text()
    cuda = sum(op["provider"] == "CUDAExecutionProvider" for op in two_provider_doc["ops"])
    cpu = len(two_provider_doc["ops"]) - cuda
    assert f"execution providers: CPUExecutionProvider ran {cpu} kernels, CUDAExecutionProvider ran {cuda}" in text
    header = next(line for line in text.splitlines() if "op type" in line)
    assert "provider" in header
    assert text.count(" CUDA ") == cuda and text.count(" CPU ") == cpu  # one cell per row
    html = write_report(two_provider_doc, tmp_path / "p.html").read_text()
    assert '<th class="">provider</th>' in html and html.count(">CUDAExecutionProvider</td>") == cuda
    md = write_report(two_provider_doc, tmp_path / "p.md").read_text()
    assert "| node | op type | provider | time ms |" in md and md.count("| CUDAExecutionProvider |") == sum(
        op["provider"] == "CUDAExecutionProvider" for op in two_provider_doc["ops"][:20])  # the top 20


def test_reports_leave_the_provider_column_out_for_one_provider(two_provider_doc, tmp_path):
    from gcomp.report import write_report

    one = json.loads(json.dumps(two_provider_doc))
    for op in one["ops"]:
        op["provider"] = CPU
    html = write_report(one, tmp_path / "one.html").read_text()
    assert "<th" in html and '<th class="">provider</th>' not in html
    md = write_report(one, tmp_path / "one.md").read_text()
    assert "| node | op type | time ms |" in md and "provider |" not in md

