"""`evochi-torch`: train on this machine, or join a remote server with local workers.

evochi-torch train examples.cartpole:CartPole --run.workers 2    # -> runs/CartPole-s0/
evochi-torch train examples.cartpole:CartPole --run.workers 2    # again: runs/CartPole-s0-<time>/
evochi-torch train examples.cartpole:CartPole --run.resume runs/CartPole-s0 --run.max-epochs 200
evochi-torch train examples.cartpole:CartPole --es.sigma 0.1 --es.strategy pgpe
evochi-torch play examples.cartpole:CartPole runs/CartPole-s0 --gif out.gif
evochi-torch export /var/lib/evochi policy.safetensors        # a server's --state-dir
evochi-server --population-size 256 --port 8080            # on the server host
evochi-torch worker examples.mujoco:HalfCheetah --server HOST:8080 --devices all

`train`'s options are the fields of `ESConfig` (``--es.FIELD``) and `RunConfig`
(``--run.FIELD``), spelled as in the examples' command lines; see `evochi_torch.cli.flags`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import typing
from typing import Any

from evochi_torch.config import ESConfig
from evochi_torch.launch import (
    Supervisor,
    Terminated,
    WorkerProcesses,
    WorkerSpec,
    load_class,
    place,
    run_until_signalled,
    serve_workers,
)

from .flags import (
    Formatter,
    add_dataclass_flags,
    add_es_flags,
    add_ray_flags,
    es_overrides,
    given_fields,
)

__all__ = ["build_parser", "es_overrides", "main"]

log = logging.getLogger("evochi_torch")

#: Where `train` and `worker` store their `RunConfig` fields (``--run.devices``, ``--devices``).
RUN_DEST = "run."

# `train`'s defaults where they are not RunConfig's (a command line names one device, say).
_TRAIN_DEFAULTS = {
    "workers": "Default: one per device",
    "max_epochs": "Default: 100, or no limit when --run.env-steps or --run.target is given",
    "cores": "Default: population / workers",
    "threads": "Default: CPU cores / local workers",
    "loggers": "(metrics.csv is always written). Default: none",
}
# The RunConfig fields that had flat flags before they were spelled --run.FIELD: those
# spellings stay accepted (deprecated) so that existing scripts keep working.
_FLAT_RUN_FLAGS = (
    "max_epochs", "env_steps", "target", "eval_every", "checkpoint_every", "run_dir", "resume",
    "overwrite", "quiet", "workers", "devices", "cores", "threads", "host", "port",
    "worker_timeout", "restart", "log_level",
)  # fmt: skip
# The fields of RunConfig that `worker` shares (its processes join a remote server).
_WORKER_FIELDS = ("devices", "workers", "cores", "threads", "restart", "log_level")


def build_parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
    strategy_choices: bool = True,
) -> argparse.ArgumentParser:
    """The command line; ``--es.strategy`` takes the strategies registered when it is built
    (``main`` imports the worker's module first, so those it registers count too)."""
    from evochi_torch.harness import RunConfig

    parser = parser_class(
        prog="evochi-torch",
        description="Run TorchESWorker subclasses: a whole training on this machine "
        "(train), or worker processes joining a remote evochi server (worker).",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="embedded server + N local worker processes",
        formatter_class=Formatter,
        description="Start an embedded evochi server on this machine and N local worker "
        "processes, and train until --run.max-epochs (or --run.env-steps, or --run.target). "
        "Every training writes a run directory of its own: checkpoint.safetensors (the full "
        "training state), best.safetensors (with a center evaluation), metrics.csv, curve.png, "
        "config.json (the settings, and each --run.resume). No training writes into another "
        "run's directory unless told to (--run.resume, --run.overwrite). The options are the "
        "fields of ESConfig (--es.*) and RunConfig (--run.*), as in the examples.",
    )
    tr.add_argument("target", metavar="MODULE:CLASS", help="the TorchESWorker subclass")
    run_group = tr.add_argument_group(
        "the run (RunConfig): run directory, metrics, stopping, worker processes"
    )
    add_dataclass_flags(
        run_group,
        RunConfig,
        prefix="run.",
        dest=RUN_DEST,
        alias=_FLAT_RUN_FLAGS,
        helps=_TRAIN_DEFAULTS,
    )
    run_group.add_argument(
        "--logger",
        dest=RUN_DEST + "loggers",
        type=_comma_loggers,
        default=None,
        help=argparse.SUPPRESS,  # the comma-separated spelling of --run.loggers, deprecated
    )
    add_ray_flags(tr)
    add_es_flags(tr, strategy_choices)

    wk = sub.add_parser(
        "worker",
        help="local worker processes joining a remote server",
        formatter_class=Formatter,
        description="Start worker processes on this machine (one per device by default) and "
        "join the evochi server at --server. Crashed processes are reported (and restarted "
        "with --restart); Ctrl-C stops them all.",
    )
    wk.add_argument("target", metavar="MODULE:CLASS", help="the TorchESWorker subclass")
    wk.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    add_dataclass_flags(
        wk,
        RunConfig,
        prefix="",
        dest=RUN_DEST,
        fields=_WORKER_FIELDS,
        helps={
            "workers": "Default: one per device",
            "cores": "Default: 256",
            "threads": "Default: CPU cores / local workers",
            "log_level": "Default: INFO",
        },
    )
    wk.add_argument("--join-token", default=None, help="the server's join token, if it has one")
    wk.add_argument(
        "--give-up-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop reconnecting once the server has been gone this long: exit 0 when the "
        "worker had finished the training's last epoch, else 1; 0 = never. Default: 10 "
        "heartbeat intervals of the server (5 worker timeouts), at least 60",
    )
    wk.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="connect with TLS, trusting this CA/self-signed certificate file",
    )
    add_ray_flags(wk)
    add_es_flags(wk, strategy_choices)

    pl = sub.add_parser(
        "play",
        help="evaluate a saved policy (and render it)",
        formatter_class=Formatter,
        description="Load a policy (a run directory, a .safetensors checkpoint or a server's "
        "--state-dir) into the worker class and run its center evaluation: the worker's "
        "play() (GymWorker: returns per episode, --gif/--video) or evaluate_center().",
    )
    pl.add_argument("target", metavar="MODULE:CLASS", help="the worker class of the training")
    pl.add_argument("source", metavar="RUN", help="run directory, checkpoint or state dir")
    pl.add_argument("--best", action="store_true", help="the run's best.safetensors")
    pl.add_argument("--episodes", type=int, default=None, help="Default: the worker's setting")
    pl.add_argument("--gif", default=None, metavar="PATH", help="render one episode to a GIF")
    pl.add_argument("--video", default=None, metavar="PATH", help="render one episode to MP4")

    ex = sub.add_parser(
        "export",
        help="turn a server's --state-dir checkpoint into a policy file",
        formatter_class=Formatter,
        description="Convert a training state (an evochi-server --state-dir or its "
        "checkpoint.evochi, a run directory, a .safetensors checkpoint) into OUT: a .safetensors "
        "checkpoint that `load_policy`, `play` and `--run.resume` read; with --state-dict "
        "MODULE:CLASS, the policy module's plain state_dict (safetensors.torch.load_file + "
        "module.load_state_dict).",
    )
    ex.add_argument("source", metavar="SOURCE", help="state dir, checkpoint.evochi or run dir")
    ex.add_argument("out", metavar="OUT", help="the .safetensors file to write")
    ex.add_argument(
        "--state-dict",
        default=None,
        metavar="MODULE:CLASS",
        help="write the worker class's policy module state_dict instead of the training state",
    )
    return parser


