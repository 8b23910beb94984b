"""Start and supervise worker processes, locally or against a remote server.

One process per worker: each owns its device, its torch threads and its event loop, so a
crash (or a CUDA error) takes down one worker, never the server or its peers. Processes
are started with the "spawn" method because forking a process that already runs torch
threads or a CUDA context is unsafe.

`train_workers` runs a training with either kind of workers behind one `Supervisor` interface:
these local processes (`WorkerProcesses`) or Ray actors (`evochi_torch.ray.RayWorkers`); the
signal policy is `run_until_signalled` for both.

Worker processes never outlive their launcher: SIGTERM, SIGHUP (and Ctrl-C) make the
launcher stop them, and each one also watches its parent (Linux parent-death signal, and
the parent's sentinel pipe everywhere), so even a launcher killed by SIGKILL takes its
workers with it. A worker told to stop leaves the training cleanly (the server re-assigns
its work at once) and exits without waiting for an evaluation still running in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import importlib
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from evochi.v1.errors import EvochiError, ServerGoneError

log = logging.getLogger("evochi_torch.launch")

#: Exit status of a worker process that gave up on a server gone for too long (not restarted).
SERVER_GONE_EXIT = 3

T = TypeVar("T")
# Signals that end a launcher as Ctrl-C does (systemd, SLURM, Kubernetes and `kill` send
# SIGTERM; a closed terminal or SSH session, SIGHUP).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
# A worker told to stop gets this long to leave the training cleanly, then exits anyway.
LEAVE_SECONDS = 1.5
_PR_SET_PDEATHSIG = 1


class Terminated(EvochiError):
    """The launcher received SIGTERM or SIGHUP (its workers are stopped).

    An exception, not a ``BaseException`` like ``KeyboardInterrupt``: it is raised once the
    workers have stopped, for the caller to turn into an exit status, so it is an ordinary
    evochi error that a handler catching ``EvochiError`` also sees."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handled(signals: Sequence[int]) -> list[int]:
    """The signals not ignored since this process started: a launcher run under `nohup`
    (or in a shell's background, which ignores SIGINT) keeps ignoring what it was told to."""
    return [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]


def run_until_signalled(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)``, where SIGTERM and SIGHUP cancel ``coro`` as Ctrl-C does (so
    that WorkerProcesses and servers in it stop cleanly), then raise :class:`Terminated`."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        received: list[int] = []

        def on_signal(signum: int) -> None:
            if not received:
                received.append(signum)
                task.cancel()

        for signum in _handled(STOP_SIGNALS):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await coro
        except asyncio.CancelledError:
            if received:
                raise Terminated(received[0]) from None
            raise

    return asyncio.run(main())


