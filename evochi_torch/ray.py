"""Worker actors placed by Ray: `evochi-torch worker|train ... --ray auto|local|ADDRESS`.

`RayWorkers` is a `evochi_torch.launch.Supervisor` like the local `WorkerProcesses`: the
same `train_workers` race and the same signal policy serve both.

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

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evochi.errors import EvochiError
from evochi_torch.launch import TrainResult, WorkerExit, WorkerSpec, load_class, train_workers

__all__ = [
    "RayMissingError",
    "RayPlacement",
    "RayWorkers",
    "check_reachable",
    "connect",
    "start_for_server",
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
    """worker actors to start"""
    gpus_per_worker: float = 0.0
    """GPUs Ray reserves per actor; fractions share a GPU (0.5: two per GPU); an actor with a
    GPU evaluates on it"""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per actor"""
    max_restarts: int = -1
    """how often Ray restarts each actor after its process died; -1: always"""

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


async def start_for_server(
    spec: WorkerSpec, server: Any, placement: RayPlacement, host: str = "127.0.0.1"
) -> RayWorkers:
    """`evochi_torch.launch.StartWorkers` for Ray actors that join the embedded `server`
    listening on `host` (connects to Ray first unless this process already is: a private
    local instance)."""
    ray = _ray()
    if not ray.is_initialized():
        await asyncio.to_thread(connect, "local")
    address = _advertised_address(host, server.port)
    return await asyncio.to_thread(start_workers, spec, address, placement)


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
    """`evochi_torch.launch.train_workers` with Ray actors instead of local processes: an
    embedded server on this process (the Ray driver) and `placement.num_workers` actors,
    until max epochs, `on_epoch` returning True, or every actor gone for good.

    Connect to Ray first (`connect`), else a private local instance is started.
    """
    return await train_workers(
        spec,
        server_config,
        functools.partial(start_for_server, placement=placement, host=host),
        on_epoch=on_epoch,
        host=host,
        port=port,
        server_kwargs=server_kwargs,
    )


def check_reachable(host: str) -> None:
    """Raises ValueError when actors on other nodes could not reach a server bound to `host`
    (a loopback address on a multi-node cluster). Needs a Ray connection."""
    _advertised_address(host, 0)
