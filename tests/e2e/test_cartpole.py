"""The CartPole example solves the task, and its saved policy replays the reported return."""

from __future__ import annotations

import csv

import pytest

from examples.cartpole.cartpole import Args, main, run


@pytest.mark.timeout(300)
def test_cartpole_solves_and_play_reproduces_the_return(tmp_path, capsys) -> None:
    result = run(Args(seed=0, workers=2, runs_dir=tmp_path, quiet=True, max_epochs=60))
    assert result["solved"], result
    assert result["center_return"] >= 475
    run_dir = tmp_path / "cartpole-s0"
    for name in ("policy.safetensors", "metrics.csv", "curve.png", "config.json"):
        assert (run_dir / name).stat().st_size > 0, name
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(1, result["epoch"] + 1))
    assert float(rows[-1]["center_return"]) == result["center_return"]
    last_line = capsys.readouterr().out.strip().splitlines()[-2]
    assert last_line.startswith(f"solved epoch={result['epoch']} env_steps=")

    gif = tmp_path / "episode.gif"
    assert main(["--play", str(run_dir / "policy.safetensors"), "--gif", str(gif)]) == 0
    out = capsys.readouterr().out
    assert f"mean return {result['center_return']:.1f} over 10 episodes" in out
    assert gif.read_bytes()[:6] == b"GIF89a"


@pytest.mark.timeout(300)
def test_same_seed_same_curve_whatever_the_number_of_workers(tmp_path) -> None:
    def curve(workers: int) -> list[tuple[str, str, str]]:
        args = Args(seed=1, workers=workers, runs_dir=tmp_path, name=f"w{workers}", quiet=True,
                    max_epochs=4, target_return=1e9)  # fmt: skip
        run(args)
        with open(tmp_path / f"w{workers}" / "metrics.csv") as fh:
            return [(r["center_return"], r["pop_mean"], r["pop_max"]) for r in csv.DictReader(fh)]

    assert curve(1) == curve(3)