def load_class(path: str) -> type:
    """Imports "package.module:Class" (the form used on the command line)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"expected MODULE:CLASS (e.g. examples.cartpole:CartPoleWorker), got {path!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise ValueError(f"{path!r} is not a class")
    return obj


def class_path(cls: type) -> str:
    """The "module:Class" path that `load_class` resolves back to `cls`."""
    module = cls.__module__
    if module == "__main__":
        # A class defined in a script run as __main__ is re-imported by spawned children
        # under its module name, which only works when the script was run with -m.
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None or not spec.name:
            raise ValueError(
                f"{cls.__qualname__} is defined in a script; run it with `python -m module` "
                "or move the worker class into an importable module"
            )
        module = spec.name
    return f"{module}:{cls.__qualname__}"


def parse_devices(spec: str) -> list[str]:
    """ "cpu", "cuda:0,cuda:1", "all" (every visible GPU, or the CPU when there is none)."""
    spec = spec.strip()
    if spec == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError("--devices is empty")
    import torch

    for d in devices:
        try:
            torch.device(d)
        except RuntimeError as exc:
            raise ValueError(f"not a device: {d!r} ({exc})") from None
    return devices


def place(devices: str, workers: int | None = None) -> list[str]:
    """One device per local worker: `workers` of them (default: one per device) spread
    round-robin over the devices that `parse_devices` reads from `devices`."""
    parsed = parse_devices(devices)
    return spread(parsed, workers or len(parsed))


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a child process needs to build and run one worker (picklable).

    `target` is "module:Class"; the class is constructed as
    ``cls(address, cores, device=..., reconnect=..., join_token=..., **kwargs)``.
    ``threads=None``: the supervisor picks (`default_threads` for local processes, the
    actor's CPUs for Ray).
    """

    target: str
    cores: int = 256
    kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    reconnect: bool = True
    join_token: str | None = None
    root_certificates: bytes | None = None
    log_level: str = "WARNING"


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: the kernel sends SIGTERM when the launcher dies, even by SIGKILL. (The
    parent's sentinel pipe, watched in _run_child, covers other systems and this one too.)"""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)  # the launcher died before the parent-death signal was armed


def _child_main(
    spec: WorkerSpec, address: str, device: str, index: int, parent_pid: int | None = None
) -> None:
    # Ctrl-C reaches the whole process group; the supervisor alone handles it and stops
    # the children with SIGTERM, so they leave cleanly instead of dying mid-traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s worker{index} %(levelname)s %(name)s: %(message)s",
    )
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    cls = load_class(spec.target)
    code = 0
    try:
        asyncio.new_event_loop().run_until_complete(_run_child(cls, spec, address, device))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except ServerGoneError:
        # The worker logged why at ERROR; a traceback would only bury that line.
        code = SERVER_GONE_EXIT
    except BaseException:
        traceback.print_exc()
        code = 1
    # An evaluation stopped mid-way still runs in its thread; its result is not wanted, and
    # a normal exit (asyncio.run, interpreter shutdown) would wait for it to finish.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _watch_parent(on_death: Callable[[], None]) -> None:
    """Calls ``on_death`` (from a thread) once the launcher is gone, however it ended."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def wait() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        on_death()

    threading.Thread(target=wait, name="evochi-parent-watch", daemon=True).start()


async def _run_child(cls: type, spec: WorkerSpec, address: str, device: str) -> None:
    channel: Any = address
    if spec.root_certificates is not None:
        from evochi.v1 import secure_channel

        channel = secure_channel(address, root_certificates=spec.root_certificates)
    worker = cls(
        channel,
        spec.cores,
        device=device,
        reconnect=spec.reconnect,
        join_token=spec.join_token,
        **spec.kwargs,
    )
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    leaving = threading.Event()

    def leave() -> None:
        # Leave the training cleanly (the server re-assigns our slices at once instead of
        # waiting for the heartbeat timeout), but never take longer than LEAVE_SECONDS.
        if leaving.is_set():
            return
        leaving.set()
        threading.Timer(LEAVE_SECONDS, os._exit, (0,)).start()
        loop.call_soon_threadsafe(task.cancel)

    def on_signal(signum: int, frame: object) -> None:
        # A plain handler (not loop.add_signal_handler): it runs even while a coroutine
        # hook keeps the event loop busy.
        leave()

    # SIGTERM: from the supervisor, or the kernel when the launcher died; SIGHUP: the
    # terminal went away.
    for signum in _handled(STOP_SIGNALS):
        signal.signal(signum, on_signal)
    _watch_parent(leave)
    try:
        await worker.start()
    except asyncio.CancelledError:
        pass
    finally:
        await worker.close()


@dataclass
class WorkerExit:
    index: int
    device: str
    exitcode: int | None

    def describe(self) -> str:
        code = self.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"worker {self.index} on {self.device} {how}"


class Supervisor(Protocol):
    """A started group of workers, local processes or Ray actors: what `train_workers` and
    `serve_workers` need of them."""

    exits: list[WorkerExit]
    grace: float

    async def supervise(self) -> list[WorkerExit]:
        """Waits until every worker has ended for good; returns how each ended."""
        ...

    def stop(self) -> None:
        """Ends every worker (each leaves the training first), blocking up to ~`grace` s."""
        ...


class WorkerProcesses:
    """A supervised group of worker processes, one per entry of `devices`.

    Use as a context manager: leaving it stops every process (SIGTERM, then SIGKILL
    after `grace` seconds).
    """

    def __init__(
        self,
        spec: WorkerSpec,
        address: str,
        devices: Sequence[str],
        *,
        restart: bool = False,
        grace: float = 5.0,
    ) -> None:
        if spec.threads is None:
            spec = dataclasses.replace(spec, threads=default_threads(len(devices)))
        self.spec = spec
        self.address = address
        self.devices = list(devices)
        self.restart = restart
        self.grace = grace
        self.exits: list[WorkerExit] = []
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []

    def _spawn(self, index: int) -> Any:
        proc = self._ctx.Process(
            target=_child_main,
            args=(self.spec, self.address, self.devices[index], index, os.getpid()),
            name=f"evochi-worker-{index}",
        )
        proc.start()
        return proc

    def start(self) -> WorkerProcesses:
        self._procs = [self._spawn(i) for i in range(len(self.devices))]
        return self

    @property
    def alive(self) -> int:
        return sum(p.is_alive() for p in self._procs)

    def poll(self) -> list[WorkerExit]:
        """Reports processes that ended since the last call; restarts crashed ones if asked."""
        ended = []
        for i, proc in enumerate(self._procs):
            if proc is None or proc.is_alive() or proc.exitcode is None:
                continue
            ended.append(WorkerExit(i, self.devices[i], proc.exitcode))
            # A worker that gave up on a vanished server would only wait for it again.
            again = self.restart and proc.exitcode not in (0, SERVER_GONE_EXIT)
            self._procs[i] = self._spawn(i) if again else None
        self.exits += ended
        return ended

    async def supervise(self, interval: float = 0.2) -> list[WorkerExit]:
        """Waits until every process has ended, logging each crash as it happens."""
        while True:
            for ended in self.poll():
                if ended.exitcode == 0:
                    log.info("%s", ended.describe())
                else:
                    again = self.restart and ended.exitcode != SERVER_GONE_EXIT
                    log.error("%s%s", ended.describe(), "; restarting it" if again else "")
            if not any(p is not None for p in self._procs):
                return self.exits
            await asyncio.sleep(interval)

    def stop(self) -> None:
        live = [p for p in self._procs if p is not None and p.is_alive()]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + self.grace
        for proc in live:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker process %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()

    def __enter__(self) -> WorkerProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spread(devices: Sequence[str], workers: int) -> list[str]:
    """`workers` device assignments, round-robin over `devices`."""
    if workers <= 0:
        raise ValueError(f"--workers must be positive, got {workers}")
    return [devices[i % len(devices)] for i in range(workers)]


def default_threads(local_workers: int) -> int:
    """Torch threads per worker so that local workers do not oversubscribe the CPU."""
    return max(1, (os.cpu_count() or 1) // max(1, local_workers))


@dataclass
class TrainResult:
    epochs: int
    seconds: float
    stopped_early: bool
    crashed: list[WorkerExit]


def early_stop_hook(
    on_epoch: Callable[[Any], Any] | None,
) -> tuple[Callable[[Any], Awaitable[None]], asyncio.Event]:
    """The embedded server's `on_epoch` around a user callback, and the event set once the
    callback returns True (stop the training early). Sync callbacks run in a thread: one that
    evaluates or saves must not stall the server."""
    stop_early = asyncio.Event()

    async def epoch_hook(summary: Any) -> None:
        if on_epoch is None:
            return
        if inspect.iscoroutinefunction(on_epoch):
            result = await on_epoch(summary)
        else:
            result = await asyncio.to_thread(on_epoch, summary)
        if result is True:
            stop_early.set()

    return epoch_hook, stop_early


StartWorkers = Callable[[WorkerSpec, Any], Awaitable[Supervisor]]
"""Starts the workers of a training, given their spec and the running `EmbeddedServer`."""


async def start_processes(
    spec: WorkerSpec, server: Any, devices: Sequence[str], *, restart: bool = False
) -> WorkerProcesses:
    """`StartWorkers` for local processes: one per entry of `devices` (see `functools.partial`)."""
    return WorkerProcesses(spec, server.address, devices, restart=restart).start()


async def serve_workers(workers: Supervisor) -> list[WorkerExit]:
    """Supervises `workers` (serving a remote server) until they all end, or until cancelled
    (Ctrl-C, or a signal under `run_until_signalled`); stops them either way."""
    try:
        return await workers.supervise()
    finally:
        # In a thread: a blocking stop must not hold up the loop (and a server on it).
        await asyncio.to_thread(workers.stop)


async def train_workers(
    spec: WorkerSpec,
    server_config: Any,
    start: StartWorkers,
    *,
    on_epoch: Callable[[Any], Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    server_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """Runs an embedded server and the workers that `start(spec, server)` starts until the
    training ends: max epochs reached, `on_epoch` returned True (stop early), or every
    worker ended for good (a RuntimeError).

    `on_epoch(summary)` may be sync or async; it runs in this process with the server's
    `EpochSummary` (epoch, rewards, the new state's bytes...). `server_kwargs` go to
    `EmbeddedServer` (e.g. a resumed training's start state).
    """
    from evochi.server import EmbeddedServer

    epoch_hook, stop_early = early_stop_hook(on_epoch)
    started = time.perf_counter()
    async with EmbeddedServer(
        server_config, host=host, port=port, on_epoch=epoch_hook, **(server_kwargs or {})
    ) as server:
        workers = await start(spec, server)
        try:
            epochs, stopped_early = await _race(server, workers, stop_early)
        finally:
            # In a thread: the server must keep serving while the workers leave.
            await asyncio.to_thread(workers.stop)
    crashed = [e for e in workers.exits if e.exitcode not in (0, None)]
    return TrainResult(epochs, time.perf_counter() - started, stopped_early, crashed)


async def _race(server: Any, workers: Supervisor, stop_early: asyncio.Event) -> tuple[int, bool]:
    """Waits for the first of: the training finished, an early stop, every worker gone.
    Returns (the last completed epoch, whether it stopped early)."""
    finished = asyncio.ensure_future(server.wait_finished())
    early = asyncio.ensure_future(stop_early.wait())
    supervised = asyncio.ensure_future(workers.supervise())
    waiters = {finished, early, supervised}
    try:
        await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
        clean = all(e.exitcode == 0 for e in workers.exits)
        if supervised.done() and not finished.done() and clean:
            # Workers told to stop at max_epochs end while the server may still be running
            # its last on_epoch callbacks: that is a finish, not a crash.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(finished), timeout=60)
        stopped_early = early.done() and not finished.done()
        all_gone = supervised.done() and not (finished.done() or early.done())
    finally:
        for task in waiters:
            task.cancel()
    if all_gone:
        raise RuntimeError(
            "every worker ended before the training finished: "
            + "; ".join(e.describe() for e in workers.exits)
        )
    if stopped_early:
        # Workers get stop and leave by themselves; `stop` only ends stragglers.
        await server.stop_training()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(workers.supervise(), timeout=workers.grace)
    return server.epoch, stopped_early  # after an early stop: the last completed epoch


async def train_processes(
    spec: WorkerSpec,
    server_config: Any,
    devices: Sequence[str],
    *,
    on_epoch: Callable[[Any], Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    restart: bool = False,
    server_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """`train_workers` with one local worker process per entry of `devices`."""
    return await train_workers(
        spec,
        server_config,
        functools.partial(start_processes, devices=devices, restart=restart),
        on_epoch=on_epoch,
        host=host,
        port=port,
        server_kwargs=server_kwargs,
    )


def __getattr__(name: str) -> Any:
    # `train` is the harness's (evochi_torch.train, sync, a run directory); this layer's
    # process-level loop is `train_processes`, and the old name still reaches it.
    if name == "train":
        warnings.warn(
            "evochi_torch.launch.train is deprecated; use evochi_torch.launch.train_processes",
            DeprecationWarning,
            stacklevel=2,
        )
        return train_processes
    raise AttributeError(f"module 'evochi_torch.launch' has no attribute {name!r}")
