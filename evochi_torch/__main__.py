"""`evochi-torch`: train on this machine, or join a remote server with local workers.

evochi-torch train examples.cartpole:CartPole --workers 2      # -> runs/CartPole-s0/
evochi-torch train examples.cartpole:CartPole --workers 2      # again: runs/CartPole-s0-<time>/
evochi-torch train examples.cartpole:CartPole --resume runs/CartPole-s0 --max-epochs 200
evochi-torch play examples.cartpole:CartPole runs/CartPole-s0 --gif out.gif
evochi-torch export /var/lib/evochi policy.safetensors        # a server's --state-dir
evochi-server --population-size 256 --port 8080            # on the server host
evochi-torch worker examples.mujoco:HalfCheetah --server HOST:8080 --devices all
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

from evochi_torch.config import ESConfig
from evochi_torch.launch import (
    Terminated,
    WorkerProcesses,
    WorkerSpec,
    default_threads,
    load_class,
    parse_devices,
    run_until_signalled,
    spread,
)
from evochi_torch.ray import add_ray_flags

log = logging.getLogger("evochi_torch")


def _add_config_flags(parser: argparse.ArgumentParser, strategy_choices: bool = True) -> None:
    """One optional flag per ESConfig field, plus every strategy's own options (see
    `evochi_torch.strategies.cli`); unset flags keep the worker class's default.

    ``--strategy`` takes the registered names (``strategy_choices=False``: any name)."""
    from evochi_torch.strategies import STRATEGIES
    from evochi_torch.strategies.cli import add_strategy_flags

    group = parser.add_argument_group(
        "ES hyper-parameters (override the worker class's default_config)"
    )
    hints = typing.get_type_hints(ESConfig)
    flags = set()
    for f in dataclasses.fields(ESConfig):
        if f.name == "strategy_options":
            continue  # one flag per option, below
        flag = "--" + f.name.replace("_", "-")
        flags.add(flag)
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f"es_{f.name}", "default": None}
        kwargs["metavar"] = None if hint is bool else f.name.upper()
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs.update(nargs=2, type=float, metavar=("B1", "B2"))
        elif typing.get_origin(hint) is typing.Literal or f.name == "strategy":
            kwargs["metavar"] = None
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif args and typing.get_origin(args[0]) is typing.Literal:  # Literal[...] | None
            kwargs["choices"] = typing.get_args(args[0])
            kwargs["metavar"] = None
        else:
            kwargs["type"] = (args or [hint])[0]
        if f.name == "population_size":
            kwargs["help"] = "members per epoch (also the server's population size)"
        elif f.name == "strategy":
            if strategy_choices:
                kwargs["choices"] = sorted(STRATEGIES)
            kwargs["help"] = (
                "the ES strategy (docs/strategies.md), or one that MODULE registers; "
                "default: the class's"
            )
        elif f.name in ("learning_rate", "optimizer", "max_speed", "fitness_shaping"):
            kwargs["help"] = "default: the worker class's default_config (None: the strategy's)"
        kwargs.setdefault("help", "default: the worker class's default_config")
        group.add_argument(flag, **kwargs)
    add_strategy_flags(parser, flags)


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from evochi_torch.strategies.cli import strategy_overrides

    overrides = {}
    for key, value in vars(args).items():
        if key.startswith("es_") and value is not None:
            overrides[key[3:]] = tuple(value) if isinstance(value, list) else value
    overrides.update(strategy_overrides(args))
    return overrides


def _resolve_config(cls: type, overrides: dict[str, Any]) -> ESConfig:
    base = getattr(cls, "default_config", None)
    if base is None:
        if "population_size" not in overrides:
            raise SystemExit(f"error: {cls.__name__} has no default_config; pass --population-size")
        return ESConfig(**overrides)
    return dataclasses.replace(base, **overrides)


def _common_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:CLASS", help="the TorchESWorker subclass")
    parser.add_argument(
        "--devices",
        default="cpu",
        help="where workers evaluate: 'cpu', a list like 'cuda:0,cuda:1', or 'all' "
        "(every visible GPU, else the CPU). Default: cpu",
    )
    parser.add_argument(
        "--cores",
        type=int,
        default=None,
        help="members evaluated per task by one worker (its batch size). Default: "
        "population / workers for train, 256 for worker",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker process. Default: CPU cores / local workers",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="restart worker processes that crash (they rejoin the training)",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level. Default: WARNING for train, INFO else"
    )


def build_parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
    strategy_choices: bool = True,
) -> argparse.ArgumentParser:
    """The command line; ``--strategy`` takes the strategies registered when it is built
    (``main`` imports the worker's module first, so those it registers count too)."""
    parser = parser_class(
        prog="evochi-torch",
        description="Run TorchESWorker subclasses: a whole training on this machine "
        "(train), or worker processes joining a remote evochi server (worker).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="embedded server + N local worker processes",
        description="Start an embedded evochi server on this machine and N local worker "
        "processes, and train until --max-epochs (or --env-steps, or --target). Every training "
        "writes a run directory of its own: checkpoint.safetensors (the full training state), "
        "best.safetensors (with a center evaluation), metrics.csv, curve.png, config.json "
        "(the settings, and each --resume). No training writes into another run's directory "
        "unless told to (--resume, --overwrite).",
    )
    _common_worker_flags(tr)
    tr.add_argument(
        "--workers",
        type=int,
        default=None,
        help="number of worker processes, spread round-robin over --devices. "
        "Default: one per device",
    )
    tr.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="stop after this epoch (counted from the start of the run, also on --resume). "
        "Default: 100, or no limit when --env-steps or --target is given",
    )
    tr.add_argument("--port", type=int, default=0, help="server port (0 = a free one). Default: 0")
    tr.add_argument(
        "--host",
        default="127.0.0.1",
        help="server address to bind; use 0.0.0.0 to let remote workers join too. "
        "Default: 127.0.0.1",
    )
    tr.add_argument("--worker-timeout", type=float, default=60.0, help="seconds. Default: 60")
    add_ray_flags(tr)
    _add_run_flags(tr)
    tr.set_defaults(log_level="WARNING")
    _add_config_flags(tr, strategy_choices)

    wk = sub.add_parser(
        "worker",
        help="local worker processes joining a remote server",
        description="Start worker processes on this machine (one per device by default) and "
        "join the evochi server at --server. Crashed processes are reported (and restarted "
        "with --restart); Ctrl-C stops them all.",
    )
    _common_worker_flags(wk)
    wk.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    wk.add_argument(
        "--workers",
        type=int,
        default=None,
        help="number of worker processes, spread round-robin over --devices. "
        "Default: one per device",
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
    _add_config_flags(wk, strategy_choices)

    pl = sub.add_parser(
        "play",
        help="evaluate a saved policy (and render it)",
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
    pl.set_defaults(log_level="WARNING")

    ex = sub.add_parser(
        "export",
        help="turn a server's --state-dir checkpoint into a policy file",
        description="Convert a training state (an evochi-server --state-dir or its "
        "checkpoint.evochi, a run directory, a .safetensors checkpoint) into OUT: a .safetensors "
        "checkpoint that `load_policy`, `play` and `--resume` read; with --state-dict "
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
    ex.set_defaults(log_level="WARNING")
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run directory, metrics and stopping")
    group.add_argument("--run-dir", default=None,
                       help="where to write the run; refused when it is not empty (see "
                       "--resume, --overwrite). Default: runs/<Class>-s<seed>, with the start "
                       "time appended when that exists (runs/<Class>-s<seed>-YYYYmmdd-HHMMSS)"
                       )  # fmt: skip
    group.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue this run from its last checkpoint (bit-identical to an "
                       "uninterrupted run; its ES config is used; config.json records the "
                       "resume)")  # fmt: skip
    group.add_argument("--overwrite", action="store_true",
                       help="delete the run in --run-dir (or runs/<Class>-s<seed>) and write "
                       "this one there")  # fmt: skip
    group.add_argument("--checkpoint-every", type=int, default=10, metavar="K",
                       help="write the checkpoint, curve and metrics every K epochs and at the "
                       "end. Default: 10")  # fmt: skip
    group.add_argument("--eval-every", type=int, default=1, metavar="N",
                       help="run the worker class's evaluate_center(policy) every N epochs "
                       "(and at the last one); 0: never. Default: 1")  # fmt: skip
    group.add_argument("--target", type=float, default=None, dest="target_score",
                       help="stop once the center score reaches this")  # fmt: skip
    group.add_argument("--env-steps", type=int, default=None,
                       help="stop before an epoch would spend more env steps than this "
                       "(workers that count env steps: GymWorker)")  # fmt: skip
    group.add_argument("--logger", default="csv", metavar="NAMES",
                       help="comma-separated: csv (always on), tensorboard, wandb (offline "
                       "unless WANDB_API_KEY/WANDB_MODE say otherwise). Default: csv")  # fmt: skip
    group.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")


class _PreParser(argparse.ArgumentParser):
    """Raises on a bad command line instead of printing usage and exiting: the first pass
    of `_import_worker_module` leaves the reporting to the real parse."""

    def error(self, message: str) -> typing.NoReturn:
        raise argparse.ArgumentError(None, message)


def _import_worker_module(argv: list[str]) -> None:
    """Import the module of ``train``/``worker``'s MODULE:CLASS before the command line is
    parsed, so that strategies it registers (``register_strategy``) are valid ``--strategy``
    names and get their option flags. A module that fails to import is left for
    ``load_class`` to report."""
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


def main(argv: list[str] | None = None) -> int:
    # Like `python -m`: MODULE:CLASS may name a module of the current directory (e.g. the
    # examples of a checkout); spawned workers inherit this path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    _import_worker_module(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in ("play", "export"):
        logging.basicConfig(level=args.log_level.upper())
        try:
            return _play(args) if args.command == "play" else _export(args)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cls = load_class(args.target)
        devices = parse_devices(args.devices)
        config = _resolve_config(cls, _config_overrides(args))
        placed = spread(devices, args.workers or len(devices))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    placement = None
    if args.ray is not None:
        from evochi_torch import ray  # imports Ray, an optional extra

        if args.command == "worker":
            # Ray gives each actor its CPUs: torch's threads follow them unless --threads says.
            return ray.run_cli(args, _worker_spec(args, config, args.threads))
        try:
            placement = ray.placement_from_args(args)
        except (ValueError, ray.RayMissingError, ConnectionError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    threads = args.threads or default_threads(len(placed))

    try:
        if args.command == "train":
            command = sys.argv if argv is None else ["evochi-torch", *argv]
            return _train(args, cls, config, placed, placement, command)

        spec = _worker_spec(args, config, threads)
        return run_until_signalled(_run_workers(spec, args.server, placed, args.restart))
    except KeyboardInterrupt:
        print("interrupted; workers stopped", file=sys.stderr)
        return 130
    except Terminated as exc:
        # SIGTERM / SIGHUP end the launcher as Ctrl-C does; the shell's code for the signal.
        print(f"terminated by {exc}; workers stopped", file=sys.stderr)
        return 128 + exc.signum


def _worker_spec(args: argparse.Namespace, config: ESConfig, threads: int | None) -> WorkerSpec:
    """`evochi-torch worker`'s processes (local or Ray actors): connect to --server."""
    root = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as fh:
            root = fh.read()
    kwargs: dict[str, Any] = {"config": config}
    if getattr(args, "give_up_after", None) is not None:
        kwargs["give_up_after"] = args.give_up_after or None
    return WorkerSpec(
        args.target,
        args.cores or 256,
        kwargs,
        threads,
        join_token=args.join_token,
        root_certificates=root,
        log_level=args.log_level.upper(),
    )


def _train(
    args: argparse.Namespace,
    cls: type,
    config: ESConfig,
    placed: list[str],
    placement: Any = None,
    command: list[str] | None = None,
) -> int:
    from evochi_torch.harness import RunConfig, Trainer

    overrides = _config_overrides(args)
    if args.resume and overrides:
        flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
        print(f"error: {flags}: a resumed run keeps its checkpoint's ES config", file=sys.stderr)
        return 2
    max_epochs = args.max_epochs
    if max_epochs is None and args.env_steps is None and args.target_score is None:
        max_epochs = 100
    loggers = tuple(n.strip() for n in args.logger.split(",") if n.strip() and n != "csv")
    run = RunConfig(
        max_epochs=max_epochs,
        env_steps=args.env_steps,
        target=args.target_score,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        resume=Path(args.resume) if args.resume else None,
        overwrite=args.overwrite,
        loggers=loggers,
        quiet=args.quiet,
        workers=len(placed),
        devices=",".join(placed),
        cores=args.cores,
        threads=args.threads,
        host=args.host,
        port=args.port,
        worker_timeout=args.worker_timeout,
        restart=args.restart,
        log_level=args.log_level.upper(),
        ray=placement,
    )
    try:
        trainer = Trainer(args.target, None if args.resume else config, run, argv=command)
        # SIGTERM/SIGHUP stop the training as Ctrl-C does (the checkpoint is kept), then
        # main() reports them.
        result = run_until_signalled(trainer.fit_async())
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"trained epochs={result.last['epoch']} seconds={result.last['seconds']:.1f} "
          f"run_dir={result.run_dir}")  # fmt: skip
    return 1 if result.crashed and not args.restart else 0


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
    from evochi_torch.codec import save_checkpoint
    from evochi_torch.harness import load_state, offline_worker

    state = load_state(args.source)
    if args.state_dict:
        from safetensors.torch import save_file

        policy = offline_worker(load_class(args.state_dict), state).center_policy()
        tensors = {k: v.detach().contiguous() for k, v in policy.state_dict().items()}
        save_file(tensors, args.out, metadata={"epoch": str(state.epoch)})
    else:
        save_checkpoint(args.out, state)
    print(f"wrote {args.out} (epoch {state.epoch}, {state.params.numel()} parameters)")
    return 0


async def _run_workers(spec: WorkerSpec, server: str, devices: list[str], restart: bool) -> int:
    with WorkerProcesses(spec, server, devices, restart=restart) as procs:
        log.info("started %d worker processes for %s on %s", len(devices), server, devices)
        exits = await procs.supervise()
    failed = [e for e in exits if e.exitcode != 0]
    for e in failed:
        print(f"error: {e.describe()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
