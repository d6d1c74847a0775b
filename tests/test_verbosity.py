"""``-q`` and ``-v`` on every gcomp command, and shell completion, as the real command.

-q: no progress, notes or tables; a command that writes a file prints nothing, one that
writes none prints its answer. -v: timed progress lines on stderr (``optimize``: one per
pass run), ending with ``done``, and the normal output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
STEP = re.compile(r"^\[\s*\d+\.\d\d s\] ")
INSPECTED = r"^.*default\.onnx: 241 nodes, 590,336 parameters \(2\.3 MiB\), opsets ai\.onnx=17$"


def gcomp(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=300, env=env)


@pytest.fixture(scope="module")
def verbose_profile(tmp_path_factory):
    """``gcomp profile -v --report p.json`` (profiling takes seconds: run once, its output
    checked as the -v case of ``profile`` and its report fed to ``gcomp report``)."""
    path = tmp_path_factory.mktemp("profile") / "p.json"
    proc = gcomp("profile", DEFAULT, "--iters", "2", "--warmup", "0", "--report", path, "-v")
    assert proc.returncode == 0, proc.stderr
    return path, proc


@pytest.fixture
def profile_json(verbose_profile):
    return verbose_profile[0]


# Each command, and the -q answer it prints: None when it writes a file (nothing printed),
# else a pattern every stdout line must match and how many lines there are.
COMMANDS = {
    "optimize": (["optimize", DEFAULT, "-o", "{tmp}/o.onnx", "-O", "1"], None),
    "passes": (["passes"], (r"^(O[0-3]|[a-z][a-z0-9-]+)$", None)),
    "inspect": (["inspect", DEFAULT], (INSPECTED, 1)),
    "verify": (["verify", DEFAULT, DEFAULT], (r"^verified: 1 output\(s\) match, max abs error 0$", 1)),
    "profile": (["profile", DEFAULT, "--iters", "2", "--warmup", "0"],
                (r"^.*default\.onnx on ort/cpu: p50 \d+\.\d{3} ms, min \d+\.\d{3} ms over 2 runs$", 1)),
    "compile": (["compile", DEFAULT, "--backend", "ort"],
                (r"^compiled for ort/cpu in \d+\.\d s; verification passed \(max abs error .+\)$", 1)),
    "report": (["report", "{profile}", "{profile}", "-o", "{tmp}/cmp.html"], None),
    "run": (["run", DEFAULT, "--simulate", "--shard", "tp=2", "--check"],
            (r"^check against the unsharded model: max abs error \S+ \(tolerance 0\.0001\): passed$", 1)),
    "shard": (["shard", DEFAULT, "-o", "{tmp}/s.onnx", "--shard", "tp=2"], None),
}


def _args(name, tmp_path, profile_json):
    return [str(a).format(tmp=tmp_path, profile=profile_json) for a in COMMANDS[name][0]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_quiet_prints_only_the_answer(tmp_path, profile_json, name):
    proc = gcomp(*_args(name, tmp_path, profile_json), "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    answer = COMMANDS[name][1]
    if answer is None:  # the command wrote a file: that is its answer
        assert proc.stdout == ""
        assert any(tmp_path.iterdir())
        return
    pattern, count = answer
    lines = proc.stdout.splitlines()
    assert lines and all(re.match(pattern, line) for line in lines), proc.stdout
    assert count is None or len(lines) == count, proc.stdout
    if name == "passes":
        assert {"O1", "O3", "cse", "fold-constants"} <= set(lines)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_verbose_adds_timed_progress_lines(tmp_path, verbose_profile, name):
    if name == "profile":
        proc = verbose_profile[1]
    else:
        proc = gcomp(*_args(name, tmp_path, verbose_profile[0]), "-v")
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if STEP.match(line)]
    assert len(steps) >= 2 and steps[-1].endswith("] done"), proc.stderr
    seconds = [float(line[1:].split(" s]")[0]) for line in steps]
    assert seconds == sorted(seconds)
    assert proc.stdout.strip() or name == "report", "verbose keeps the normal output"
    if name == "profile":
        assert "GFLOP per run" in proc.stdout and re.search(r"\] profiling on ort/cpu: ", proc.stderr)
    if name == "optimize":  # pass by pass, with its time and what it changed
        runs = [line for line in steps if " pass " in line]
        assert any(re.search(r"\] pass fold-constants \(round 1\): \d+\.\d ms, \d+ → \d+ nodes$", line)
                   for line in runs), proc.stderr
        assert any(line.endswith("unchanged") for line in runs)
        assert "gcomp optimize — pipeline O1" in proc.stdout


@pytest.mark.parametrize("name", ["optimize", "passes"])
def test_quiet_and_verbose_together_are_refused(tmp_path, name):
    proc = gcomp(*_args(name, tmp_path, None), "-q", "-v")
    assert proc.returncode == 2
    assert proc.stderr == "gcomp: error: -q and -v cannot be combined\n"


def test_optimize_quiet_still_shows_warnings(tmp_path, small_model):
    """-q hides progress and tables, not what the user must know about the output."""
    import onnx
    from onnx import helper

    from tests.conftest import make_model, vinfo

    proto = make_model(
        [helper.make_node("Identity", ["x"], ["t"], name="i"),
         helper.make_node("Frobnicate", ["t"], ["y"], name="f", domain="com.example")],
        [vinfo("x")], [vinfo("y")], extra_opsets=[helper.make_opsetid("com.example", 1)],
    )
    onnx.save(proto, tmp_path / "custom.onnx")
    proc = gcomp("optimize", tmp_path / "custom.onnx", "-o", tmp_path / "o.onnx", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: not verified"), proc.stderr


def test_shell_completion_script_and_answers():
    env = dict(os.environ, _GCOMP_COMPLETE="bash_source")
    script = gcomp(env=env)
    assert script.returncode == 0, script.stderr
    assert "_gcomp_completion()" in script.stdout and "complete -o nosort -F _gcomp_completion gcomp" in script.stdout
    env = dict(os.environ, _GCOMP_COMPLETE="bash_complete", COMP_WORDS="gcomp optimize --verb", COMP_CWORD="2")
    words = gcomp(env=env)
    assert words.stdout.split() == ["plain,--verbose"]
    env.update(COMP_WORDS="gcomp ver", COMP_CWORD="1")
    assert gcomp(env=env).stdout.split() == ["plain,verify"]
    zsh = gcomp(env=dict(os.environ, _GCOMP_COMPLETE="zsh_source"))
    assert "#compdef gcomp" in zsh.stdout
