"""A whole training on this machine that leaves a run directory behind.

    from evochi_torch import train
    result = train(CartPole, max_epochs=50, workers=2)      # -> runs/CartPole-s0/
    # the same again: -> runs/CartPole-s0-20261207-141500/ (the first run is kept)

`Trainer` puts small parts together around `evochi_torch.launch.train_processes` (embedded
server + worker processes): a `RunDir` of its own (checkpoints, config; no training writes into
another run's directory, see `rundir`), loggers (metrics.csv and the optional
TensorBoard/wandb), progress lines, an optional center evaluation by the worker class's
`evaluate_center(policy) -> float`, stopping rules (epochs, env-step budget, target score) and
resume from the run's last checkpoint, bit-identical to an uninterrupted training.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codec import TorchESState, decode_state, encode_state, load_checkpoint, save_checkpoint
from ..config import ESConfig
from ..launch import (
    WorkerExit,
    WorkerSpec,
    class_path,
    load_class,
    parse_devices,
    spread,
    train_processes,
)
from ..ray import RayPlacement
from .loggers import Logger, make_loggers, read_metrics
from .progress import plot_curve, progress_line
from .rundir import RunDir, new_run_dir, record_resume, record_start

__all__ = [
    "METRICS_FIELDS",
    "RunConfig",
    "RunDir",
    "RunResult",
    "Trainer",
    "attach_state",
    "load_state",
    "offline_worker",
    "train",
]

log = logging.getLogger("evochi_torch.harness")

METRICS_FIELDS = (
    "epoch",
    "seconds",
    "reward_mean",
    "reward_std",
    "reward_min",
    "reward_max",
    "env_steps",
    "env_steps_exact",
    "center_score",
    "steps_per_s",
    "members_per_s",
)
#: Columns that measure time: they differ between two runs of the same training.
TIMING_FIELDS = ("seconds", "steps_per_s", "members_per_s")


@dataclass
class RunConfig:
    """How a training is run and recorded (the ES maths are in `ESConfig`)."""

    max_epochs: int | None = 100
    """stop after this epoch; None: no limit"""
    env_steps: int | None = None
    """stop before an epoch would take the env steps past this budget (needs env steps)"""
    target: float | None = None
    """stop once the center score reaches this (needs evaluate_center)"""
    eval_every: int = 1
    """run the worker class's evaluate_center every N epochs (and at the last); 0: never"""
    checkpoint_every: int = 10
    """write checkpoint.safetensors, the curve and metrics every K epochs (and at the end)"""
    name: str | None = None
    """run directory name under runs_dir (default <Class>-s<seed>); taken: start time appended"""
    runs_dir: Path = Path("runs")
    run_dir: Path | None = None
    """the run directory itself (overrides runs_dir/name); must be empty, unless resume/overwrite"""
    resume: Path | None = None
    """continue the run in this directory from its last checkpoint; config.json records it"""
    overwrite: bool = False
    """replace (delete) the run in the run directory instead of refusing run_dir or renaming"""
    loggers: tuple[str, ...] = ()
    """extra loggers besides metrics.csv: tensorboard, wandb"""
    quiet: bool = False
    """no per-epoch progress lines"""
    workers: int = 2
    devices: str = "cpu"
    cores: int | None = None
    threads: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    worker_timeout: float = 60.0
    """task/heartbeat deadline in seconds; a missed task deadline doubles the next, up to 16x"""
    restart: bool = False
    log_level: str = "WARNING"
    ray: RayPlacement | None = None
    """workers as Ray actors instead of local processes (Ray connects to `RAY_ADDRESS` when set,
    else starts a private local instance; `evochi_torch.ray.connect` first picks another)"""


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    state: TorchESState
    best_score: float | None
    stopped_by: str
    crashed: list[WorkerExit] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1]


