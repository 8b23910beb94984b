"""Worker actors placed by Ray: `evochi-torch worker|train ... --ray auto|local|ADDRESS`.

Each actor runs one `TorchESWorker` (a "module:Class" that every node can import) and joins
an evochi server like any worker process would. Ray decides where the actors run, gives
each its GPU (`--gpus-per-worker`) or CPUs, and restarts an actor whose process dies (a
killed node, the OOM killer, a segfault); the restarted actor joins the training again as a
new worker, and the server re-assigns whatever the dead one held, so nothing is lost.

    from evochi_torch.launch import WorkerSpec
    from evochi_torch.ray import RayPlacement, start_workers

    workers = start_workers(WorkerSpec("examples.cartpole:CartPole"), "HOST:8080",
                            RayPlacement(num_workers=8, gpus_per_worker=1))
    ...
    workers.stop()          # each actor leaves the training, then is killed for good

Ray is an optional dependency (`pip install 'evochi[ray]'`): it is imported on first use,
never by `import evochi_torch`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evochi.errors import EvochiError
from evochi_torch.launch import TrainResult, WorkerExit, WorkerSpec, early_stop_hook, load_class

__all__ = [
    "RayMissingError",
    "RayPlacement",
    "RayWorkers",
    "add_ray_flags",
    "connect",
    "start_workers",
    "train_ray",
]

log = logging.getLogger("evochi_torch.ray")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RayMissingError(EvochiError, ImportError):
    """Ray is not installed (it is an optional extra)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayMissingError(
            f"Ray is not installed ({exc}); install the extra: pip install 'evochi[ray]'"
        ) from None
    return ray


