"""A whole training on this machine that leaves a run directory behind.

    from evochi_torch import train
    result = train(CartPole, max_epochs=50, workers=2)      # -> runs/CartPole-s0/
    # the same again: -> runs/CartPole-s0-20261207-141500/ (the first run is kept)

`Trainer` puts small parts together around `evochi_torch.launch.train_workers` (embedded
server + worker processes or Ray actors): a `RunDir` of its own (checkpoints, config; no
training writes into another run's directory, see `rundir`), loggers (metrics.csv and the optional
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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codec import TorchESState, decode_state, encode_state, load_checkpoint, save_checkpoint
from ..config import ESConfig
from ..launch import (
    Supervisor,
    WorkerExit,
    WorkerSpec,
    class_path,
    load_class,
    place,
    start_processes,
    train_workers,
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
    """the directory that holds the runs named by `name`"""
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
    """worker processes on this machine, spread round-robin over the devices; 0: one per device"""
    devices: str = "cpu"
    """where workers evaluate: "cpu", a list like "cuda:0,cuda:1", or "all" (every visible GPU,
    else the CPU)"""
    cores: int | None = None
    """members one worker evaluates per task (its batch size); None in a training: population /
    workers"""
    threads: int | None = None
    """torch threads per worker process; None: CPU cores / local workers"""
    host: str = "127.0.0.1"
    """the embedded server's address to bind; 0.0.0.0 lets remote workers join too"""
    port: int = 0
    """the embedded server's port; 0: a free one"""
    worker_timeout: float = 60.0
    """task/heartbeat deadline in seconds; a missed task deadline doubles the next, up to 16x"""
    restart: bool = False
    """restart worker processes that crash (they rejoin the training)"""
    log_level: str = "WARNING"
    """logging level of this process and its workers"""
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
        self._run_dir: RunDir | None = None
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
        # Where the local worker processes run (none with Ray: it places its actors).
        self.devices: list[str] = (
            [] if self.run.ray is not None else place(self.run.devices, self.run.workers or None)
        )
        if self.run.ray is None and self.run.workers != len(self.devices):
            # config.json records how many worker processes ran, not "one per device".
            self.run = dataclasses.replace(self.run, workers=len(self.devices))
        self.workers = len(self.devices) if self.run.ray is None else self.run.ray.num_workers

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
        """Trains. On Ctrl-C the workers stop, a line on stderr says what the run directory
        kept and how to continue, and ``KeyboardInterrupt`` propagates."""
        try:
            return asyncio.run(self.fit_async())
        except KeyboardInterrupt:
            print(self._interrupted(), file=sys.stderr)
            raise

    def _interrupted(self) -> str:
        # The training already checkpointed its last recorded epoch on the way out
        # (`EpochBook.save_latest`): no need to read a large checkpoint back to name it.
        run_dir = self._run_dir
        if run_dir is None or not run_dir.trained():
            return "interrupted before the first epoch: nothing to resume"
        return (
            f"interrupted; {run_dir.path}/ keeps the checkpoint of its last epoch: continue "
            f"with --run.resume {run_dir.path}"
        )

    async def fit_async(self) -> RunResult:
        run_dir, created = self._open_run_dir()
        self._run_dir = run_dir
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
        book = EpochBook(self, run_dir, rows, loggers)
        spec = WorkerSpec(
            self.target,
            run.cores or -(-config.population_size // self.workers),
            {"config": config, **self.worker_kwargs},
            run.threads,
            log_level=run.log_level,
        )
        # No max_epochs for the server: on_epoch decides, so a stop is always an epoch whose
        # row, checkpoint and evaluation exist.
        server_config = ServerConfig(
            population_size=config.population_size, worker_timeout=run.worker_timeout
        )
        # A resumed training: the server starts from the checkpoint, at the next epoch.
        server_kwargs = (
            {}
            if self.resumed is None
            else {"initial_state": encode_state(self.resumed), "start_epoch": book.start_epoch + 1}
        )
        try:
            result = await train_workers(
                spec,
                server_config,
                self._start_workers,
                on_epoch=book.on_epoch,
                host=run.host,
                port=run.port,
                server_kwargs=server_kwargs,
            )
        except BaseException:
            book.save_latest()  # keep what was trained (Ctrl-C, all workers dead)
            raise
        return book.finish(result.crashed)

    def _start_workers(self, spec: WorkerSpec, server: Any) -> Awaitable[Supervisor]:
        """The run's workers around the embedded `server`: Ray actors or local processes."""
        if self.run.ray is not None:
            from evochi_torch.ray import start_for_server  # Ray is an optional extra

            return start_for_server(spec, server, self.run.ray, self.run.host)
        return start_processes(spec, server, self.devices, restart=self.run.restart)


class EpochBook:
    """What a training records epoch by epoch: the metrics rows, the env steps counted, the
    training clock, the best center score and the latest state, and why the training stopped.

    `on_epoch` is the embedded server's epoch callback (it runs in a thread: an evaluation or
    a checkpoint must not stall the server); `finish` writes the final checkpoint and curve
    and returns the `RunResult`."""

    def __init__(
        self, trainer: Trainer, run_dir: RunDir, rows: list[dict[str, Any]], loggers: list[Logger]
    ) -> None:
        self.trainer = trainer
        self.run = trainer.run
        self.config = trainer.config
        self.run_dir = run_dir
        self.rows = rows
        self.loggers = loggers
        # In this process: the center evaluation and the env-step bound.
        self.evaluator = offline_worker(trainer.cls, config=self.config, **trainer.worker_kwargs)
        self.can_eval = (
            callable(getattr(self.evaluator, "evaluate_center", None)) and self.run.eval_every > 0
        )
        if self.run.target is not None and not self.can_eval:
            raise ValueError(
                f"--target needs a center evaluation: {trainer.cls.__name__} has no "
                "evaluate_center(policy) -> float (or --eval-every is 0)"
            )
        self.bound = getattr(self.evaluator, "max_env_steps", None)
        resumed = trainer.resumed
        self.start_epoch = resumed.epoch if resumed is not None else 0
        last = rows[-1] if rows else None
        # Env steps of the training itself; the state's "stats_env_steps" (observation
        # statistics) are added to each row's total.
        stats0 = resumed.extra.get("stats_env_steps", 0) if resumed is not None else 0
        counted = last is not None and last["env_steps"] is not None
        self.train_steps = last["env_steps"] - stats0 if counted else 0
        self.clock_offset = float(last["seconds"]) if last else 0.0
        self.clock_started = 0.0
        scores = [r["center_score"] for r in rows if r["center_score"] is not None]
        self.best_score: float | None = max(scores, default=None)
        self.latest: tuple[int, TorchESState] | None = None
        self.done = False
        self.stopped_by = "interrupted"
        self.error: BaseException | None = None

    def on_epoch(self, summary: Any) -> bool:
        """Records one epoch; True stops the training."""
        if self.done:
            return True  # an epoch that finished while the stop was on its way
        try:
            return self._record(summary)
        except Exception as exc:
            # The server would log and go on; a training whose records fail must stop.
            self.done, self.stopped_by, self.error = True, "error", exc
            return True

    def _record(self, summary: Any) -> bool:
        run, rows = self.run, self.rows
        now = time.perf_counter()
        if not self.clock_started:
            # Training time starts with the first epoch: process start-up is not training.
            self.clock_started = now - summary.seconds
        state = decode_state(summary.state)
        self.latest = (summary.epoch, state)
        row = self._row(summary, state, now)
        # Stop before an epoch like this one would overrun the budget.
        env_steps = row["env_steps"]
        over_budget = (
            run.env_steps is not None
            and env_steps is not None
            and env_steps + (env_steps - (rows[-1]["env_steps"] if rows else 0)) > run.env_steps
        )
        at_max = run.max_epochs is not None and summary.epoch >= run.max_epochs
        if self.can_eval and (summary.epoch % run.eval_every == 0 or over_budget or at_max):
            row["center_score"] = self._evaluate(state)
        rows.append(row)
        for logger in self.loggers:
            logger.log(row)
        score = row["center_score"]
        reached = run.target is not None and score is not None and score >= run.target
        if over_budget or at_max or reached:
            self.done = True
            self.stopped_by = "target" if reached else "env_steps" if over_budget else "max_epochs"
        if not run.quiet:
            print(progress_line(row, self._budget_done(row)), flush=True)
        if self.done or summary.epoch % run.checkpoint_every == 0:
            save_checkpoint(self.run_dir.checkpoint, state)
            self._plot()
        return self.done

    def _row(self, summary: Any, state: TorchESState, now: float) -> dict[str, Any]:
        """The epoch's metrics row, without its center score."""
        rewards = np.asarray(summary.rewards, dtype=np.float64)
        bound = self.bound
        exact_steps = _summary_env_steps(
            summary, None if bound is None else bound() / self.config.population_size
        )
        epoch_steps = None
        env_steps = None
        if exact_steps is not None:
            epoch_steps = exact_steps[0]
            self.train_steps += epoch_steps
            env_steps = self.train_steps + state.extra.get("stats_env_steps", 0)
        seconds = max(summary.seconds, 1e-9)
        return {
            "epoch": summary.epoch,
            "seconds": round(self.clock_offset + now - self.clock_started, 3),
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

    def _evaluate(self, state: TorchESState) -> float:
        """The center's score; a new best is saved as best.safetensors."""
        attach_state(self.evaluator, state)
        score = float(self.evaluator.evaluate_center(self.evaluator.center_policy()))
        if not math.isfinite(score):
            raise ValueError(f"evaluate_center returned {score}")
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            save_checkpoint(self.run_dir.best, state)
        return score

    def _budget_done(self, row: dict[str, Any]) -> float | None:
        run = self.run
        if run.env_steps and row["env_steps"] is not None:
            return row["env_steps"] / run.env_steps
        if run.max_epochs:
            return row["epoch"] / run.max_epochs
        return None

    def _plot(self, rows: list[dict[str, Any]] | None = None) -> None:
        title = f"{self.trainer.cls.__name__} (seed {self.config.seed})"
        plot_curve(self.rows if rows is None else rows, self.run_dir.curve, title)

    def save_latest(self) -> None:
        """Checkpoints the last recorded epoch, if any (a training cut short keeps it)."""
        if self.latest is not None:
            save_checkpoint(self.run_dir.checkpoint, self.latest[1])

    def finish(self, crashed: list[WorkerExit]) -> RunResult:
        """The final checkpoint, curve and summary line, after the workers are gone."""
        if self.error is not None:
            self.save_latest()
            raise RuntimeError(f"recording an epoch failed: {self.error!r}") from self.error
        latest = self.latest
        if latest is None:
            resumed = self.trainer.resumed
            if resumed is None or not self.rows:
                raise RuntimeError("the training ended before its first epoch")
            latest = (self.start_epoch, resumed)
        epoch, state = latest
        rows = [r for r in self.rows if r["epoch"] <= epoch]
        save_checkpoint(self.run_dir.checkpoint, state)
        self._plot(rows)
        last = rows[-1]
        if not self.run.quiet:
            score = "" if last["center_score"] is None else f" center={last['center_score']:.2f}"
            steps = "" if last["env_steps"] is None else f" env_steps={last['env_steps']}"
            print(f"finished epoch={last['epoch']}{steps} seconds={last['seconds']:.1f}{score} "
                  f"({self.stopped_by}); wrote {self.run_dir.path}/")  # fmt: skip
        return RunResult(self.run_dir.path, rows, state, self.best_score, self.stopped_by, crashed)


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
