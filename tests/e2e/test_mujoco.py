"""The MuJoCo example end to end: real envs, real server, real worker processes.

The first test reproduces HalfCheetah's first epochs as recorded with torch's plain kernels;
the others are CI-sized (short episodes, small populations).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evochi_torch import centered_rank, load_checkpoint
from evochi_torch.__main__ import main as cli
from evochi_torch.harness import RunConfig, read_metrics
from examples.mujoco.mujoco import SETTINGS, Args, keep_top_pairs, run

ROOT = Path(__file__).resolve().parents[2]

DATA = Path(__file__).parent / "data"
# Floating point follows the CPU: torch picks its kernels by the SIMD the CPU has (on an AMD
# EPYC with AVX2, epoch 1's population mean was -4.088 against -4.154 on the AVX-512 machine
# that made examples/mujoco/results/HalfCheetah-v5-s0.csv). With ATEN_CPU_CAPABILITY=default
# torch runs its plain kernels, the same on every x86 CPU, and MuJoCo and numpy do not vary
# here, so the test runs the example that way and compares with one recording. A change to
# the training matches it no more. To record it again:
# `ATEN_CPU_CAPABILITY=default python -m examples.mujoco HalfCheetah-v5 --run.max-epochs 3`,
# then its metrics.csv's env_steps, center_score, reward_mean and reward_max (rounded to 3
# places) as env_steps, center_return, pop_mean and pop_max.
REFERENCE = DATA / "HalfCheetah-v5-s0-aten-default.csv"  # torch 2.13, mujoco 4.0.1
HOPPER = SETTINGS["Hopper-v5"].replace(episode_steps=60, eval_episodes=2)


@pytest.mark.timeout(300)
def test_halfcheetah_reproduces_the_recorded_epochs(tmp_path) -> None:
    epochs = 3
    command = [sys.executable, "-m", "examples.mujoco", "HalfCheetah-v5",
               f"--run.max-epochs={epochs}", f"--run.runs-dir={tmp_path}", "--run.quiet",
               "--final-episodes=1"]  # fmt: skip
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path / "HalfCheetah-v5-s0" / "metrics.csv")
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert all(r["env_steps_exact"] == 1 for r in rows)
    got = [
        (round(r["reward_mean"], 3), round(r["reward_max"], 3), round(r["center_score"], 3),
         r["env_steps"])
        for r in rows
    ]  # fmt: skip
    with open(REFERENCE) as fh:
        recorded = [
            (float(r["pop_mean"]), float(r["pop_max"]), float(r["center_return"]),
             int(r["env_steps"]))
            for r in csv.DictReader(fh)
        ]  # fmt: skip
    assert got == recorded


def hopper(root: Path, name: str, workers: int) -> Args:
    run_config = RunConfig(max_epochs=4, env_steps=None, runs_dir=root, name=name,
                           workers=workers, quiet=True)  # fmt: skip
    es = Args(HOPPER).es.replace(population_size=12, seed=3)
    return Args(HOPPER, es=es, run=run_config, final_episodes=2)


@pytest.mark.timeout(300)
def test_hopper_same_training_for_one_and_two_workers_and_play(tmp_path, capsys) -> None:
    (one, _), (two, final) = (run(hopper(tmp_path, f"w{n}", n)) for n in (1, 2))
    assert one.state.epoch == two.state.epoch == 4
    assert torch.equal(one.state.params, two.state.params)
    assert set(one.state.extra_tensors) == {"obs_mean", "obs_var", "obs_count"}
    for key, value in one.state.extra_tensors.items():
        assert torch.equal(value, two.state.extra_tensors[key]), key
    # The statistics moved away from their initial (0, 1) and count every recorded obs.
    assert float(one.state.extra_tensors["obs_count"][0]) > 4 * 10
    assert one.state.extra["gym"]["env_id"] == "Hopper-v5"
    rows_one = read_metrics(tmp_path / "w1" / "metrics.csv")
    rows_two = read_metrics(tmp_path / "w2" / "metrics.csv")
    assert [r["env_steps"] for r in rows_one] == [r["env_steps"] for r in rows_two]
    # Fallen hoppers stop costing steps, and the count is exact (the workers report it).
    full = 4 * 12 * 60 + one.state.extra["stats_env_steps"]
    assert rows_one[-1]["env_steps"] < full
    assert all(r["env_steps_exact"] == 1 for r in rows_one + rows_two)

    capsys.readouterr()
    saved = load_checkpoint(tmp_path / "w2" / "checkpoint.safetensors")
    assert torch.equal(saved.params, two.state.params)
    assert cli(["play", "examples.mujoco:Hopper", str(tmp_path / "w2"), "--episodes", "2"]) == 0
    assert f"mean return {final:.1f} over 2 episodes" in capsys.readouterr().out


def test_top_k_pairs_cancel_out_of_the_update() -> None:
    rewards = np.array([1.0, 2.0, 5.0, 0.0, 3.0, 3.5, 0.0, -1.0])
    kept = keep_top_pairs(rewards, 2)
    # Pairs 1 (best 5) and 2 (best 3.5) are kept; 0 and 3 get their mean twice.
    assert kept.tolist() == [1.5, 1.5, 5.0, 0.0, 3.0, 3.5, -0.5, -0.5]
    weights = centered_rank(kept).reshape(-1, 2)
    # Member 2k is +eps_k and 2k+1 is -eps_k: equal weights contribute nothing.
    assert weights[0, 0] == weights[0, 1] and weights[3, 0] == weights[3, 1]
    assert weights[1, 0] != weights[1, 1]
    assert keep_top_pairs(rewards, 4).tolist() == rewards.tolist()


@pytest.mark.timeout(300)
def test_every_strategy_preset_trains_through_the_benchmark_table(tmp_path, capsys) -> None:
    """Each ENV/STRATEGY preset is a config its strategy accepts; the ARS one is the paper's
    (linear policy, 2N members, top b); `benchmarks.mujoco --table` runs a pair once (a
    second call skips it) and tabulates it."""
    from benchmarks.mujoco import main as bench
    from evochi_torch import get_strategy
    from examples.mujoco.mujoco import PRESETS, STRATEGIES

    for env in SETTINGS:
        for strategy in STRATEGIES:
            key = env if strategy == "openai_es" else f"{env}/{strategy}"
            es = PRESETS[key][1].es
            assert es.strategy == strategy
            get_strategy(strategy).check_config(es)
    ars = PRESETS["Walker2d-v5/ars"][1]
    assert ars.env.hidden == () and ars.es.population_size == 80
    assert ars.es.strategy_options == {"top_directions": 30}
    argv = ["--table", "--env-steps", "1", "--envs", "Hopper-v5", "--strategies", "pgpe",
            "--runs-dir", str(tmp_path), "--", "--env.episode-steps", "30",
            "--run.max-epochs", "2", "--final-episodes", "1", "--run.quiet"]  # fmt: skip
    bench(argv)
    first = capsys.readouterr().out
    assert "mujoco env=Hopper-v5 strategy=pgpe seed=0 env_steps=" in first
    result = tmp_path / "table-1" / "Hopper-v5-pgpe-s0" / "result.json"
    assert result.exists()
    stamp = result.stat().st_mtime_ns
    bench(argv)  # resumable: the finished pair is not run again
    second = capsys.readouterr().out
    assert "mujoco env=" not in second and result.stat().st_mtime_ns == stamp
    assert "| pgpe | " in second and "| strategy | Hopper-v5 |" in second
