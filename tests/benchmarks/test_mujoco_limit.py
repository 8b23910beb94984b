"""The limit benchmark's arithmetic (the measurement itself needs MuJoCo and time: one short
smoke run at the end)."""

from __future__ import annotations

import pytest

from benchmarks.mujoco_limit import (
    core_minutes,
    fraction_of_limit,
    hours_at,
    limit_of,
    main,
    steps_per_second,
)


def test_steps_per_second() -> None:
    assert steps_per_second(30_000, 2.0) == 15_000
    assert steps_per_second(0, 1.0) == 0
    with pytest.raises(ValueError):
        steps_per_second(10, 0.0)
    with pytest.raises(ValueError):
        steps_per_second(-1, 1.0)


def test_the_limit_is_the_fastest_repeat() -> None:
    # Other work on the machine only slows a repeat down, never speeds it up.
    assert limit_of([9_000.0, 12_000.0, 11_500.0]) == 12_000.0
    with pytest.raises(ValueError):
        limit_of([])


def test_fraction_of_limit() -> None:
    # 1e7 steps in 500 s is 20,000 steps/s: 2.0 of a 10,000 steps/s single process
    # (two workers, each at the limit).
    assert fraction_of_limit(10_000_000, 500.0, 10_000.0) == pytest.approx(2.0)
    assert fraction_of_limit(3_000_000, 600.0, 20_000.0) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        fraction_of_limit(1, 1.0, 0.0)


def test_core_minutes() -> None:
    assert core_minutes(600.0, 2) == pytest.approx(20.0)
    assert core_minutes(90.0, 1) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        core_minutes(60.0, 0)
    with pytest.raises(ValueError):
        core_minutes(-1.0, 1)


def test_hours_at() -> None:
    # 3e7 steps at 4,000 steps/s per process, 2 processes: 3750 s.
    assert hours_at(3e7, 4_000.0, processes=2) == pytest.approx(3750 / 3600)
    # At half the limit it takes twice as long.
    assert hours_at(3e7, 4_000.0, 2, fraction=0.5) == pytest.approx(2 * 3750 / 3600)
    with pytest.raises(ValueError):
        hours_at(1, 0.0)


def test_command_line_prints_one_line_per_env(capsys) -> None:
    assert main(["--envs", "Hopper-v5", "--seconds", "0.05", "--repeats", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("mujoco_limit env=Hopper-v5 actions=random steps_per_s=")
    assert int(line.split("steps_per_s=")[1].split()[0]) > 0
