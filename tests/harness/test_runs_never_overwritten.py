"""No training replaces another run: real trainings (embedded server, worker processes) through
the command line, the Python API and an example, each checked on the files they leave."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evochi_torch import load_checkpoint
from evochi_torch.__main__ import main
from evochi_torch.harness import RunConfig, Trainer, read_metrics, train

USER = "tests.harness.user_workers"
TRAIN = ["train", f"{USER}:CartPole", "--workers", "1", "--quiet"]
STAMPED = re.compile(r"CartPole-s0-\d{8}-\d{6}(-\d+)?")


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run, by its path in the run: what must stay untouched."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }  # fmt: skip


@pytest.mark.timeout(120)
def test_train_after_a_resume_keeps_the_resumed_run(tmp_path, monkeypatch, capsys) -> None:
    # The sequence: train, --resume further, train again without --resume.
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "runs" / "CartPole-s0"
    assert main([*TRAIN, "--max-epochs", "2"]) == 0
    assert main([*TRAIN, "--max-epochs", "3", "--resume", str(first)]) == 0
    kept = snapshot(first)
    assert load_checkpoint(first / "checkpoint.safetensors").epoch == 3
    capsys.readouterr()

    assert main([*TRAIN, "--max-epochs", "2"]) == 0
    assert snapshot(first) == kept  # checkpoint, metrics, config: the same bytes
    second = [p for p in (tmp_path / "runs").iterdir() if p != first]
    assert [STAMPED.fullmatch(p.name) is not None for p in second] == [True]
    assert f"run_dir={Path('runs') / second[0].name}" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(second[0] / "metrics.csv")] == [1, 2]
    assert [r["epoch"] for r in read_metrics(first / "metrics.csv")] == [1, 2, 3]

    # The resumed run's config.json holds its start and the resume, not only the latest.
    record = json.loads((first / "config.json").read_text())
    assert record["run"]["max_epochs"] == 2 and "--resume" not in record["argv"]
    (resume,) = record["resumed"]
    assert resume["from_epoch"] == 2 and resume["argv"][-2:] == ["--resume", str(first)]
    assert resume["changed"] == {"run.max_epochs": {"from": 2, "to": 3}}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", resume["time"])


@pytest.mark.timeout(120)
def test_each_resume_is_appended_to_the_history(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main([*TRAIN, "--max-epochs", "1", "--run-dir", str(run_dir)]) == 0
    assert main([*TRAIN, "--max-epochs", "2", "--resume", str(run_dir)]) == 0
    assert main([*TRAIN, "--max-epochs", "3", "--resume", str(run_dir),
                 "--checkpoint-every", "5"]) == 0  # fmt: skip
    record = json.loads((run_dir / "config.json").read_text())
    assert [r["from_epoch"] for r in record["resumed"]] == [1, 2]
    # Each entry names what changed against the settings in effect before it.
    assert [r["changed"] for r in record["resumed"]] == [
        {"run.max_epochs": {"from": 1, "to": 2}},
        {"run.max_epochs": {"from": 2, "to": 3}, "run.checkpoint_every": {"from": 10, "to": 5}},
    ]
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3]


@pytest.mark.timeout(120)
def test_a_named_run_dir_is_refused_and_overwrite_replaces_it(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    flags = [*TRAIN, "--run-dir", str(run_dir)]
    assert main([*flags, "--max-epochs", "3"]) == 0
    kept = snapshot(run_dir)
    capsys.readouterr()

    assert main([*flags, "--max-epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {run_dir} already holds a run: continue it with --run.resume "
                   f"{run_dir}, or replace it with --run.overwrite\n")  # fmt: skip
    assert snapshot(run_dir) == kept

    assert main([*flags, "--max-epochs", "3", "--resume", str(run_dir), "--overwrite"]) == 1
    assert "resume and overwrite exclude each other" in capsys.readouterr().err
    assert snapshot(run_dir) == kept

    assert main([*flags, "--max-epochs", "2", "--overwrite"]) == 0
    assert load_checkpoint(run_dir / "checkpoint.safetensors").epoch == 2
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["run"]["max_epochs"] == 2


def test_a_directory_that_holds_no_run_is_never_written_or_deleted(tmp_path, capsys) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main([*TRAIN, "--max-epochs", "1", "--run-dir", str(notes), *extra]) == 1
        assert "holds no run" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


@pytest.mark.timeout(120)
def test_the_python_api_never_overwrites_either(tmp_path) -> None:
    settings = {"max_epochs": 1, "workers": 1, "quiet": True, "runs_dir": tmp_path}
    first = train(f"{USER}:CartPole", **settings)
    kept = snapshot(first.run_dir)
    second = train(f"{USER}:CartPole", **settings)
    assert first.run_dir == tmp_path / "CartPole-s0"
    assert second.run_dir.parent == tmp_path and STAMPED.fullmatch(second.run_dir.name)
    assert snapshot(first.run_dir) == kept
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(f"{USER}:CartPole", run=RunConfig(
            max_epochs=1, workers=1, quiet=True, run_dir=first.run_dir)).fit()  # fmt: skip
    assert snapshot(first.run_dir) == kept


def test_a_training_that_fails_before_its_first_epoch_leaves_no_directory(tmp_path) -> None:
    # A usage mistake found once the run started: the corrected command must not be refused.
    (tmp_path / "empty").mkdir()
    for name in ("new", "empty"):
        with pytest.raises(ValueError, match="needs a center evaluation"):
            Trainer("tests.e2e.toy_workers:ToyRegression",
                    run=RunConfig(target=1.0, run_dir=tmp_path / name)).fit()  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # as it was found
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.timeout(120)
def test_the_example_run_twice_keeps_both_runs(tmp_path, capsys) -> None:
    from examples.cartpole.cartpole import main as cartpole

    argv = ["--run.runs-dir", str(tmp_path), "--run.max-epochs", "1", "--run.workers", "1",
            "--run.quiet"]  # fmt: skip
    assert cartpole(argv) == 1  # not solved in one epoch: the example says so
    kept = snapshot(tmp_path / "cartpole-s0")
    assert cartpole(argv) == 1
    assert snapshot(tmp_path / "cartpole-s0") == kept
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "cartpole-s0" and re.fullmatch(r"cartpole-s0-\d{8}-\d{6}", names[1])
    capsys.readouterr()
    # A taken --run.run-dir: one line, no traceback.
    assert cartpole([*argv, "--run.run-dir", str(tmp_path / "cartpole-s0")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds a run" in err and err.count("\n") == 1
