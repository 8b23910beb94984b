"""Where the per-epoch metrics rows go: CSV (always), TensorBoard, Weights & Biases.

A logger is anything with ``log(row)`` and ``close()``; `make_loggers` builds them from the
``--run.loggers`` names (csv, tensorboard, wandb). TensorBoard and wandb are optional extras
(``pip install 'evochi[loggers]'``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "LOGGERS",
    "CSVLogger",
    "Logger",
    "TensorBoardLogger",
    "WandbLogger",
    "make_loggers",
    "read_metrics",
]

Row = Mapping[str, Any]


class Logger(Protocol):
    def log(self, row: Row) -> None: ...

    def close(self) -> None: ...


def _numeric(row: Row) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class CSVLogger:
    """metrics.csv, one row per epoch, flushed as it goes (a crash loses nothing written).

    ``keep`` are rows already in the run (a resumed training): the file is rewritten with
    them first, so that rows of epochs after the checkpoint disappear.
    """

    def __init__(self, path: Path, fields: Sequence[str], keep: Sequence[Row] = ()) -> None:
        self.path = Path(path)
        self.fields = list(fields)
        self._fh = open(self.path, "w", newline="")  # noqa: SIM115
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, extrasaction="ignore")
        self._writer.writeheader()
        for row in keep:
            self.log(row)

    def log(self, row: Row) -> None:
        self._writer.writerow({k: "" if v is None else v for k, v in row.items()})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv back as rows of ints/floats (None for empty cells)."""

    def parse(value: str) -> Any:
        if value == "":
            return None
        try:
            return int(value)
        except ValueError:
            return float(value)

    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(fh)]


class TensorBoardLogger:
    """Scalars under ``<run>/tensorboard``, one step per epoch (``tensorboard --logdir runs``)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError(
                "--run.loggers tensorboard needs the tensorboard package: "
                "pip install 'evochi[loggers]' (or pip install tensorboard)"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: Row) -> None:
        for key, value in _numeric(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run under ``<run>/wandb``.

    Offline unless told otherwise (WANDB_MODE) or logged in (WANDB_API_KEY): a training must
    not hang on a network it may not have; `wandb sync <run>/wandb/offline-run-*` uploads it.
    """

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError(
                "--run.loggers wandb needs the wandb package: pip install 'evochi[loggers]' "
                "(or pip install wandb)"
            ) from exc
        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "evochi"),
            name=name,
            dir=str(run_dir),
            config=dict(config),
            mode=mode,  # type: ignore[arg-type]
            reinit="create_new",
        )

    def log(self, row: Row) -> None:
        self.run.log(_numeric(row), step=int(row["epoch"]))

    def close(self) -> None:
        self.run.finish()


LOGGERS = ("csv", "tensorboard", "wandb")


def make_loggers(
    names: Sequence[str],
    run_dir: Path,
    fields: Sequence[str],
    *,
    name: str,
    config: Mapping[str, Any],
    keep: Sequence[Row] = (),
) -> list[Logger]:
    """The CSV logger (always) and the optional ones named in `names`."""
    unknown = sorted(set(names) - set(LOGGERS))
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)}")
    loggers: list[Logger] = [CSVLogger(run_dir / "metrics.csv", fields, keep)]
    try:
        if "tensorboard" in names:
            loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
        if "wandb" in names:
            loggers.append(WandbLogger(run_dir, name, config))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return loggers