def load_state(path: str | Path, which: str = "checkpoint") -> TorchESState:
    """A training state from a run directory (its checkpoint, or `which="best"`), a
    .safetensors checkpoint, or an `evochi-server --state-dir` (or its checkpoint.evochi)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "checkpoint.safetensors").exists():
        return RunDir(path).load(which)
    if path.is_dir() or path.suffix == ".evochi":
        from evochi.server.store import CheckpointStore

        checkpoint = CheckpointStore(path if path.is_dir() else path.parent).load()
        if checkpoint is None:
            raise FileNotFoundError(
                f"{path} holds neither a run (checkpoint.safetensors) nor a server checkpoint"
            )
        return decode_state(checkpoint.state)
    return load_checkpoint(path)


def offline_worker(cls: type, state: TorchESState | None = None, **kwargs: Any) -> Any:
    """A worker of class `cls` that never connects: the trainer's evaluator, `play`,
    `export`. With `state` it holds that state as if the server had sent it."""
    config = kwargs.pop("config", None) or (state.config if state is not None else None)
    if config is not None:
        kwargs["config"] = config
    worker = cls("127.0.0.1:0", 1, device="cpu", **kwargs)
    if state is not None:
        attach_state(worker, state)
    return worker


def attach_state(worker: Any, state: TorchESState) -> None:
    """`worker` holds `state` as if the server had sent it (`evochi.v1.Worker.adopt_state`)."""
    worker.adopt_state(state)


def _summary_env_steps(summary: Any, member_bound: float | None) -> tuple[int, bool] | None:
    """The epoch's env steps from the workers' per-member "env_steps" metrics: (steps,
    exact). Members whose worker did not report (an old client) count `member_bound` each:
    an upper bound. None when nobody reported and there is no bound."""
    metrics = getattr(summary, "metrics", None) or {}
    population = len(summary.rewards)
    reported = int(getattr(summary, "metric_members", {}).get("env_steps", 0)) if metrics else 0
    if not reported:
        return None if member_bound is None else (round(population * member_bound), False)
    missing = population - reported
    if missing and member_bound is None:
        return round(metrics["env_steps"] * population / reported), False
    return round(metrics["env_steps"] + missing * (member_bound or 0)), missing == 0


class Trainer:
    """One training of `worker` (a TorchESWorker subclass or "module:Class").

    Args:
        worker: the worker class; it must be importable by path (worker processes import it).
        config: ES hyper-parameters; default: the class's `default_config` (on resume: the
            checkpoint's).
        run: how the training runs and what it writes.
        worker_kwargs: extra constructor arguments of the worker class (picklable).
        argv: the command line config.json records for this training (default: sys.argv).
    """

    def __init__(
        self,
        worker: type | str,
        config: ESConfig | None = None,
        run: RunConfig | None = None,
        worker_kwargs: dict[str, Any] | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.argv = list(sys.argv if argv is None else argv)
        self.cls = load_class(worker) if isinstance(worker, str) else worker
        self.target = worker if isinstance(worker, str) else class_path(worker)
        self.run = run or RunConfig()
        self.worker_kwargs = dict(worker_kwargs or {})
        self.resumed: TorchESState | None = None
        self._check_placement()
        if self.run.resume is not None:
            self.resumed = RunDir(self.run.resume).load()
            config = self.resumed.config
        config = config if config is not None else getattr(self.cls, "default_config", None)
        if config is None:
            raise ValueError(f"{self.cls.__name__} has no default_config: pass an ESConfig")
        self.config: ESConfig = config
        for key in ("max_epochs", "env_steps", "checkpoint_every", "workers"):
            value = getattr(self.run, key)
            if value is not None and value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if (
            self.resumed is not None
            and self.run.max_epochs is not None
            and self.resumed.epoch >= self.run.max_epochs
        ):
            raise ValueError(
                f"{self.run.resume} is already trained to epoch {self.resumed.epoch}: "
                f"give a larger max_epochs than {self.run.max_epochs} to continue"
            )
        if self.run.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")

    # ------------------------------------------------------------------ pieces
    def _check_placement(self) -> None:
        run = self.run
        if run.resume is None:
            return
        if run.overwrite:
            raise ValueError(
                "resume and overwrite exclude each other: resume continues the run, "
                "overwrite replaces it"
            )
        if run.run_dir is not None and Path(run.run_dir).resolve() != Path(run.resume).resolve():
            raise ValueError(
                f"a resumed run stays in its directory {run.resume}: drop run_dir {run.run_dir}"
            )

    def run_name(self) -> str:
        """The run directory's name under runs_dir before it is made unique."""
        return self.run.name or f"{self.cls.__name__}-s{self.config.seed}"

    def _open_run_dir(self) -> tuple[RunDir, bool]:
        run = self.run
        if run.resume is not None:
            return RunDir(run.resume), False
        return new_run_dir(run.runs_dir, self.run_name(), run.run_dir, overwrite=run.overwrite)

    def _write_record(self, run_dir: RunDir) -> list[dict[str, Any]]:
        """Writes config.json; returns the metrics rows a resumed run keeps."""
        if self.resumed is None:
            run_dir.write_config(record_start(self.config_record(), self.argv))
            return []
        record = record_resume(run_dir.read_config(), self.resumed.epoch, {
            "run": dataclasses.asdict(self.run),
            "worker_kwargs": self.config_record()["worker_kwargs"],
        }, self.argv)  # fmt: skip
        run_dir.write_config(record)
        if not run_dir.metrics.exists():
            return []
        return [r for r in read_metrics(run_dir.metrics) if r["epoch"] <= self.resumed.epoch]

    def config_record(self) -> dict[str, Any]:
        return {
            "worker": self.target,
            "es": self.config.to_dict(),
            "run": dataclasses.asdict(self.run),
            "worker_kwargs": {k: _jsonable(v) for k, v in self.worker_kwargs.items()},
        }

    # ------------------------------------------------------------------ the training
    def fit(self) -> RunResult:
        return asyncio.run(self.fit_async())

    async def fit_async(self) -> RunResult:
        run_dir, created = self._open_run_dir()
        try:
            rows = self._write_record(run_dir)
            loggers = make_loggers(
                self.run.loggers,
                run_dir.path,
                METRICS_FIELDS,
                name=run_dir.path.name,
                config=self.config_record(),
                keep=rows,
            )
            try:
                return await self._train(run_dir, rows, loggers)
            finally:
                for logger in loggers:
                    logger.close()
        except BaseException:
            if self.resumed is None and not run_dir.trained():
                # Nothing was trained: a rerun of the same command, its mistake fixed, must
                # not be refused for a directory that holds only a config.json.
                shutil.rmtree(run_dir.path, ignore_errors=True)
                if not created:  # the user's empty directory: left as it was found
                    run_dir.path.mkdir(exist_ok=True)
            raise

    async def _train(
        self, run_dir: RunDir, rows: list[dict[str, Any]], loggers: list[Logger]
    ) -> RunResult:
        from evochi.server import ServerConfig

        run, config = self.run, self.config
        # In this process: the center evaluation and the env-step bound.
        evaluator = offline_worker(self.cls, config=config, **self.worker_kwargs)
        can_eval = callable(getattr(evaluator, "evaluate_center", None)) and run.eval_every > 0
        if run.target is not None and not can_eval:
            raise ValueError(
                f"--target needs a center evaluation: {self.cls.__name__} has no "
                "evaluate_center(policy) -> float (or --eval-every is 0)"
            )
        bound = getattr(evaluator, "max_env_steps", None)
        devices = spread(parse_devices(run.devices), run.workers or 1)
        workers = run.ray.num_workers if run.ray is not None else len(devices)
        spec = WorkerSpec(
            self.target,
            run.cores or -(-config.population_size // workers),
            {"config": config, **self.worker_kwargs},
            run.threads,
            log_level=run.log_level,
        )
        # No max_epochs for the server: on_epoch decides, so a stop is always an epoch whose
        # row, checkpoint and evaluation exist.
        server_config = ServerConfig(
            population_size=config.population_size, worker_timeout=run.worker_timeout
        )
        last = rows[-1] if rows else None
        start_epoch = self.resumed.epoch if self.resumed is not None else 0
        stats0 = self.resumed.extra.get("stats_env_steps", 0) if self.resumed else 0
        counted = {"train_steps": (last["env_steps"] - stats0) if last and last["env_steps"]
                   is not None else 0}  # fmt: skip
        clock = {"offset": float(last["seconds"]) if last else 0.0, "started": 0.0}
        best = {"score": max((r["center_score"] for r in rows if r["center_score"] is not None),
                             default=None)}  # fmt: skip
        latest: dict[int, TorchESState] = {}
        outcome: dict[str, Any] = {"done": False, "by": "interrupted"}

        def on_epoch(summary: Any) -> bool:
            if outcome["done"]:
                return True  # an epoch that finished while the stop was on its way
            try:
                return record_epoch(summary)
            except Exception as exc:
                # The server would log and go on; a training whose records fail must stop.
                outcome.update(done=True, by="error", error=exc)
                return True

        def record_epoch(summary: Any) -> bool:
            now = time.perf_counter()
            if not clock["started"]:
                # Training time starts with the first epoch: process start-up is not training.
                clock["started"] = now - summary.seconds
            state = decode_state(summary.state)
            latest.clear()
            latest[summary.epoch] = state
            rewards = np.asarray(summary.rewards, dtype=np.float64)
            exact_steps = _summary_env_steps(
                summary, None if bound is None else bound() / config.population_size
            )
            epoch_steps = None
            env_steps = None
            if exact_steps is not None:
                epoch_steps = exact_steps[0]
                counted["train_steps"] += epoch_steps
                env_steps = counted["train_steps"] + state.extra.get("stats_env_steps", 0)
            seconds = max(summary.seconds, 1e-9)
            row: dict[str, Any] = {
                "epoch": summary.epoch,
                "seconds": round(clock["offset"] + now - clock["started"], 3),
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "reward_min": float(rewards.min()),
                "reward_max": float(rewards.max()),
                "env_steps": env_steps,
                "env_steps_exact": None if exact_steps is None else int(exact_steps[1]),
                "center_score": None,
                "steps_per_s": None if epoch_steps is None else round(epoch_steps / seconds),
                "members_per_s": round(len(rewards) / seconds, 1),
            }
            # Stop before an epoch like this one would overrun the budget.
            over_budget = (
                run.env_steps is not None
                and env_steps is not None
                and env_steps + (env_steps - (rows[-1]["env_steps"] if rows else 0)) > run.env_steps
            )
            at_max = run.max_epochs is not None and summary.epoch >= run.max_epochs
            if can_eval and (summary.epoch % run.eval_every == 0 or over_budget or at_max):
                attach_state(evaluator, state)
                score = float(evaluator.evaluate_center(evaluator.center_policy()))
                if not math.isfinite(score):
                    raise ValueError(f"evaluate_center returned {score}")
                row["center_score"] = score
                if best["score"] is None or score > best["score"]:
                    best["score"] = score
                    save_checkpoint(run_dir.best, state)
            rows.append(row)
            for logger in loggers:
                logger.log(row)
            score = row["center_score"]
            reached = run.target is not None and score is not None and score >= run.target
            if over_budget or at_max or reached:
                outcome.update(done=True, by="target" if reached else
                               "env_steps" if over_budget else "max_epochs")  # fmt: skip
            if not run.quiet:
                print(progress_line(row, self._budget_done(row)), flush=True)
            if outcome["done"] or summary.epoch % run.checkpoint_every == 0:
                save_checkpoint(run_dir.checkpoint, state)
                plot_curve(rows, run_dir.curve, f"{self.cls.__name__} (seed {config.seed})")
            return bool(outcome["done"])

        # A resumed training: the server starts from the checkpoint, at the next epoch.
        server_kwargs = (
            {}
            if self.resumed is None
            else {"initial_state": encode_state(self.resumed), "start_epoch": start_epoch + 1}
        )
        try:
            if run.ray is not None:
                from evochi_torch.ray import train_ray  # Ray is an optional extra

                result = await train_ray(
                    spec,
                    server_config,
                    run.ray,
                    on_epoch=on_epoch,
                    host=run.host,
                    port=run.port,
                    server_kwargs=server_kwargs,
                )
            else:
                result = await train_processes(
                    spec,
                    server_config,
                    devices,
                    on_epoch=on_epoch,
                    host=run.host,
                    port=run.port,
                    restart=run.restart,
                    server_kwargs=server_kwargs,
                )
        except BaseException:
            if latest:  # keep what was trained (Ctrl-C, all workers dead)
                save_checkpoint(run_dir.checkpoint, next(iter(latest.values())))
            raise
        if "error" in outcome:
            if latest:
                save_checkpoint(run_dir.checkpoint, next(iter(latest.values())))
            error = outcome["error"]
            raise RuntimeError(f"recording an epoch failed: {error!r}") from error
        if not latest:
            if self.resumed is None or not rows:
                raise RuntimeError("the training ended before its first epoch")
            latest[start_epoch] = self.resumed
        epoch, state = next(iter(latest.items()))
        rows = [r for r in rows if r["epoch"] <= epoch]
        save_checkpoint(run_dir.checkpoint, state)
        plot_curve(rows, run_dir.curve, f"{self.cls.__name__} (seed {config.seed})")
        last = rows[-1]
        if not run.quiet:
            score = "" if last["center_score"] is None else f" center={last['center_score']:.2f}"
            steps = "" if last["env_steps"] is None else f" env_steps={last['env_steps']}"
            print(f"finished epoch={last['epoch']}{steps} seconds={last['seconds']:.1f}{score} "
                  f"({outcome['by']}); wrote {run_dir.path}/")  # fmt: skip
        return RunResult(run_dir.path, rows, state, best["score"], str(outcome["by"]),
                         result.crashed)  # fmt: skip

    def _budget_done(self, row: dict[str, Any]) -> float | None:
        run = self.run
        if run.env_steps and row["env_steps"] is not None:
            return row["env_steps"] / run.env_steps
        if run.max_epochs:
            return row["epoch"] / run.max_epochs
        return None


def train(
    worker: type | str,
    config: ESConfig | None = None,
    *,
    worker_kwargs: dict[str, Any] | None = None,
    **run: Any,
) -> RunResult:
    """`Trainer(worker, config, RunConfig(**run), worker_kwargs).fit()`."""
    return Trainer(worker, config, RunConfig(**run), worker_kwargs).fit()


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
