"""Run directories: the files a training leaves, and the rule that no run replaces another.

A new training never writes into a directory that already holds something; every entry
point (`evochi-torch train`, `evochi_torch.train`, `Trainer`, Ray, the examples) gets its
directory from `new_run_dir`:

* a run placed by name, ``runs_dir/name`` (the name defaults to ``<Class>-s<seed>``), keeps
  that plain name while no directory of that name exists and otherwise gets its start time
  appended: ``runs/CartPole-s0-20261207-141500`` (then ``-2``, ``-3`` within the same
  second). The plain name stays the one that the docs, the examples and a first
  `play`/`--resume` use; later runs sort by start time beside it, and every training prints
  the directory it wrote. Stamping every run instead would make even the first run's path
  a lookup.
* a run placed by path (``run_dir``, ``--run-dir``) goes exactly there, so it is never
  renamed: a directory that holds anything is refused with a message that names `--resume`
  (continue it) and `--overwrite` (replace it).

`overwrite` deletes a directory that holds a run before writing the new one there; it never
deletes a directory that holds no run. A resumed run stays in its directory, and its
config.json keeps the whole history: how it started and one entry per resume.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from evochi.errors import EvochiError

from ..codec import TorchESState, load_checkpoint

__all__ = ["RunDir", "RunDirExistsError", "new_run_dir", "record_resume", "record_start"]


class RunDir:
    """``runs/<name>/``: checkpoint.safetensors (the full training state, latest),
    best.safetensors (best center score), metrics.csv, curve.png, config.json."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    checkpoint = property(lambda self: self.path / "checkpoint.safetensors")
    best = property(lambda self: self.path / "best.safetensors")
    metrics = property(lambda self: self.path / "metrics.csv")
    curve = property(lambda self: self.path / "curve.png")
    config = property(lambda self: self.path / "config.json")

    def holds_run(self) -> bool:
        """Whether a training wrote here: a checkpoint, or (a run that only started) a
        config.json of a run. Any config.json would do for a refusal, but overwrite deletes
        what this says is a run, so another tool's config.json must not count."""
        if self.checkpoint.exists():
            return True
        try:
            record = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and {"worker", "es", "run"} <= record.keys()

    def trained(self) -> bool:
        """Whether the run kept any trained state (a checkpoint, or a best one)."""
        return self.checkpoint.exists() or self.best.exists()

    def write_config(self, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(data, indent=2, default=str) + "\n")

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config.read_text()) if self.config.exists() else {}

    def load(self, which: str = "checkpoint") -> TorchESState:
        path = self.best if which == "best" else self.checkpoint
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: not a run directory with a checkpoint")
        return load_checkpoint(path)


class RunDirExistsError(EvochiError, ValueError):
    """A new training was pointed at a directory that already holds something."""


def new_run_dir(
    runs_dir: Path, name: str, run_dir: Path | None = None, *, overwrite: bool = False
) -> tuple[RunDir, bool]:
    """Creates the directory of a new training: `run_dir` when given, else ``runs_dir/name``
    made unique (see the module's docstring). Returns it and whether this call created it
    (rather than taking an existing empty `run_dir`).

    Raises `RunDirExistsError` for a `run_dir` that is not empty (unless `overwrite` and it
    holds a run) and for a path that is not a directory.
    """
    if run_dir is not None or overwrite:
        return _take(Path(run_dir) if run_dir is not None else Path(runs_dir) / name, overwrite)
    plain = Path(runs_dir) / name
    if _claim(plain):
        return RunDir(plain), True
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        candidate = Path(runs_dir) / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        if _claim(candidate):
            return RunDir(candidate), True
    raise RunDirExistsError(f"no free run directory for {plain} in this second; try again")


def _claim(path: Path) -> bool:
    """Creates `path`; False if it exists. Only a directory this call created counts as
    free (not an empty one): two trainings started at once then never share a directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


def _take(path: Path, overwrite: bool) -> tuple[RunDir, bool]:
    """`path` as the user named it: created, or taken when it is an empty directory."""
    run_dir = RunDir(path)
    if path.exists() and not path.is_dir():
        raise RunDirExistsError(
            f"{path} exists and is not a directory: choose another run directory"
        )
    if path.is_dir() and any(path.iterdir()):
        if not run_dir.holds_run():
            raise RunDirExistsError(
                f"{path} is not empty and holds no run: choose another run directory"
            )
        if not overwrite:
            raise RunDirExistsError(
                f"{path} already holds a run: continue it with --run.resume {path}, "
                "or replace it with --run.overwrite"
            )
        if Path.cwd().resolve().is_relative_to(path.resolve()):
            raise RunDirExistsError(f"{path} holds the current directory: not deleting it")
        shutil.rmtree(path)
    if path.is_dir():
        return run_dir, False
    path.mkdir(parents=True)
    return run_dir, True


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """The value as config.json stores it, so that comparisons see what the file holds."""
    return json.loads(json.dumps(value, default=str))


#: Run settings that say where a run is, not how it trains: a resume is where the run is.
PLACEMENT = frozenset({"name", "runs_dir", "run_dir", "resume", "overwrite"})


def record_start(record: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """A new run's config.json: `record` (worker, es, run, worker_kwargs) with its start
    time and command line (`argv`, default sys.argv)."""
    argv = list(sys.argv if argv is None else argv)
    return _jsonable({**record, "started": _now(), "argv": argv, "resumed": []})


def record_resume(
    record: dict[str, Any],
    from_epoch: int,
    settings: dict[str, Any],
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`record` (a run's config.json) with one more entry in its "resumed" list: the time,
    the epoch resumed from, the command line (`argv`, default sys.argv) and the settings that
    differ from those in effect before, as ``{"section.key": {"from": old, "to": new}}``.
    `settings` holds the sections "run" and "worker_kwargs" of the resumed training.

    The top-level sections stay those the run started with, so the history reads forward:
    start, then each resume's changes.
    """
    record = _jsonable(record)
    settings = _jsonable(settings)
    effective = _effective_settings(record)
    changed = {}
    for section, values in settings.items():
        before = effective.get(section, {})
        for key in sorted(set(values) | set(before)):
            if section == "run" and key in PLACEMENT:
                continue
            old, new = before.get(key), values.get(key)
            if old != new:
                changed[f"{section}.{key}"] = {"from": old, "to": new}
    argv = list(sys.argv if argv is None else argv)
    entry = {"time": _now(), "from_epoch": from_epoch, "argv": argv, "changed": changed}
    record.setdefault("resumed", []).append(entry)
    return record


def _effective_settings(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The "run" and "worker_kwargs" sections as the last resume left them."""
    effective = {s: dict(record.get(s) or {}) for s in ("run", "worker_kwargs")}
    for entry in record.get("resumed", []):
        if "run" in entry:  # an entry that stored its whole run settings
            effective["run"] = dict(entry["run"])
        for dotted, change in entry.get("changed", {}).items():
            section, _, key = dotted.partition(".")
            effective.setdefault(section, {})[key] = change["to"]
    return effective
