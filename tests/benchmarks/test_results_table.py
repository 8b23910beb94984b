"""The results table is generated from run directories: fixture runs in the real format (the
trainer's config.json and metrics.csv columns, the benchmark's result.json and meta.json)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.provenance import UNRECORDED, provenance
from benchmarks.results_table import (
    HEADER,
    collect,
    find_results,
    group,
    main,
    markdown,
    table,
)
from evochi_torch.harness.rundir import record_start
from evochi_torch.harness.trainer import METRICS_FIELDS

LIMIT = 10_000.0


def make_run(
    root: Path,
    name: str,
    env: str,
    strategy: str,
    seed: int,
    *,
    seconds: float,
    env_steps: int,
    ret: float,
    meta: dict[str, Any] | None,
) -> Path:
    """A finished `python -m benchmarks.mujoco` run directory: 4 epochs of metrics."""
    run = root / name
    run.mkdir(parents=True)
    record = {
        "worker": "examples.mujoco.mujoco:MuJoCoES",
        "es": {"seed": seed, "strategy": strategy},
        "run": {"workers": 2},
        "worker_kwargs": {"settings": {"env_id": env}},
    }
    (run / "config.json").write_text(json.dumps(record_start(record, ["bench"])))
    with open(run / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, METRICS_FIELDS)
        writer.writeheader()
        for epoch in range(1, 5):
            writer.writerow(
                {
                    "epoch": epoch,
                    "seconds": seconds * epoch / 4,
                    "env_steps": env_steps * epoch // 4,
                    "env_steps_exact": 1,
                    "center_score": ret * epoch / 4,
                    "reward_mean": 0.0,
                }
            )
    result = {
        "env": env,
        "strategy": strategy,
        "seed": seed,
        "env_steps": env_steps,
        "seconds": seconds,
        "return": ret,
    }
    (run / "result.json").write_text(json.dumps(result))
    if meta is not None:
        (run / "meta.json").write_text(json.dumps(meta))
    return run


def measured(cores: int = 2, commit: str = "0123456789abcdef", dirty: bool = False) -> dict:
    return {
        "command": "python -m benchmarks.mujoco ...",
        "commit": commit,
        "dirty": dirty,
        "machine": {"cpu": "Test CPU", "logical_cores": 2},
        "workers": cores,
        "cores_used": cores,
        "limit": {"steps_per_s": LIMIT, "actions": "random"},
    }


def old_result() -> dict:
    return {
        "command": UNRECORDED,
        "commit": UNRECORDED,
        "machine": UNRECORDED,
        "workers": 2,
        "cores_used": 2,
        "limit": UNRECORDED,
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    cheetah = root / "HalfCheetah-v5" / "ars" / "1e7"
    # Seeds 0-2: 600, 300 and 900 s for 1.2e7, 0.6e7, 0.9e7 steps: 20k, 20k, 10k steps/s.
    make_run(
        cheetah,
        "s0",
        "HalfCheetah-v5",
        "ars",
        0,
        seconds=600,
        env_steps=12_000_000,
        ret=4000.0,
        meta=measured(),
    )
    make_run(
        cheetah,
        "s1",
        "HalfCheetah-v5",
        "ars",
        1,
        seconds=300,
        env_steps=6_000_000,
        ret=5000.0,
        meta=measured(),
    )
    make_run(
        cheetah,
        "s2",
        "HalfCheetah-v5",
        "ars",
        2,
        seconds=900,
        env_steps=9_000_000,
        ret=2000.0,
        meta=measured(),
    )
    make_run(
        root / "Hopper-v5" / "pgpe" / "1e7",
        "s0",
        "Hopper-v5",
        "pgpe",
        0,
        seconds=120,
        env_steps=1_200_000,
        ret=3500.4,
        meta=old_result(),
    )
    return root


def test_one_row_per_directory_env_and_strategy_with_medians(results: Path) -> None:
    rows = group(find_results(results), results)
    assert [row.label for row in rows] == ["HalfCheetah-v5/ars/1e7", "Hopper-v5/pgpe/1e7"]
    assert [r.seed for r in rows[0].results] == [0, 1, 2]
    lines = markdown(rows).splitlines()
    assert lines[0] == HEADER
    assert lines[1].count("---") == HEADER.count("|") - 1
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == [
        "HalfCheetah-v5/ars/1e7",
        "ars",
        "0, 1, 2",
        "9,000,000",  # median env steps
        "600 s",  # median wall-clock
        "20",  # median of 600, 300, 900 s on 2 cores: 20, 10, 30 core-minutes
        "20,000",  # median of 20k, 20k, 10k steps/s
        "2.00",  # of the 10k steps/s single-process limit: 2 workers at full speed
        "4000, 5000, 2000",
        "**4000**",
        "0123456",
    ]


def test_what_a_result_did_not_record_reads_unrecorded(results: Path) -> None:
    line = markdown(group(find_results(results), results)).splitlines()[3]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == "4"  # 120 s on 2 cores: known from the command's worker count
    assert cells[7] == UNRECORDED  # no limit measured on that machine
    assert cells[-1] == UNRECORDED  # commit
    assert cells[-2] == "**3500**"


def test_a_seed_without_a_value_makes_the_cell_unrecorded(results: Path) -> None:
    # A median over the seeds that have it would pass for the row's.
    s1 = results / "HalfCheetah-v5" / "ars" / "1e7" / "s1" / "meta.json"
    s1.write_text(
        json.dumps({**measured(), "cores_used": None, "limit": UNRECORDED, "dirty": True})
    )
    cells = markdown(group(find_results(results), results)).splitlines()[2].split("|")
    assert cells[6].strip() == cells[8].strip() == UNRECORDED
    assert cells[7].strip() == "20,000"  # steps/s needs only result.json


def test_dirty_tree_and_several_commits() -> None:
    from benchmarks.results_table import Result, _commit

    def res(commit: str, dirty: bool) -> Result:
        return Result(Path("."), "E", "s", 0, 1, 1.0, 0.0, measured(commit=commit, dirty=dirty))

    assert _commit([res("abcdef0123", True)]) == "abcdef0+"
    assert _commit([res("abcdef0123", False), res("1234567890", False)]) == "several"


def test_a_flat_runs_directory_gives_one_row_per_env_and_strategy(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(
        runs,
        "Hopper-v5-pgpe-s0",
        "Hopper-v5",
        "pgpe",
        0,
        seconds=10,
        env_steps=100,
        ret=1.0,
        meta=None,
    )
    make_run(
        runs,
        "Hopper-v5-pgpe-s1",
        "Hopper-v5",
        "pgpe",
        1,
        seconds=10,
        env_steps=100,
        ret=2.0,
        meta=None,
    )
    make_run(
        runs,
        "Hopper-v5-s0",
        "Hopper-v5",
        "openai_es",
        0,
        seconds=10,
        env_steps=100,
        ret=3.0,
        meta=None,
    )
    rows = group(find_results(runs), runs)
    assert [(row.label, len(row.results)) for row in rows] == [
        ("Hopper-v5/openai_es", 1),
        ("Hopper-v5/pgpe", 2),
    ]


def test_curves_read_both_metrics_formats(results: Path) -> None:
    hopper = results / "Hopper-v5" / "pgpe" / "1e7" / "s0" / "metrics.csv"
    # The column names of older run directories.
    hopper.write_text(
        "epoch,env_steps,seconds,center_return,pop_mean,pop_max,steps_per_s,"
        "exact_steps\n1,100,1.5,10.0,1,2,3,1\n2,200,3.0,20.0,1,2,3,1\n"
    )
    (row,) = [r for r in group(find_results(results), results) if r.label.startswith("Hopper")]
    assert row.results[0].curve() == ([100, 200], [1.5, 3.0], [10.0, 20.0])
    (cheetah,) = [r for r in group(find_results(results), results) if "Cheetah" in r.label]
    steps, seconds, returns = cheetah.results[0].curve()
    assert steps == [3_000_000, 6_000_000, 9_000_000, 12_000_000]
    assert seconds == [150.0, 300.0, 450.0, 600.0] and returns[-1] == 4000.0


def test_table_command_writes_table_and_curves(results: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "TABLE.md"
    assert main(["table", str(results), "--plots", "--out", str(out), "--only", "*/ars/*"]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() == table(results, only=["*/ars/*"])
    assert "HalfCheetah-v5/ars/1e7" in printed and "Hopper" not in printed
    assert (results / "HalfCheetah-v5" / "ars" / "1e7" / "curves.png").stat().st_size > 1000
    assert not (results / "Hopper-v5" / "pgpe" / "1e7" / "curves.png").exists()


def test_collect_keeps_the_record_and_a_policy_without_optimizer_state(tmp_path: Path) -> None:
    from evochi_torch import ESConfig
    from evochi_torch.codec import load_checkpoint, save_checkpoint
    from evochi_torch.harness import offline_worker
    from examples.mujoco.mujoco import MuJoCoES, MuJoCoSettings

    run = make_run(
        tmp_path / "runs",
        "Hopper-v5-s0",
        "Hopper-v5",
        "openai_es",
        0,
        seconds=1,
        env_steps=10,
        ret=1.0,
        meta=measured(),
    )
    config = ESConfig(population_size=4, optimizer="adam", noise_table_size=1 << 16)
    settings = MuJoCoSettings("Hopper-v5", hidden=(4,), episode_steps=20)
    state = offline_worker(MuJoCoES, config=config, settings=settings).initialize()
    assert state.opt_state  # Adam's moments: what a policy file leaves out
    save_checkpoint(run / "checkpoint.safetensors", state)
    kept = collect(run, tmp_path / "results" / "Hopper-v5" / "openai_es" / "1e7")
    assert kept.name == "s0"
    assert sorted(p.name for p in kept.iterdir()) == [
        "config.json",
        "meta.json",
        "metrics.csv",
        "policy.safetensors",
        "result.json",
    ]
    policy = load_checkpoint(kept / "policy.safetensors")
    assert policy.opt_state == {}
    assert policy.params.equal(state.params) and policy.extra == state.extra
    assert policy.extra_tensors.keys() == state.extra_tensors.keys()
    with pytest.raises(FileNotFoundError):
        collect(tmp_path, tmp_path / "elsewhere")


def test_provenance_names_command_commit_machine_and_versions() -> None:
    meta = provenance(["python", "-m", "benchmarks.mujoco", "--env", "Hopper-v5"])
    assert meta["command"] == "python -m benchmarks.mujoco --env Hopper-v5"
    assert len(meta["commit"]) == 40 or meta["commit"] == UNRECORDED
    assert meta["machine"]["cpu"] and meta["machine"]["logical_cores"] >= 1
    assert {"python", "evochi", "torch", "numpy", "mujoco", "gymnasium"} <= meta["versions"].keys()


def test_first_reach_of_a_target_with_its_cost(tmp_path: Path, capsys) -> None:
    root = tmp_path / "results"
    where = root / "Humanoid-v5" / "ars" / "3e7"
    # Center returns per epoch are ret * epoch / 4: 2000, 4000, 6000, 8000 for ret 8000.
    make_run(where, "s0", "Humanoid-v5", "ars", 0, seconds=4000, env_steps=28_000_000,
             ret=8000.0, meta=measured(cores=2))  # fmt: skip
    make_run(where, "s1", "Humanoid-v5", "ars", 1, seconds=4000, env_steps=30_000_000,
             ret=5000.0, meta=measured(cores=2))  # fmt: skip
    make_run(root / "Hopper-v5" / "ars" / "1e7", "s0", "Hopper-v5", "ars", 0, seconds=100,
             env_steps=1_000_000, ret=9000.0, meta=measured())  # fmt: skip
    text = table(root)
    lines = [line for line in text.splitlines() if "per seed: env steps" in line]
    assert len(lines) == 1
    reach = text.splitlines()[text.splitlines().index(lines[0]) + 2 :]
    # Only Humanoid-v5 has a target by default; seed 0 first reaches 6000 at epoch 3.
    assert reach == [
        "| Humanoid-v5/ars/3e7 | 6000 | s0: 21,000,000, 3000 s, 100 core-min; "
        "s1: not reached in 30,000,000 (best 5000) |"
    ]
    assert main(["table", str(root), "--target", "Hopper-v5=4000"]) == 0
    out = capsys.readouterr().out
    assert "| Hopper-v5/ars/1e7 | 4000 | s0: 500,000, 50 s, 2 core-min |" in out
    with pytest.raises(SystemExit):
        main(["table", str(root), "--target", "Hopper-v5"])
    assert "--target wants ENV=RETURN" in capsys.readouterr().err
