"""Load with churn: many workers leaving and joining while every reward is checked.

    python -m benchmarks.load [--workers 64] [--epochs 500] [--population 10000] [--churn-every 5]
    python -m benchmarks.load --scale     # 256 raw-stub workers, population 100,000, 30 epochs,
                                          # the server in its own process

Every reward is a known function of (epoch, member), so each worker checks the whole reward
vector it receives in optimize: a member missing (lost) or added twice (duplicated) is counted.
Every `--churn-every` epochs a quarter of the workers leave (some abruptly, mid-task) and as
many new ones join. Last line:
`load workers=64 epochs=500 population=10000 lost=0 duplicated=0 rss_growth_mb=...`

`--server-process` runs the standalone server (`python -m evochi.server`) in its own process
and adds its CPU time per epoch (measured after the first epochs) to the line; `--stub`
uses workers made of the raw generated stubs instead of `evochi.v1.Worker` (a client's own
cost then weighs little on the shared machine: the figure is the server's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
import numpy as np

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi.v1 import evochi_pb2 as pb
from evochi.v1.channel import insecure_channel
from evochi.v1.evochi_pb2_grpc import EvochiServiceStub

ROOT = Path(__file__).resolve().parents[1]


def expected_rewards(epoch: int, population: int) -> np.ndarray:
    # Integers below 2**24 are exact in float32, the wire type of rewards.
    return ((epoch * 100_003 + np.arange(population)) % 16_000_000).astype(np.float32)


@dataclass
class Ledger:
    """What the workers saw, across all of them."""

    population: int
    lost: int = 0
    duplicated: int = 0
    checked: set[int] = field(default_factory=set)

    def check(self, epoch: int, rewards: Any) -> None:
        if epoch in self.checked:
            return
        self.checked.add(epoch)
        got = np.asarray(rewards, dtype=np.float32)
        want = expected_rewards(epoch, self.population)
        if got.shape != want.shape:
            self.lost += abs(got.size - want.size)
            return
        wrong = got != want
        doubled = wrong & (got == 2 * want) & (want != 0)
        self.duplicated += int(doubled.sum())
        self.lost += int((wrong & ~doubled).sum())


class CheckingWorker(evochi.Worker[dict]):
    def __init__(self, address: str, cores: int, ledger: Ledger) -> None:
        super().__init__(address, cores)
        self.ledger = ledger

    # Coroutine hooks: with 64 workers in one process, thread hops would dominate.
    async def initialize(self) -> dict:
        return {"epochs": 0}

    async def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        want = expected_rewards(epoch, self.population_size)
        return [evochi.Eval(s, want[s.start : s.stop].tolist()) for s in slices]

    async def optimize(self, epoch: int, rewards: list[float]) -> dict:
        self.ledger.check(epoch, rewards)
        return {"epochs": self.state["epochs"] + 1}


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    port: int, population: int, epochs: int, transport: str = "http2", worker_timeout: float = 10.0
) -> subprocess.Popen[str]:
    """The standalone server in its own process, on 127.0.0.1:port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOCHI_")}
    return subprocess.Popen(
        [
            sys.executable, "-m", "evochi.server",
            "--host=127.0.0.1", f"--port={port}",
            f"--population-size={population}", f"--max-epochs={epochs}",
            f"--worker-timeout={worker_timeout:g}s", f"--transport={transport}",
            "--log-level=warning",
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


async def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.communicate()[0][-2000:]}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError("the server did not listen")


class ChurningPool:
    """Workers on one server that come and go: `churn` replaces a random quarter of them
    mid-task (close() cancels whatever a worker is doing), `finish` waits for the rest to be
    stopped by the server and for a standalone server to exit 0."""

    def __init__(
        self,
        address: str,
        cores: int,
        ledger: Ledger,
        progress: asyncio.Event,
        *,
        stub: bool,
        rng: random.Random,
    ) -> None:
        self.address, self.cores, self.ledger, self.progress = address, cores, ledger, progress
        self.kind = StubWorker if stub else ProgressWorker
        self.rng = rng
        self.tasks: dict[Any, asyncio.Task[None]] = {}

    def join(self, count: int = 1) -> None:
        for _ in range(count):
            worker = self.kind(self.address, self.cores, self.ledger, self.progress)
            self.tasks[worker] = asyncio.create_task(worker.start())

    async def churn(self) -> None:
        leaving = self.rng.sample(list(self.tasks), max(1, len(self.tasks) // 4))
        for worker in leaving:
            self.tasks.pop(worker).cancel()  # mid-task departures
            await worker.close()
        self.join(len(leaving))

    async def finish(self, server: subprocess.Popen[str] | None, timeout: float) -> None:
        results = await asyncio.wait_for(
            asyncio.gather(*self.tasks.values(), return_exceptions=True), timeout
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for worker in self.tasks:
            await worker.close()
        if errors:
            raise RuntimeError(f"{len(errors)} workers failed at the end: {errors[0]!r}")
        if server is None:
            return
        code = await asyncio.to_thread(server.wait, timeout)
        if code != 0:
            raise RuntimeError(f"the server exited with {code}: {server.communicate()[0][-2000:]}")


def own_channel(address: str) -> grpc.aio.Channel:
    """A channel with a connection of its own, as a worker process has: channels of one
    process to one target otherwise share one connection."""
    return insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


class StubWorker:
    """A worker made of the raw generated stubs: the protocol and nothing else."""

    def __init__(self, address: str, cores: int, ledger: Ledger, progress: asyncio.Event):
        self.channel = own_channel(address)
        self.stub = EvochiServiceStub(self.channel)
        self.cores = cores
        self.ledger = ledger
        self.progress = progress
        self.epochs = 0

    async def start(self) -> None:
        call = self.stub.Subscribe(pb.SubscribeRequest(cores=self.cores))
        heartbeats: asyncio.Task[None] | None = None
        auth: tuple[tuple[str, str], ...] = ()
        population = 0
        try:
            async for event in call:
                kind = event.type
                if kind == pb.EVENT_TYPE_HELLO:
                    auth = (("authorization", f"Bearer {event.hello.token}"),)
                    population = event.hello.population_size
                    heartbeats = asyncio.create_task(
                        self._beat(auth, max(1, event.hello.heartbeat_interval))
                    )
                elif kind == pb.EVENT_TYPE_EVALUATE:
                    ev = event.evaluate
                    want = expected_rewards(ev.epoch, population)
                    evaluations = [
                        pb.Evaluation(slice=s, rewards=want[s.start : s.end]) for s in ev.slices
                    ]
                    request = pb.FinishEvaluationRequest(
                        task_id=ev.task_id, evaluations=evaluations
                    )
                    await self._finish(self.stub.FinishEvaluation, request, auth)
                elif kind == pb.EVENT_TYPE_OPTIMIZE:
                    ev = event.optimize
                    self.ledger.check(ev.epoch, ev.rewards)
                    self.epochs = ev.epoch
                    self.progress.set()
                    request = pb.FinishOptimizationRequest(task_id=ev.task_id)
                    await self._finish(self.stub.FinishOptimization, request, auth)
                elif kind == pb.EVENT_TYPE_SHARE_STATE:
                    request = pb.FinishShareStateRequest(
                        task_id=event.share_state.task_id, state=b"epoch %d" % self.epochs
                    )
                    await self._finish(self.stub.FinishShareState, request, auth)
                elif kind == pb.EVENT_TYPE_INITIALIZE:
                    request = pb.FinishInitializationRequest(
                        task_id=event.initialize.task_id, state=b"epoch 0"
                    )
                    await self._finish(self.stub.FinishInitialization, request, auth)
                elif kind == pb.EVENT_TYPE_STOP:
                    return
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
            call.cancel()

    @staticmethod
    async def _finish(method: Any, request: Any, auth: Any) -> None:
        try:
            await method(request, metadata=auth)
        except grpc.aio.AioRpcError as exc:
            # A re-issued copy won, or the epoch moved on: the server no longer wants it.
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise

    async def _beat(self, auth: Any, interval: int) -> None:
        seq = 0
        while True:
            seq += 1
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.Heartbeat(pb.HeartbeatRequest(seq_id=seq), metadata=auth)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        await self.channel.close()


class ProgressWorker(CheckingWorker):
    """A checking worker on a connection of its own that wakes the load loop at each epoch."""

    def __init__(self, address: str, cores: int, ledger: Ledger, progress: asyncio.Event):
        super().__init__(address, cores, ledger)
        self._channel = own_channel(address)
        self._stub = EvochiServiceStub(self._channel)
        self.progress = progress

    async def optimize(self, epoch: int, rewards: list[float]) -> dict:
        state = await super().optimize(epoch, rewards)
        self.progress.set()
        return state


async def run_load(
    workers: int, epochs: int, population: int, churn_every: int, seed: int = 0
) -> dict[str, float]:
    """Runs the load scenario; returns lost, duplicated, rss growth, epochs/s."""
    ledger = Ledger(population)
    rng = random.Random(seed)
    cores = -(-population // workers)
    progress = asyncio.Event()
    rss: dict[int, float] = {}

    def on_epoch(summary: EpochSummary) -> None:
        progress.set()
        if summary.epoch in (min(50, epochs // 2), epochs):
            rss[summary.epoch] = rss_mb()

    config = ServerConfig(population_size=population, max_epochs=epochs, worker_timeout=10.0)
    started = time.perf_counter()
    async with EmbeddedServer(config, on_epoch=on_epoch) as server:
        pool: dict[CheckingWorker, asyncio.Task[None]] = {}

        def join() -> None:
            worker = CheckingWorker(server.address, cores, ledger)
            pool[worker] = asyncio.create_task(worker.start())

        for _ in range(workers):
            join()
        last_churn = 0
        while not server.finished:
            try:
                await asyncio.wait_for(progress.wait(), timeout=30)
            except TimeoutError:
                raise RuntimeError(f"epoch {server.epoch} stuck for 30 s") from None
            progress.clear()
            if churn_every and server.epoch - last_churn >= churn_every and not server.finished:
                last_churn = server.epoch
                for worker in rng.sample(list(pool), max(1, workers // 4)):
                    # close() cancels whatever the worker is doing: mid-task departures.
                    task = pool.pop(worker)
                    await worker.close()
                    task.cancel()
                    join()
        for worker, task in pool.items():
            await asyncio.wait_for(task, 30)
            await worker.close()
    seconds = time.perf_counter() - started
    missing = epochs - len(ledger.checked)
    first = rss.get(min(50, epochs // 2), 0.0)
    return {
        "lost": ledger.lost + missing * population,
        "duplicated": ledger.duplicated,
        "rss_growth_mb": rss.get(epochs, first) - first,
        "epochs_per_s": epochs / seconds,
    }


async def run_with_server_process(
    workers: int,
    epochs: int,
    population: int,
    churn_every: int,
    *,
    stub: bool,
    warmup: int = 3,
    transport: str = "http2",
    seed: int = 0,
) -> dict[str, float]:
    """The load scenario against `python -m evochi.server` in its own process; adds the
    server's CPU seconds per epoch, measured from epoch `warmup` to the last."""
    port = free_port()
    server = start_server(port, population, epochs, transport)
    ledger = Ledger(population)
    rng = random.Random(seed)
    cores = -(-population // workers)
    progress = asyncio.Event()
    warmup = min(warmup, max(1, epochs // 2))
    marks: dict[str, tuple[float, float, float]] = {}
    started = time.perf_counter()
    try:
        await wait_for_port(port, server)
        pool = ChurningPool(f"127.0.0.1:{port}", cores, ledger, progress, stub=stub, rng=rng)
        pool.join(workers)
        last_churn = seen = 0
        while seen < epochs:
            try:
                await asyncio.wait_for(progress.wait(), timeout=120)
            except TimeoutError:
                raise RuntimeError(f"no epoch for 120 s after epoch {seen}") from None
            progress.clear()
            seen = max(ledger.checked, default=0)
            if server.poll() is None and seen >= warmup and "warm" not in marks:
                marks["warm"] = (time.perf_counter(), cpu_seconds(server.pid), seen)
            if server.poll() is None and seen >= epochs - 1 and "end" not in marks:
                marks["end"] = (time.perf_counter(), cpu_seconds(server.pid), seen)
            if churn_every and seen - last_churn >= churn_every and seen < epochs - 1:
                last_churn = seen
                await pool.churn()
        await pool.finish(server, 120)
    finally:
        if server.poll() is None:
            server.terminate()
            await asyncio.to_thread(server.wait, 30)
    seconds = time.perf_counter() - started
    missing = epochs - len(ledger.checked)
    (t0, cpu0, e0), (t1, cpu1, e1) = marks["warm"], marks["end"]
    measured = max(1.0, e1 - e0)
    return {
        "lost": ledger.lost + missing * population,
        "duplicated": ledger.duplicated,
        "epochs_per_s": epochs / seconds,
        "steady_epochs_per_s": measured / max(1e-9, t1 - t0),
        "server_cpu_ms_per_epoch": 1000 * (cpu1 - cpu0) / measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=None, help="default 64 (256 with --scale)")
    parser.add_argument("--epochs", type=int, default=None, help="default 500 (30 with --scale)")
    parser.add_argument(
        "--population", type=int, default=None, help="default 10,000 (100,000 with --scale)"
    )
    parser.add_argument("--churn-every", type=int, default=5, help="epochs between churns")
    parser.add_argument(
        "--server-process", action="store_true", help="the server in its own process"
    )
    parser.add_argument("--stub", action="store_true", help="raw-stub workers")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="256 raw-stub workers x population 100,000, server in its own process",
    )
    parser.add_argument("--transport", choices=("http2", "grpcio"), default="http2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # SIGTERM as Ctrl-C: the run is cancelled and its server process stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.scale:
        args.server_process = args.stub = True
    workers = args.workers or (256 if args.scale else 64)
    epochs = args.epochs or (30 if args.scale else 500)
    population = args.population or (100_000 if args.scale else 10_000)
    head = f"load workers={workers} epochs={epochs} population={population}"
    if args.server_process:
        result = asyncio.run(
            run_with_server_process(
                workers,
                epochs,
                population,
                args.churn_every,
                stub=args.stub,
                transport=args.transport,
            )
        )
        print(
            f"{head} lost={result['lost']} duplicated={result['duplicated']} "
            f"epochs_per_s={result['epochs_per_s']:.2f} "
            f"steady_epochs_per_s={result['steady_epochs_per_s']:.2f} "
            f"server_cpu_ms_per_epoch={result['server_cpu_ms_per_epoch']:.1f} "
            f"workers={'stub' if args.stub else 'client'} transport={args.transport}"
        )
        return
    result = asyncio.run(run_load(workers, epochs, population, args.churn_every))
    print(
        f"{head} lost={result['lost']} duplicated={result['duplicated']} "
        f"rss_growth_mb={result['rss_growth_mb']:.1f} epochs_per_s={result['epochs_per_s']:.1f}"
    )


if __name__ == "__main__":
    main()