def _comma_loggers(text: str) -> tuple[str, ...]:
    from .flags import _deprecated

    _deprecated("--logger", "--run.loggers NAME [NAME ...]")
    return tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "csv")


class _PreParser(argparse.ArgumentParser):
    """Raises on a bad command line instead of printing usage and exiting: the first pass
    of `_import_worker_module` leaves the reporting to the real parse."""

    def error(self, message: str) -> typing.NoReturn:
        raise argparse.ArgumentError(None, message)


def _import_worker_module(argv: list[str]) -> None:
    """Import the module of ``train``/``worker``'s MODULE:CLASS before the command line is
    parsed, so that strategies it registers (``register_strategy``) are valid
    ``--es.strategy`` names and get their option flags. A module that fails to import is
    left for ``load_class`` to report."""
    help_flags = ("-h", "--help")
    try:
        args, _ = build_parser(_PreParser, strategy_choices=False).parse_known_args(
            [a for a in argv if a not in help_flags]
        )
    except argparse.ArgumentError:
        return
    target = getattr(args, "target", None)
    if args.command not in ("train", "worker") or not target or ":" not in target:
        return
    module = target.partition(":")[0]
    if module and module not in sys.modules:
        with contextlib.suppress(Exception):
            importlib.import_module(module)


def _resolve_config(cls: type, overrides: dict[str, Any]) -> ESConfig:
    base = getattr(cls, "default_config", None)
    if base is None:
        if "population_size" not in overrides:
            raise SystemExit(
                f"error: {cls.__name__} has no default_config; pass --es.population-size"
            )
        return ESConfig(**overrides)
    return dataclasses.replace(base, **overrides)


