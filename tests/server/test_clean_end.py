"""A clean end of every training: a straggler still evaluating when the last epoch completes
(its slices were re-issued and finished elsewhere) gets OK for its late result and its
`start()` returns normally; the standalone server keeps serving until then and exits 0."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, ServerConfig
from evochi.v1 import evochi_pb2 as pb
from tests.server.helpers import StubWorker, cli, free_port, run, wait_for_port

pytestmark = pytest.mark.timeout(120)

POP, EPOCHS = 8, 3


def reward_of(epoch: int, member: int) -> float:
    return float(epoch * 100 + member)


class CountingWorker(evochi.Worker[dict]):
    """Counts epochs; at the last epoch, when `straggle` is set, its evaluation lasts until
    `release` is set (after the training has finished without it)."""

    def __init__(self, address: str, cores: int, release: asyncio.Event | None = None) -> None:
        super().__init__(address, cores)
        self.release = release
        self.late_evaluation_returned = False
        self.stopped = asyncio.Event()

    async def initialize(self) -> dict:
        return {"epochs": 0}

    async def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        if self.release is not None and epoch == self.max_epochs:
            await self.release.wait()
            self.late_evaluation_returned = True
        return [
            evochi.Eval(s, [reward_of(epoch, m) for m in range(s.start, s.stop)]) for s in slices
        ]

    async def optimize(self, epoch: int, rewards: list[float]) -> dict:
        return {"epochs": self.state["epochs"] + 1}

    def on_stop(self, cancel: object) -> None:
        self.stopped.set()


def rejected(server: EmbeddedServer) -> float:
    total = 0.0
    for metric in server.metrics.registry.collect():
        if metric.name == "evochi_rejected_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_a_straggler_at_the_end_gets_ok_and_returns_normally(transport: str) -> None:
    async def scenario() -> None:
        config = ServerConfig(
            population_size=POP,
            max_epochs=EPOCHS,
            worker_timeout=20,
            straggler_min_seconds=0.2,
            transport=transport,
        )
        release = asyncio.Event()
        async with EmbeddedServer(config) as server:
            fast = CountingWorker(server.address, cores=POP // 2)
            slow = CountingWorker(server.address, cores=POP // 2, release=release)
            runs = [asyncio.ensure_future(w.start()) for w in (fast, slow)]
            await server.wait_finished(timeout=60)
            # The last epoch completed with the straggler's slices evaluated by `fast`.
            assert not slow.late_evaluation_returned
            assert server.service.core.outstanding_results(0.0) == 1
            assert not server.service.drained.is_set()
            release.set()
            await asyncio.gather(*runs)  # both return normally: no exception
            assert slow.late_evaluation_returned and slow.stopped.is_set()
            assert await server.wait_drained(timeout=30)
            assert rejected(server) == 0  # the late result got OK, not an error
            assert fast.state == {"epochs": EPOCHS} and server.epoch == EPOCHS
            for w in (fast, slow):
                await w.close()

    run(scenario(), timeout=100)


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_every_late_call_of_a_stopped_worker_is_accepted(transport: str) -> None:
    """Raw stubs see the exact status: OK for a late result of each kind and a heartbeat,
    and the stream carries stop and ends with OK."""

    async def scenario() -> None:
        config = ServerConfig(
            population_size=POP, max_epochs=1, worker_timeout=20, transport=transport
        )
        async with EmbeddedServer(config) as server:
            w = StubWorker(server.address, cores=POP)
            await w.subscribe()
            event = await w.next_event()
            assert event.type == pb.EVENT_TYPE_INITIALIZE
            await w.finish_initialization(event.initialize.task_id, b"state")
            event = await w.next_event()
            assert event.type == pb.EVENT_TYPE_EVALUATE
            ev = event.evaluate
            # The training is ended before the evaluation comes back (e.g. solved).
            await server.stop_training()
            assert server.service.core.outstanding_results(0.0) == 1
            kinds = [(await w.next_event()).type]
            assert kinds == [pb.EVENT_TYPE_STOP]
            assert await w.read() is grpc.aio.EOF
            rewards = [(s.start, s.end, [1.0] * (s.end - s.start)) for s in ev.slices]
            await w.finish_evaluation(ev.task_id, rewards)  # OK, discarded
            await w.finish_optimization("any-task")
            await w.finish_share_state("any-task", b"x")
            await w.heartbeat(1)
            assert await server.wait_drained(timeout=30)
            assert rejected(server) == 0
            await w.close()

    run(scenario(), timeout=100)


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_the_standalone_server_waits_for_the_straggler_then_exits_0(transport: str) -> None:
    port = free_port()
    server = cli(
        "--host=127.0.0.1",
        f"--port={port}",
        f"--population-size={POP}",
        f"--max-epochs={EPOCHS}",
        "--worker-timeout=20s",
        f"--transport={transport}",
    )
    try:

        async def scenario() -> None:
            await asyncio.to_thread(wait_for_port, port, server)
            address = f"127.0.0.1:{port}"
            release = asyncio.Event()
            fast = CountingWorker(address, cores=POP // 2)
            slow = CountingWorker(address, cores=POP // 2, release=release)
            fast_run = asyncio.ensure_future(fast.start())
            slow_run = asyncio.ensure_future(slow.start())
            await fast_run  # stop received: the training has finished without `slow`
            assert fast.state == {"epochs": EPOCHS}
            assert not slow.late_evaluation_returned
            # Longer than a shutdown's grace period (2 s): a server that exits at the
            # finish instead of waiting for owed results is gone by now.
            await asyncio.sleep(3.0)
            assert server.poll() is None  # still serving: a result is owed
            release.set()
            await slow_run  # OK for the late result, stop, a normal return
            assert slow.late_evaluation_returned and slow.stopped.is_set()
            for w in (fast, slow):
                await w.close()

        run(scenario(), timeout=90)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, out
    assert "training finished" in out and "rejected" not in out
