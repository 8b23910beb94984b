"""The run-directory rule on its own: names, refusals, overwrite, config.json's history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from evochi_torch.harness.rundir import (
    RunDirExistsError,
    new_run_dir,
    record_resume,
    record_start,
)


def a_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"worker": "m:C", "es": {}, "run": {}}\n')
    (path / "best.safetensors").write_bytes(b"old")
    return path


def test_a_taken_name_gets_the_start_time_and_runs_never_share_a_directory(tmp_path) -> None:
    made = [new_run_dir(tmp_path, "CartPole-s0") for _ in range(3)]
    paths = [run_dir.path for run_dir, _ in made]
    assert paths[0] == tmp_path / "CartPole-s0"
    assert len(set(paths)) == 3 and all(created for _, created in made)
    for path in paths[1:]:
        assert path.parent == tmp_path
        assert re.fullmatch(r"CartPole-s0-\d{8}-\d{6}(-\d+)?", path.name), path.name
    # Sorted by name is sorted by start: the plain name first, then the stamps in order.
    assert sorted(paths) == paths


def test_an_empty_named_path_is_taken_and_an_empty_default_one_is_not(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    run_dir, created = new_run_dir(tmp_path, "x", tmp_path / "empty")
    assert run_dir.path == tmp_path / "empty" and not created
    # Another training may have just created it: only a directory made here is free.
    (tmp_path / "CartPole-s0").mkdir()
    run_dir, created = new_run_dir(tmp_path, "CartPole-s0")
    assert run_dir.path.name.startswith("CartPole-s0-") and created


def test_a_named_path_is_never_renamed_and_never_written_into(tmp_path) -> None:
    old = a_run(tmp_path / "run")
    with pytest.raises(RunDirExistsError) as refused:
        new_run_dir(tmp_path, "unused", old)
    assert str(refused.value) == (
        f"{old} already holds a run: continue it with --run.resume {old}, or replace it with "
        "--run.overwrite"
    )
    assert (old / "best.safetensors").read_bytes() == b"old"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirExistsError, match="is not a directory"):
        new_run_dir(tmp_path, "unused", tmp_path / "file", overwrite=True)


def test_overwrite_replaces_a_run_and_nothing_else(tmp_path) -> None:
    old = a_run(tmp_path / "run")
    run_dir, created = new_run_dir(tmp_path, "unused", old, overwrite=True)
    assert run_dir.path == old and created and list(old.iterdir()) == []  # no stale best
    plain = a_run(tmp_path / "CartPole-s0")
    run_dir, _ = new_run_dir(tmp_path, "CartPole-s0", overwrite=True)
    assert run_dir.path == plain and list(plain.iterdir()) == []

    # Another tool's config.json is no run: nothing of it is deleted.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"name": "my project"}\n')
    for overwrite in (False, True):
        with pytest.raises(RunDirExistsError, match="not empty and holds no run"):
            new_run_dir(tmp_path, "unused", mine, overwrite=overwrite)
    assert (mine / "config.json").read_text() == '{"name": "my project"}\n'


def test_overwrite_never_deletes_the_current_directory(tmp_path, monkeypatch) -> None:
    old = a_run(tmp_path / "run")
    (old / "sub").mkdir()
    monkeypatch.chdir(old / "sub")
    with pytest.raises(RunDirExistsError, match="holds the current directory"):
        new_run_dir(tmp_path, "unused", Path(".."), overwrite=True)
    assert (old / "best.safetensors").read_bytes() == b"old"


def test_config_history_records_start_and_each_resume_with_what_it_changed() -> None:
    start = record_start(
        {"worker": "m:C", "es": {"seed": 0}, "run": {"max_epochs": 50, "workers": 2,
         "run_dir": None, "resume": None}, "worker_kwargs": {"settings": {"episodes": 10}}},
        ["evochi-torch", "train", "m:C"],
    )  # fmt: skip
    assert start["argv"] == ["evochi-torch", "train", "m:C"] and start["resumed"] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", start["started"])

    run = {"max_epochs": 60, "workers": 4, "run_dir": None, "resume": "runs/x"}
    once = record_resume(start, 50, {"run": run, "worker_kwargs": {"settings": {"episodes": 10}}},
                         ["evochi-torch", "train", "m:C", "--resume", "runs/x"])  # fmt: skip
    later = {"run": {**run, "max_epochs": 70}, "worker_kwargs": {"settings": {"episodes": 5}}}
    twice = record_resume(once, 60, later, [])
    # The start is kept as it was; the resumes read forward from it.
    assert twice["run"]["max_epochs"] == 50 and twice["started"] == start["started"]
    first, second = twice["resumed"]
    assert first["from_epoch"] == 50 and first["argv"][-2:] == ["--resume", "runs/x"]
    assert first["changed"] == {
        "run.max_epochs": {"from": 50, "to": 60},
        "run.workers": {"from": 2, "to": 4},
    }  # where the run lies (resume, run_dir) is no setting change
    assert second["changed"] == {
        "run.max_epochs": {"from": 60, "to": 70},
        "worker_kwargs.settings": {"from": {"episodes": 10}, "to": {"episodes": 5}},
    }


def test_a_resume_entry_that_holds_whole_run_settings_is_read_as_them() -> None:
    record = {"run": {"max_epochs": 50}, "resumed": [{"from_epoch": 50, "run": {"max_epochs": 60}}]}
    entry = record_resume(record, 60, {"run": {"max_epochs": 70}}, [])["resumed"][-1]
    assert entry["changed"] == {"run.max_epochs": {"from": 60, "to": 70}}
