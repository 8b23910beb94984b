"""The committed MuJoCo results check out: each policy file under benchmarks/results/mujoco
evaluates, on the example's 10 fixed evaluation episodes, to the return that its result.json
and its row of the generated table claim.

The evaluation pins the policy's arithmetic (the same actions on every CPU) and MuJoCo's
physics is its wheel's compiled code (with glibc's FMA variants of libm on every x86 CPU with
AVX2), so the return comes out equal up to result.json's rounding; the comparison still allows
`benchmarks.mujoco.TOLERANCE` (relative), the tolerance `--check` uses, for another build.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.mujoco import RESULTS, TOLERANCE, agrees, evaluate_policy
from benchmarks.mujoco import main as bench
from benchmarks.results_table import table

POLICIES = sorted(RESULTS.rglob("policy.safetensors"))


def test_some_result_has_a_policy_file() -> None:
    assert POLICIES, f"no policy.safetensors under {RESULTS}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "policy", POLICIES, ids=[p.parent.relative_to(RESULTS).as_posix() for p in POLICIES]
)
def test_policy_evaluates_to_the_return_its_row_claims(policy: Path) -> None:
    claimed = json.loads((policy.parent / "result.json").read_text())["return"]
    row_dir = policy.parent.parent
    (row,) = [
        line
        for line in table(RESULTS).split("\n\n")[0].splitlines()  # the results, not the reach
        if line.startswith(f"| {row_dir.relative_to(RESULTS).as_posix()} |")
    ]
    assert f"{claimed:.0f}" in row.split("|")[9]  # the row's returns per seed
    measured = evaluate_policy(policy)
    assert agrees(claimed, measured, TOLERANCE), f"claimed {claimed}, measured {measured:.1f}"


def test_tolerance_is_relative_with_a_rounding_floor() -> None:
    assert agrees(4484.2, 4484.2) and agrees(4484.2, 4484.24)
    assert agrees(4000.0, 4079.0) and not agrees(4000.0, 4081.0)
    assert agrees(0.0, 0.05) and not agrees(0.0, 0.2)


@pytest.mark.timeout(120)
def test_check_command_reports_agreement_and_a_wrong_claim(tmp_path: Path, capsys) -> None:
    source = POLICIES[0].parent
    env = json.loads((source / "result.json").read_text())["env"]
    good = tmp_path / "results" / env / "row" / "s0"
    shutil.copytree(source, good)
    assert bench(["--check", env, "--results", str(tmp_path / "results")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"check {env}/row/s0 env={env} ") and line.endswith(" ok")

    record = json.loads((good / "result.json").read_text())
    (good / "result.json").write_text(json.dumps({**record, "return": record["return"] + 1000}))
    assert bench(["--check", env, "--results", str(tmp_path / "results")]) == 1
    assert capsys.readouterr().out.strip().endswith(" DIFFERS")
    assert bench(["--check", "Humanoid-v5", "--results", str(tmp_path / "results")]) == 2