@dataclass(frozen=True)
class RayPlacement:
    """How many worker actors, and what Ray reserves for each.

    ``gpus_per_worker`` may be fractional (0.25: four workers share a GPU); a worker with a
    GPU evaluates on it, else on the CPU. ``max_restarts`` bounds how often Ray restarts
    each actor after its process died (-1: always).
    """

    num_workers: int
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_restarts: int = -1

    def __post_init__(self) -> None:
        if self.num_workers <= 0:
            raise ValueError(f"--num-workers must be positive, got {self.num_workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ValueError("--gpus-per-worker and --cpus-per-worker cannot be negative")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(f"--gpus-per-worker above 1 must be whole, got {self.gpus_per_worker}")


def connect(address: str | None = "auto", **init_kwargs: Any) -> None:
    """Connects this process to Ray, unless it already is.

    ``address``: "auto" (the cluster this machine belongs to: RAY_ADDRESS or a local
    `ray start`), "local" or None (start a private Ray instance on this machine), or a
    cluster address ("HOST:6379", "ray://HOST:10001").
    """
    ray = _ray()
    if ray.is_initialized():
        return
    if address == "local":
        address = None
    init_kwargs.setdefault("include_dashboard", False)
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as exc:
        raise ConnectionError(
            f"cannot connect to Ray at {address!r}: {exc}. Start a cluster first "
            "(`ray start --head`), pass its address, or use --ray local for a private one"
        ) from exc


def _restarted() -> bool:
    """Whether Ray restarted this actor after its process died."""
    with warnings.catch_warnings():
        # Ray's own property reads a deprecated attribute internally (Ray 2.5x).
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(_ray().get_runtime_context().was_current_actor_reconstructed)


class _WorkerActor:
    """One evochi worker inside a Ray actor (an async actor: `stop` runs beside `run`)."""

    def __init__(self, spec: WorkerSpec, address: str, index: int, search_path: str) -> None:
        self.spec = spec
        self.address = address
        self.index = index
        # Like `evochi-torch` itself: MODULE:CLASS may name a module of the directory the
        # driver was started in, when the node shares it (one machine, a shared home).
        if os.path.isdir(search_path) and search_path not in sys.path:
            sys.path.insert(0, search_path)
        logging.basicConfig(
            level=spec.log_level,
            format=f"%(asctime)s ray-worker{index} %(levelname)s %(name)s: %(message)s",
        )
        self._task: asyncio.Task[Any] | None = None

    def device(self) -> str:
        ray = _ray()
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs: the first visible one is its own.
        return "cuda:0" if ray.get_gpu_ids() else "cpu"

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node": _ray().get_runtime_context().get_node_id(),
            "device": self.device(),
            "restarted": _restarted(),
        }

    async def run(self) -> str:
        """Serves the training until the server says stop ("finished") or `stop()`."""
        import torch

        if self.spec.threads is not None:
            torch.set_num_threads(self.spec.threads)
        device = self.device()
        if _restarted():
            log.warning("worker %d restarted by Ray; joining the training again", self.index)
        cls = load_class(self.spec.target)
        channel: Any = self.address
        if self.spec.root_certificates is not None:
            from evochi.v1 import secure_channel

            channel = secure_channel(self.address, root_certificates=self.spec.root_certificates)
        worker = cls(
            channel,
            self.spec.cores,
            device=device,
            reconnect=self.spec.reconnect,
            join_token=self.spec.join_token,
            **self.spec.kwargs,
        )
        self._task = asyncio.current_task()
        try:
            await worker.start()
            return "finished"
        except asyncio.CancelledError:
            return "stopped"
        finally:
            # Leaving explicitly lets the server re-assign our members at once instead of
            # after the heartbeat timeout.
            await worker.close()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class RayWorkers:
    """Handles of running worker actors: `wait`/`supervise` for their end, `stop` to end them."""

    actors: list[Any]
    runs: list[Any]
    placement: RayPlacement
    grace: float = 5.0
    exits: list[WorkerExit] = dataclasses.field(default_factory=list)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def info(self) -> list[dict[str, Any]]:
        """Per actor: its pid, Ray node id, device, and whether Ray restarted it."""
        ray = _ray()
        return ray.get([a.info.remote() for a in self.actors])

    def _outcome(self, index: int, ref: Any) -> WorkerExit:
        ray = _ray()
        try:
            how = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            log.error("worker %d: actor died for good: %s", index, exc)
            return WorkerExit(index, "ray", 1)
        except ray.exceptions.RayTaskError as exc:
            log.error("worker %d failed: %s", index, exc)
            return WorkerExit(index, "ray", 1)
        log.info("worker %d %s", index, how)
        return WorkerExit(index, "ray", 0)

    def wait(self, timeout: float | None = None) -> list[WorkerExit]:
        """Blocks until every actor's run ended (or `timeout`); returns those that ended."""
        ray = _ray()
        # One caller at a time: a cancelled `supervise` may leave a wait running in its
        # thread while `stop` waits too, and each end must be recorded once.
        with self._lock:
            pending = [r for r in self.runs if r not in self._seen()]
            if not pending:
                return self.exits
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout)
            for ref in done:
                self.exits.append(self._outcome(self.runs.index(ref), ref))
            return self.exits

    def _seen(self) -> set[Any]:
        return {self.runs[e.index] for e in self.exits}

    async def supervise(self, interval: float = 0.5) -> list[WorkerExit]:
        """Waits (without blocking the event loop) until every actor's run has ended."""
        while len(self.exits) < len(self.runs):
            await asyncio.to_thread(self.wait, interval)
        return self.exits

    def stop(self) -> None:
        """Asks every actor to leave the training, then kills them for good (no restart)."""
        ray = _ray()
        live = [a for a, r in zip(self.actors, self.runs, strict=True) if r not in self._seen()]
        for actor in live:
            with contextlib.suppress(Exception):
                actor.stop.remote()
        self.wait(timeout=self.grace)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_workers(
    spec: WorkerSpec,
    server: str,
    placement: RayPlacement,
    *,
    address: str | None = None,
    grace: float = 5.0,
) -> RayWorkers:
    """Starts `placement.num_workers` worker actors that join the server at `server`.

    Connects to Ray first unless this process already is (`address` as in `connect`; None:
    Ray's default, RAY_ADDRESS or a private instance). `server` must be reachable from every
    node. Returns at once; the actors start as Ray places them.
    """
    ray = _ray()
    if not ray.is_initialized():
        connect("local" if address is None else address)
    threads = spec.threads
    if threads is None:
        threads = max(1, int(placement.cpus_per_worker))
    spec = dataclasses.replace(spec, threads=threads)
    actor_cls = ray.remote(_WorkerActor)
    actors, runs = [], []
    for index in range(placement.num_workers):
        actor = actor_cls.options(
            name=None,
            num_cpus=placement.cpus_per_worker,
            num_gpus=placement.gpus_per_worker,
            max_restarts=placement.max_restarts,
            # run() is resubmitted to the restarted actor: it joins again by itself.
            max_task_retries=-1,
            # Keeps `stop` callable while `run` is in progress.
            max_concurrency=4,
        ).remote(spec, server, index, os.getcwd())
        actors.append(actor)
        runs.append(actor.run.remote())
    log.info(
        "started %d Ray worker actors for %s (%g CPU, %g GPU each)",
        placement.num_workers,
        server,
        placement.cpus_per_worker,
        placement.gpus_per_worker,
    )
    return RayWorkers(actors, runs, placement, grace=grace)