def main(argv: list[str] | None = None) -> int:
    # Like `python -m`: MODULE:CLASS may name a module of the current directory (e.g. the
    # examples of a checkout); spawned workers inherit this path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    _import_worker_module(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in ("play", "export"):
        logging.basicConfig(level="WARNING")
        try:
            return _play(args) if args.command == "play" else _export(args)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    run = given_fields(args, RUN_DEST)
    default_level = "WARNING" if args.command == "train" else "INFO"
    level = str(run.get("log_level") or default_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cls = load_class(args.target)
        overrides = es_overrides(args)
        config = _resolve_config(cls, overrides)
        placement = None if args.ray is None else _ray_placement(args, run)
        start = None
        if args.command == "worker":
            start = _worker_start(args, run, config, placement, level)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if start is None:
            command = sys.argv if argv is None else ["evochi-torch", *argv]
            return _train(cls, config, overrides, run, placement, command)
        return run_until_signalled(_serve(start))
    except KeyboardInterrupt:
        print("interrupted; workers stopped", file=sys.stderr)
        return 130
    except Terminated as exc:
        # SIGTERM / SIGHUP end the launcher as Ctrl-C does; the shell's code for the signal.
        print(f"terminated by {exc}; workers stopped", file=sys.stderr)
        return 128 + exc.signum


def _ray_placement(args: argparse.Namespace, run: dict[str, Any]) -> Any:
    """The Ray placement the `--ray` flags ask for, once connected to Ray (ValueError: bad
    flags, a missing Ray or no cluster, with a message for the user)."""
    from evochi_torch import ray  # imports Ray, an optional extra

    if args.ray_num_workers is None:
        raise ValueError("--ray needs --num-workers N")
    if run.get("devices", "cpu") != "cpu":
        flag = "--run.devices" if args.command == "train" else "--devices"
        raise ValueError(
            f"{flag} does not apply with --ray (Ray assigns devices); use --gpus-per-worker"
        )
    if run.get("restart"):
        log.info("restarting is implied with --ray: Ray restarts actors whose process died")
    values = {"num_workers": args.ray_num_workers}
    for name in ("gpus_per_worker", "cpus_per_worker"):
        if getattr(args, "ray_" + name) is not None:
            values[name] = getattr(args, "ray_" + name)
    placement = ray.RayPlacement(**values)
    try:
        ray.connect(args.ray)
        if args.command == "train":
            ray.check_reachable(run.get("host", "127.0.0.1"))  # a multi-node cluster needs it
    except (ray.RayMissingError, ConnectionError) as exc:
        raise ValueError(str(exc)) from exc
    return placement


def _worker_start(
    args: argparse.Namespace,
    run: dict[str, Any],
    config: ESConfig,
    placement: Any,
    level: str,
) -> Any:
    """`evochi-torch worker`: a function that starts its supervisor (local processes or Ray
    actors) joining --server."""
    root = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as fh:
            root = fh.read()
    kwargs: dict[str, Any] = {"config": config}
    if args.give_up_after is not None:
        kwargs["give_up_after"] = args.give_up_after or None
    # threads=None: the supervisor picks (local processes share the CPU cores; a Ray actor
    # gets its --cpus-per-worker).
    spec = WorkerSpec(
        args.target,
        run.get("cores") or 256,
        kwargs,
        run.get("threads"),
        join_token=args.join_token,
        root_certificates=root,
        log_level=level,
    )
    if placement is not None:
        from evochi_torch.ray import start_workers

        return lambda: asyncio.to_thread(start_workers, spec, args.server, placement)
    devices = place(run.get("devices", "cpu"), run.get("workers"))
    restart = bool(run.get("restart"))

    async def start_processes() -> Supervisor:
        workers = WorkerProcesses(spec, args.server, devices, restart=restart).start()
        log.info("started %d worker processes for %s on %s", len(devices), args.server, devices)
        return workers

    return start_processes


async def _serve(start: Any) -> int:
    workers = await start()
    exits = await serve_workers(workers)
    failed = [e for e in exits if e.exitcode != 0]
    for e in failed:
        print(f"error: {e.describe()}", file=sys.stderr)
    return 1 if failed else 0


def _train(
    cls: type,
    config: ESConfig,
    overrides: dict[str, Any],
    run: dict[str, Any],
    placement: Any,
    command: list[str],
) -> int:
    from evochi_torch.harness import RunConfig, Trainer

    if run.get("resume") and overrides:
        flags = ", ".join("--es." + k.replace("_", "-") for k in overrides)
        print(f"error: {flags}: a resumed run keeps its checkpoint's ES config", file=sys.stderr)
        return 2
    if run.get("max_epochs") is None and run.get("env_steps") is None and run.get("target") is None:
        run["max_epochs"] = 100
    elif "max_epochs" not in run:
        run["max_epochs"] = None
    # 0 workers: one per device (Trainer places them).
    run.setdefault("workers", 0)
    run["log_level"] = str(run.get("log_level", "WARNING")).upper()
    try:
        trainer = Trainer(
            cls,
            None if run.get("resume") else config,
            RunConfig(**run, ray=placement),
            argv=command,
        )
        # SIGTERM/SIGHUP stop the training as Ctrl-C does (the checkpoint is kept), then
        # main() reports them.
        result = run_until_signalled(trainer.fit_async())
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"trained epochs={result.last['epoch']} seconds={result.last['seconds']:.1f} "
          f"run_dir={result.run_dir}")  # fmt: skip
    return 1 if result.crashed and not run.get("restart") else 0


def _play(args: argparse.Namespace) -> int:
    from evochi_torch.harness import load_state, offline_worker

    cls = load_class(args.target)
    state = load_state(args.source, "best" if args.best else "checkpoint")
    worker = offline_worker(cls, state)
    policy = worker.center_policy()
    if callable(getattr(worker, "play", None)):
        worker.play(policy, args.episodes, gif=args.gif, video=args.video)
        return 0
    if args.gif or args.video:
        raise ValueError(f"{cls.__name__} has no play(): --gif/--video need a GymWorker")
    if not callable(getattr(worker, "evaluate_center", None)):
        raise ValueError(f"{cls.__name__} has neither play() nor evaluate_center(policy)")
    print(f"center score {worker.evaluate_center(policy):.4f} (epoch {state.epoch})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from evochi_torch.codec import save_checkpoint, save_state_dict
    from evochi_torch.harness import load_state, offline_worker

    state = load_state(args.source)
    if args.state_dict:
        policy = offline_worker(load_class(args.state_dict), state).center_policy()
        save_state_dict(args.out, policy, state.epoch)
    else:
        save_checkpoint(args.out, state)
    print(f"wrote {args.out} (epoch {state.epoch}, {state.params.numel()} parameters)")
    return 0
