"""`evochi-torch`: train on this machine, or join a remote server with local workers.

evochi-torch train examples.cartpole:CartPoleWorker --workers 2
evochi-server --population-size 256 --port 8080            # on the server host
evochi-torch worker examples.mujoco:MujocoWorker --server HOST:8080 --devices all
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
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
    train,
)

log = logging.getLogger("evochi_torch")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One optional flag per ESConfig field; unset flags keep the worker class's default."""
    group = parser.add_argument_group(
        "ES hyper-parameters (override the worker class's default_config)"
    )
    hints = typing.get_type_hints(ESConfig)
    for f in dataclasses.fields(ESConfig):
        if f.name in ("device",):
            continue  # per worker: --devices
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f"es_{f.name}", "default": None}
        origin = typing.get_origin(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif origin is tuple:
            kwargs.update(nargs=2, type=float, metavar=("B1", "B2"))
        else:
            scalar = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            kwargs["type"] = scalar[0]
        if f.name == "population_size":
            kwargs["help"] = "members per epoch (also the server's population size)"
        kwargs.setdefault("help", "default: the worker class's default_config")
        group.add_argument(flag, **kwargs)


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {}
    for key, value in vars(args).items():
        if key.startswith("es_") and value is not None:
            overrides[key[3:]] = tuple(value) if isinstance(value, list) else value
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
    parser.add_argument("--log-level", default="INFO", help="logging level. Default: INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evochi-torch",
        description="Run TorchESWorker subclasses: a whole training on this machine "
        "(train), or worker processes joining a remote evochi server (worker).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="embedded server + N local worker processes",
        description="Start an embedded evochi server on this machine and N local worker "
        "processes, and train until --max-epochs.",
    )
    _common_worker_flags(tr)
    tr.add_argument(
        "--workers",
        type=int,
        default=None,
        help="number of worker processes, spread round-robin over --devices. "
        "Default: one per device",
    )
    tr.add_argument("--max-epochs", type=int, default=100, help="epochs to train. Default: 100")
    tr.add_argument("--port", type=int, default=0, help="server port (0 = a free one). Default: 0")
    tr.add_argument(
        "--host",
        default="127.0.0.1",
        help="server address to bind; use 0.0.0.0 to let remote workers join too. "
        "Default: 127.0.0.1",
    )
    tr.add_argument("--worker-timeout", type=float, default=60.0, help="seconds. Default: 60")
    _add_config_flags(tr)

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
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="connect with TLS, trusting this CA/self-signed certificate file",
    )
    _add_config_flags(wk)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Like `python -m`: MODULE:CLASS may name a module of the current directory (e.g. the
    # examples of a checkout); spawned workers inherit this path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
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
    threads = args.threads or default_threads(len(placed))

    try:
        if args.command == "train":
            from evochi.server import ServerConfig

            cores = args.cores or -(-config.population_size // len(placed))
            spec = WorkerSpec(
                args.target, cores, {"config": config}, threads, log_level=args.log_level.upper()
            )
            server_config = ServerConfig(
                population_size=config.population_size,
                max_epochs=args.max_epochs,
                worker_timeout=args.worker_timeout,
            )
            result = run_until_signalled(
                train(
                    spec,
                    server_config,
                    placed,
                    host=args.host,
                    port=args.port,
                    restart=args.restart,
                )
            )
            print(f"trained epochs={result.epochs} seconds={result.seconds:.1f}")
            return 1 if result.crashed and not args.restart else 0

        root = None
        if args.tls_ca:
            with open(args.tls_ca, "rb") as fh:
                root = fh.read()
        spec = WorkerSpec(
            args.target,
            args.cores or 256,
            {"config": config},
            threads,
            join_token=args.join_token,
            root_certificates=root,
            log_level=args.log_level.upper(),
        )
        return run_until_signalled(_run_workers(spec, args.server, placed, args.restart))
    except KeyboardInterrupt:
        print("interrupted; workers stopped", file=sys.stderr)
        return 130
    except Terminated as exc:
        # SIGTERM / SIGHUP end the launcher as Ctrl-C does; the shell's code for the signal.
        print(f"terminated by {exc}; workers stopped", file=sys.stderr)
        return 128 + exc.signum


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
