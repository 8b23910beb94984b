"""The MuJoCo example end to end: real envs, real server, real worker processes.

The first test runs HalfCheetah's preset twice on this machine (straight, and resumed) and
compares; the others are CI-sized (short episodes, small populations).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from evochi_torch import load_checkpoint
from evochi_torch.__main__ import main as cli
from evochi_torch.harness import RunConfig, read_metrics
from examples.mujoco.mujoco import SETTINGS, Args, run

ROOT = Path(__file__).resolve().parents[2]

DATA = Path(__file__).parent / "data"
# Episode lengths are the one part of a recording that no CPU can change: HalfCheetah never
# ends early, so each epoch costs the population's 1000-step episodes plus the statistics'.
# The returns themselves follow the CPU (MuJoCo and the policy's matrix products round per
# SIMD path, and the physics is chaotic), so those are compared between runs made here.
REFERENCE = DATA / "HalfCheetah-v5-s0-steps.csv"
HOPPER = SETTINGS["Hopper-v5"].replace(episode_steps=60, eval_episodes=2)


def _halfcheetah(runs_dir: Path, name: str, epochs: int, *extra: str) -> None:
    command = [sys.executable, "-m", "examples.mujoco", "HalfCheetah-v5",
               f"--run.max-epochs={epochs}", f"--run.runs-dir={runs_dir}", f"--run.name={name}",
               "--run.quiet", "--final-episodes=1", *extra]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.timeout(600)
def test_halfcheetah_runs_again_bit_for_bit_straight_or_resumed(tmp_path) -> None:
    """The preset's first epochs, run twice on this machine: straight through, and stopped
    after 2 epochs then resumed. Same metrics, same center, and the recorded step counts."""
    _halfcheetah(tmp_path, "straight", 3)
    _halfcheetah(tmp_path, "resumed", 2)
    _halfcheetah(tmp_path, "ignored", 3, f"--run.resume={tmp_path / 'resumed'}")
    straight = read_metrics(tmp_path / "straight" / "metrics.csv")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert [r["epoch"] for r in straight] == [r["epoch"] for r in resumed] == [1, 2, 3]
    keys = ("env_steps", "reward_mean", "reward_max", "center_score")
    assert [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in resumed]
    assert all(r["env_steps_exact"] == 1 for r in straight)
    with open(REFERENCE) as fh:
        assert [r["env_steps"] for r in straight] == [
            int(r["env_steps"]) for r in csv.DictReader(fh)
        ]
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")
    assert a.epoch == b.epoch == 3
    assert torch.equal(a.params, b.params)
    for key, value in a.extra_tensors.items():
        assert torch.equal(value, b.extra_tensors[key]), key


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
    # ARS removes the survival bonus during training: Humanoid's is 5 per step, not 1.
    humanoid = PRESETS["Humanoid-v5/ars"][1]
    bonus = gym.make("Humanoid-v5").unwrapped._healthy_reward
    assert humanoid.env.reward_shift == bonus == 5.0
    assert humanoid.es.population_size == 460 and humanoid.env.hidden == ()
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
