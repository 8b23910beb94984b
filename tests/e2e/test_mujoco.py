"""The MuJoCo example end to end, CI-sized: real envs, real server, real worker processes.

Short episodes and small populations keep every training to a few seconds; the full-size
runs are `benchmarks/mujoco.py`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from evochi_torch import centered_rank, load_checkpoint
from examples.mujoco.mujoco import Args, keep_top_pairs, main, run

# Hopper terminates early (falls), so its episodes have different lengths.
HOPPER = dict(env="Hopper-v5", population_size=12, episode_steps=60, eval_episodes=2, seed=3,
              final_episodes=2, quiet=True)  # fmt: skip


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(120)
def test_halfcheetah_improves_counts_steps_and_play_reproduces(tmp_path, capsys) -> None:
    pop, steps, epochs = 16, 80, 6
    result = run(Args(env="HalfCheetah-v5", population_size=pop, episode_steps=steps,
                      max_epochs=epochs, runs_dir=tmp_path, seed=0, eval_episodes=3,
                      final_episodes=3, checkpoint_every=4))  # fmt: skip
    run_dir = tmp_path / "HalfCheetah-v5-s0"
    for name in ("policy.safetensors", "metrics.csv", "curve.png", "config.json"):
        assert (run_dir / name).stat().st_size > 0, name
    rows = metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    # HalfCheetah never terminates: each epoch costs pop episodes plus one statistics
    # episode, and the initial statistics one more.
    assert [int(r["env_steps"]) for r in rows] == [
        steps + e * (pop + 1) * steps for e in range(1, epochs + 1)
    ]
    assert all(r["exact_steps"] == "1" for r in rows)
    returns = [float(r["center_return"]) for r in rows]
    # From standing still (about 0) to running forward.
    assert returns[-1] > returns[0] + 5, returns

    out = capsys.readouterr().out
    assert "epoch    1  center" in out
    assert f"finished epoch={epochs} env_steps={rows[-1]['env_steps']} " in out
    # The saved policy (params + observation statistics) replays the reported return.
    assert main(["--play", str(run_dir / "policy.safetensors"), "--final-episodes", "3"]) == 0
    assert f"mean return {result['final_return']:.1f} over 3 episodes" in capsys.readouterr().out


@pytest.fixture(scope="module")
def hopper_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hopper")
    for workers in (1, 2):
        run(Args(**HOPPER, workers=workers, max_epochs=4, runs_dir=root, name=f"w{workers}"))
    return {"w1": root / "w1", "w2": root / "w2", "root": root}


@pytest.mark.timeout(120)
def test_hopper_same_params_and_statistics_for_one_and_two_workers(hopper_runs) -> None:
    one = load_checkpoint(hopper_runs["w1"] / "policy.safetensors")
    two = load_checkpoint(hopper_runs["w2"] / "policy.safetensors")
    assert one.epoch == two.epoch == 4
    assert torch.equal(one.params, two.params)
    assert set(one.extra_tensors) == {"obs_mean", "obs_var", "obs_count"}
    for key, value in one.extra_tensors.items():
        assert torch.equal(value, two.extra_tensors[key]), key
    # The statistics moved away from their initial (0, 1) and count every recorded obs.
    assert float(one.extra_tensors["obs_count"][0]) > 4 * 10
    assert not torch.equal(one.extra_tensors["obs_mean"], torch.zeros(11, dtype=torch.float64))
    assert one.extra["stats_env_steps"] == two.extra["stats_env_steps"] > 0
    assert one.extra["mujoco"]["env_id"] == "Hopper-v5"

    rows_one, rows_two = metrics(hopper_runs["w1"]), metrics(hopper_runs["w2"])
    assert [r["env_steps"] for r in rows_one] == [r["env_steps"] for r in rows_two]
    # Fallen hoppers stop costing steps: fewer than every member running the full episode.
    full = 4 * 12 * HOPPER["episode_steps"] + one.extra["stats_env_steps"]
    assert int(rows_one[-1]["env_steps"]) < full
    assert all(r["exact_steps"] == "1" for r in rows_one + rows_two)


@pytest.mark.timeout(120)
def test_resume_continues_bit_identically(hopper_runs) -> None:
    root = hopper_runs["root"]
    run(Args(**HOPPER, workers=2, max_epochs=2, runs_dir=root, name="resumed"))
    assert load_checkpoint(root / "resumed" / "policy.safetensors").epoch == 2
    run(Args(resume=root / "resumed", max_epochs=4, workers=2, quiet=True))
    resumed = load_checkpoint(root / "resumed" / "policy.safetensors")
    straight = load_checkpoint(hopper_runs["w2"] / "policy.safetensors")
    assert resumed.epoch == 4
    assert torch.equal(resumed.params, straight.params)
    for key, value in straight.extra_tensors.items():
        assert torch.equal(value, resumed.extra_tensors[key]), key
    rows = metrics(root / "resumed")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [r["env_steps"] for r in rows] == [r["env_steps"] for r in metrics(hopper_runs["w2"])]


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
