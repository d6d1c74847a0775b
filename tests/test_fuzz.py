"""Fuzzing gcomp: mutated models must end in success or a clean GcompError, never a bug,
a crash or a hang (the harness is ``tests/fuzz``; a longer run: ``python -m tests.fuzz.campaign``).
"""

from __future__ import annotations

import json
import time

import onnx
import pytest

from tests.fuzz import mutations, runner, seeds

SEED = 20240601  # the bounded run's cases; change it only on purpose
CASES = 600
CLI_SAMPLE = 8


@pytest.mark.slow
def test_fuzz_bounded_run(tmp_path, capsys):
    cases = mutations.draw_cases(CASES, seed=SEED)
    t0 = time.perf_counter()
    results = runner.run_cases(cases, jobs=2, timeout=runner.DEFAULT_TIMEOUT_S, workdir=tmp_path / "work")
    checked = runner.cli_check(results, sample=CLI_SAMPLE, jobs=2)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nfuzz: {CASES} cases, seed {SEED}\n" + runner.summarize(results, seconds))
    assert len(results) == CASES
    outcomes = {o: sum(r.outcome == o for r in results) for o in runner.OUTCOMES}
    # The harness works: some cases go all the way through gcomp, some are rejected cleanly.
    assert outcomes["success"] >= CASES // 10 and outcomes["gcomp_error"] >= CASES // 10, outcomes
    assert len(checked) == CLI_SAMPLE, "too few GcompErrors to sample for the CLI check"
    failing = [r for r in results if r.outcome in runner.FAILURES]
    for r in failing:
        runner.save_case(r, tmp_path / "failures", mutations.materialize(r.case)[0])
    n_failing = len(failing)
    assert n_failing == 0, (
        f"bug {outcomes['bug']}, crash {outcomes['crash']}, hang {outcomes['hang']}; the failing cases are in "
        f"{tmp_path / 'failures'} (run one: python -m tests.fuzz.campaign --replay FILE.onnx)\n"
        + runner.format_failures(results)
    )


@pytest.mark.slow
def test_worker_classifies_crash_hang_and_restarts(tmp_path):
    """The harness itself: a crash and a hang are results, and the next op gets a fresh worker."""
    model = tmp_path / "m.onnx"
    model.write_bytes(seeds.seed_bytes("if_branches"))
    worker = runner.Worker(tmp_path, name="selftest")
    try:
        outcome = {}
        for what in ("raise", "gcomp_error", "bad_message", "crash", "exit", "hang"):
            outcome[what] = worker.call(f"_selftest:{what}", str(model), str(tmp_path / "o.onnx"), timeout=3)
        after = worker.call("inspect", str(model), "", timeout=60)
    finally:
        worker.close()
    assert outcome["raise"].outcome == "bug" and outcome["raise"].error_type == "KeyError"
    assert "Traceback" in outcome["raise"].traceback
    assert outcome["gcomp_error"].outcome == "gcomp_error"
    assert outcome["bad_message"].outcome == "bug" and "lines" in outcome["bad_message"].error_type
    assert (outcome["crash"].outcome, outcome["crash"].error_type) == ("crash", "SIGSEGV")
    assert (outcome["exit"].outcome, outcome["exit"].error_type) == ("crash", "exit code 7")
    assert outcome["hang"].outcome == "hang" and 3 <= outcome["hang"].seconds < 10
    assert after.outcome == "success"
    assert worker.starts == 4  # first start, after the crash, the exit and the hang


QUANTIZE_ARGS = ["--quantize", "int8-dynamic", "--no-speed-gate"]


def test_gcomp_args_pass_through_reaches_gcomp_and_is_recorded(tmp_path):
    """A saved case's recorded pass-through is replayed by ``--case``: every ``gcomp optimize``
    of the mlp seed (MatMuls) writes an int8-dynamic model, and the results record the args."""
    from tests.fuzz import campaign

    unchanged = {"index": 3, "seed": "mlp", "kind": "subgraph_junk",  # mlp has no subgraph: seed unchanged
                 "params": {"node": 0, "graph": 0, "pick": 0, "how": "remove_node"}}
    saved = tmp_path / "00003-subgraph_junk-mlp.json"
    saved.write_text(json.dumps({"case": unchanged, "gcomp_args": QUANTIZE_ARGS}))
    out = tmp_path / "out"
    code = campaign.main(["--case", str(saved), "--out", str(out), "--jobs", "1", "--cli-sample", "0", "--quiet"])
    assert code == 0
    (line,) = (out / "results.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert result["gcomp_args"] == QUANTIZE_ARGS
    optimizes = [o for o in result["ops"] if o["op"].startswith("optimize")]
    assert [(o["outcome"], o["quantized"]) for o in optimizes] == [("success", "int8-dynamic")] * 3, optimizes
    summary = (out / "summary.txt").read_text()
    assert "pass-through: --quantize int8-dynamic --no-speed-gate" in summary
    assert "quantized outputs: 3 of 3" in summary


def test_gcomp_args_are_checked_by_the_optimize_parser(tmp_path):
    assert runner.check_gcomp_args(QUANTIZE_ARGS) == QUANTIZE_ARGS
    for bad in (["--quantize", "int9"], ["--no-such-option"], ["-O", "2"], ["-o", "x.onnx"], ["extra.onnx"]):
        with pytest.raises(ValueError, match="--gcomp-args"):
            runner.check_gcomp_args(bad)
    from tests.fuzz import campaign

    assert campaign.main(["--cases", "1", "--out", str(tmp_path), "--gcomp-args", "--quantize int9"]) == 2


def test_cases_are_deterministic_and_every_kind_mutates():
    kinds = list(mutations.KINDS)
    first = mutations.draw_cases(3 * len(kinds), seed=1)
    assert first == mutations.draw_cases(3 * len(kinds), seed=1)
    assert {c.kind for c in first} == set(kinds)
    changed = set()
    for case in first:
        data, description = mutations.materialize(case)
        replayed = mutations.Case.from_dict(json.loads(json.dumps(case.to_dict())))  # as saved by the campaign
        assert (data, description) == mutations.materialize(replayed)
        if case.seed == mutations.SYNTHETIC_SEED or data != seeds.seed_bytes(case.seed):
            changed.add(case.kind)
    assert changed == set(kinds)


@pytest.mark.parametrize("name", seeds.SEED_NAMES)
def test_seeds_are_valid_models(name):
    onnx.checker.check_model(seeds.seed_model(name), full_check=True)


@pytest.mark.parametrize("kind", ["subgraph_junk", "bad_int_constant"])
def test_kinds_with_chosen_seeds_apply_to_each(kind):
    """The seeds a kind draws from (SUBGRAPH_SEEDS, INT_CONSTANT_SEEDS) all have what it changes."""
    params = {"subgraph_junk": {"node": 0, "graph": 0, "pick": 0, "how": "remove_node"},
              "bad_int_constant": {"pick": 0, "elem": 0, "value": -1}}[kind]
    for name in mutations.KINDS[kind].seeds:
        _, description = mutations.materialize(mutations.Case(0, name, mutations.Mutation(kind, params)))
        assert "not applicable" not in description, (name, description)


@pytest.mark.parametrize(
    ("message", "ok"),
    [
        ("/tmp/x/model.onnx: fails the ONNX checker: bad node", True),
        ("pass 'fold-constants' failed (after: none): boom", True),
        ("", False),
        ("first line\nsecond line", False),
        ("internal error", False),
    ],
)
def test_gcomp_error_message_rules(message, ok):
    assert (runner.message_problem(message, "/tmp/x/model.onnx") is None) == ok