def _advertised_address(host: str, port: int) -> str:
    """The server address to hand to actors, which may run on other nodes."""
    ray = _ray()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if host in _LOOPBACK:
        if len(alive) > 1:
            raise ValueError(
                f"the Ray cluster has {len(alive)} nodes but the server listens on {host}: "
                "pass --host 0.0.0.0 (or this node's address) so that every actor reaches it"
            )
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host in ("0.0.0.0", "::", ""):
        host = ray.util.get_node_ip_address()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def train_ray(
    spec: WorkerSpec,
    server_config: Any,
    placement: RayPlacement,
    *,
    on_epoch: Callable[[Any], Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    server_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """Like `evochi_torch.launch.train_processes`, with Ray actors instead of local processes: an
    embedded server on this process (the Ray driver) and `placement.num_workers` actors,
    until max epochs, `on_epoch` returning True, or every actor gone for good.

    Connect to Ray first (`connect`), else a private local instance is started.
    """
    from evochi.server import EmbeddedServer

    ray = _ray()
    if not ray.is_initialized():
        await asyncio.to_thread(connect, "local")
    epoch_hook, stop_early = early_stop_hook(on_epoch)

    started = time.perf_counter()
    async with EmbeddedServer(
        server_config, host=host, port=port, on_epoch=epoch_hook, **(server_kwargs or {})
    ) as server:
        address = _advertised_address(host, server.port)
        workers = await asyncio.to_thread(start_workers, spec, address, placement)
        try:
            finished = asyncio.ensure_future(server.wait_finished())
            early = asyncio.ensure_future(stop_early.wait())
            supervised = asyncio.ensure_future(workers.supervise())
            waiters = {finished, early, supervised}
            await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
            if supervised.done() and not finished.done():
                # Actors told to stop at max_epochs end while the server may still be
                # running its last on_epoch callbacks: that is a finish.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(finished), timeout=60)
            stopped_early = early.done() and not finished.done()
            all_gone = supervised.done() and not (finished.done() or early.done())
            for task in waiters:
                task.cancel()
            if all_gone:
                raise RuntimeError("every Ray worker actor ended before the training finished")
            if stopped_early:
                await server.stop_training()
            epochs = server.epoch
        finally:
            # In a thread: the server must keep serving while the actors leave.
            await asyncio.to_thread(workers.stop)
    crashed = [e for e in workers.exits if e.exitcode not in (0, None)]
    return TrainResult(epochs, time.perf_counter() - started, stopped_early, crashed)


# --------------------------------------------------------------------------- command line
def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """The `--ray` flags of `evochi-torch train` and `evochi-torch worker`."""
    group = parser.add_argument_group(
        "Ray (pip install 'evochi[ray]'): worker actors placed by a Ray cluster"
    )
    group.add_argument(
        "--ray",
        metavar="auto|local|ADDRESS",
        default=None,
        help="start the workers as Ray actors: 'auto' joins the Ray cluster of this "
        "machine (RAY_ADDRESS or `ray start`), 'local' starts a private one, ADDRESS is "
        "a cluster's HOST:6379 or ray://HOST:10001. Actors whose process dies are "
        "restarted by Ray and join again. Default: no Ray",
    )
    group.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="worker actors to start (with --ray; required there)",
    )
    group.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs Ray reserves per actor; fractions share a GPU (0.5: two per GPU). "
        "An actor with a GPU evaluates on it. Default: 0 (CPU)",
    )
    group.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs Ray reserves per actor (also its torch threads unless --threads). Default: 1",
    )


def placement_from_args(args: argparse.Namespace) -> RayPlacement:
    """Checks the `--ray` flags and connects to Ray.

    Raises ValueError (bad flags), RayMissingError or ConnectionError with a message for the user.
    """
    if args.num_workers is None:
        raise ValueError("--ray needs --num-workers N")
    if args.devices != "cpu":
        raise ValueError(
            "--devices does not apply with --ray (Ray assigns devices); use --gpus-per-worker"
        )
    if args.restart:
        log.info("--restart is implied with --ray: Ray restarts actors whose process died")
    placement = RayPlacement(
        args.num_workers, args.gpus_per_worker, args.cpus_per_worker, max_restarts=-1
    )
    connect(args.ray)
    if args.command == "train":
        _advertised_address(args.host, args.port)  # a multi-node cluster needs --host
    return placement


def run_cli(args: argparse.Namespace, spec: WorkerSpec) -> int:
    """`evochi-torch worker ... --ray ...` with `spec`'s workers, after the common flags were
    checked.

    (`evochi-torch train --ray` goes through the harness with `placement_from_args`, so that a
    Ray training leaves a run directory like any other.)
    """
    try:
        placement = placement_from_args(args)
    except (ValueError, RayMissingError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while Ray starts; afterwards signals are handled in _cli_main
        print("interrupted", file=sys.stderr)
        return 130
    return asyncio.run(_cli_main(args, spec, placement))


async def _until_signal(work: Any) -> int | None:
    """Runs `work` until it ends (None) or SIGINT/SIGTERM arrives (the exit code)."""
    loop = asyncio.get_running_loop()
    got: list[int] = []
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda s=signum: (got.append(s), stop.set()))
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if task.done():
        task.result()
        return None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 128 + got[0]


async def _cli_main(args: argparse.Namespace, spec: WorkerSpec, placement: RayPlacement) -> int:
    workers = await asyncio.to_thread(start_workers, spec, args.server, placement)
    try:
        code = await _until_signal(workers.supervise())
    finally:
        await asyncio.to_thread(workers.stop)
    if code is not None:
        print("interrupted; Ray workers stopped", file=sys.stderr)
        return code
    failed = [e for e in workers.exits if e.exitcode != 0]
    for e in failed:
        print(f"error: Ray worker {e.index} ended with an error (see above)", file=sys.stderr)
    return 1 if failed else 0
