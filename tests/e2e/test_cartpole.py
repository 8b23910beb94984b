"""The CartPole example solves the task, and its saved policy replays the reported return."""

from __future__ import annotations

import pytest

from evochi_torch.__main__ import main as cli
from evochi_torch.harness import RunConfig, read_metrics
from examples.cartpole.cartpole import Args, CartPole, main, run


@pytest.mark.timeout(300)
def test_cartpole_solves_and_play_reproduces_the_return(tmp_path, capsys) -> None:
    code = main(["--run.runs-dir", str(tmp_path), "--run.quiet", "--run.max-epochs", "60"])
    assert code == 0
    run_dir = tmp_path / "cartpole-s0"
    for name in ("checkpoint.safetensors", "best.safetensors", "metrics.csv", "curve.png",
                 "config.json"):  # fmt: skip
        assert (run_dir / name).stat().st_size > 0, name
    rows = read_metrics(run_dir / "metrics.csv")
    last = rows[-1]
    assert [r["epoch"] for r in rows] == list(range(1, last["epoch"] + 1))
    assert last["center_score"] >= 475
    # Every step pays 1, so the exact env steps are the summed returns.
    assert all(r["env_steps_exact"] == 1 for r in rows)
    assert last["env_steps"] == sum(round(r["reward_mean"] * 32) for r in rows)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"solved epoch={last['epoch']} env_steps={last['env_steps']} ")

    gif = tmp_path / "episode.gif"
    assert cli(["play", "examples.cartpole:CartPole", str(run_dir), "--gif", str(gif)]) == 0
    out = capsys.readouterr().out
    assert f"mean return {last['center_score']:.1f} over 10 episodes" in out
    assert gif.read_bytes()[:6] == b"GIF89a"


@pytest.mark.timeout(300)
def test_same_seed_same_curve_whatever_the_number_of_workers(tmp_path) -> None:
    def curve(workers: int) -> list[tuple[float, ...]]:
        config = RunConfig(max_epochs=4, runs_dir=tmp_path, name=f"w{workers}",
                           workers=workers, quiet=True)  # fmt: skip
        run(Args(es=CartPole.default_config.replace(seed=1), run=config))
        rows = read_metrics(tmp_path / f"w{workers}" / "metrics.csv")
        return [(r["center_score"], r["reward_mean"], r["reward_max"], r["env_steps"])
                for r in rows]  # fmt: skip

    assert curve(1) == curve(3)
