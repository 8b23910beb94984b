"""evochi.v1.Worker against the real server on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, ServerConfig


def run(coro, timeout: float = 60.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


@dataclass
class State:
    seed: float
    updates: int = 0


class ReadmeWorker(evochi.Worker[State]):
    """The seed README's example, unchanged but for the counters the test reads."""

    def __init__(self, channel, cores: int, **kwargs) -> None:
        super().__init__(channel, cores, **kwargs)
        self.threads: set[int] = set()
        self.evaluated: list[tuple[int, int, int]] = []
        self.optimized: list[tuple[int, list[float]]] = []
        self.stopped = False

    def initialize(self) -> State:
        return State(seed=42)

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        self.threads.add(threading.get_ident())
        self.evaluated += [(epoch, s.start, s.stop) for s in slices]
        return [
            evochi.Eval(slice=s, rewards=[float(epoch * 1000 + i) for i in range(s.start, s.stop)])
            for s in slices
        ]

    def optimize(self, epoch: int, rewards: list[float]) -> State:
        self.optimized.append((epoch, rewards))
        return State(seed=self.state.seed, updates=self.state.updates + 1)

    def on_stop(self, cancel) -> None:
        self.stopped = True


def test_readme_worker_trains_to_max_epochs_with_hooks_off_the_loop() -> None:
    async def main() -> None:
        async with EmbeddedServer(ServerConfig(population_size=10, max_epochs=3)) as server:
            worker = ReadmeWorker(evochi.insecure_channel(server.address), cores=4)
            await worker.start()
            await worker.close()
            assert worker.stopped
            assert threading.get_ident() not in worker.threads  # hooks ran in a thread
            assert [e for e, _ in worker.optimized] == [1, 2, 3]
            for epoch, rewards in worker.optimized:
                assert rewards == [float(epoch * 1000 + i) for i in range(10)]
            assert worker.state.updates == 3
            assert worker.population_size == 10 and worker.max_epochs == 3
            # every member of every epoch evaluated exactly once, in tasks of <= 4 members
            for epoch in (1, 2, 3):
                covered = sorted(
                    m for e, a, b in worker.evaluated if e == epoch for m in range(a, b)
                )
                assert covered == list(range(10))
            assert all(b - a <= 4 for _, a, b in worker.evaluated)

    run(main())


class AsyncWorker(evochi.Worker[dict]):
    async def initialize(self) -> dict:
        return {"n": 0}

    async def evaluate(self, epoch, slices):
        await asyncio.sleep(0)
        return evochi.Eval.from_flat(slices, [1.0] * sum(s.stop - s.start for s in slices))

    async def optimize(self, epoch, rewards):
        return {"n": self.state["n"] + 1}


def test_async_hooks_are_awaited_and_late_joiner_gets_state() -> None:
    async def main() -> None:
        async with EmbeddedServer(ServerConfig(population_size=6, max_epochs=4)) as server:
            first = AsyncWorker(server.address, cores=3)
            task = asyncio.create_task(first.start())
            while server.epoch < 2:
                await asyncio.sleep(0.01)
            second = AsyncWorker(server.address, cores=3)
            await asyncio.gather(task, second.start())
            assert first.state == second.state == {"n": 4}
            await first.close()
            await second.close()

    run(main())


def test_rejected_subscription_raises() -> None:
    async def main() -> None:
        config = ServerConfig(population_size=4, max_epochs=50, max_workers=1)
        async with EmbeddedServer(config) as server:
            first = AsyncWorker(server.address, cores=2)
            task = asyncio.create_task(first.start())
            while not first.ready:
                await asyncio.sleep(0.01)
            second = AsyncWorker(server.address, cores=2)
            with pytest.raises(evochi.SubscriptionRejectedError) as info:
                await second.start()
            assert info.value.code.name == "RESOURCE_EXHAUSTED"
            await second.close()
            task.cancel()
            await first.close()

    run(main())


class BrokenWorker(AsyncWorker):
    async def evaluate(self, epoch, slices):
        return (
            [evochi.Eval(slice(0, 1), [1.0])]
            if slices[0].start != 0
            else [evochi.Eval(s, [float("nan")] * (s.stop - s.start)) for s in slices]
        )


def test_bad_results_raise_locally_and_the_training_goes_on() -> None:
    async def main() -> None:
        config = ServerConfig(population_size=8, max_epochs=2, worker_timeout=5.0)
        async with EmbeddedServer(config) as server:
            broken = BrokenWorker(server.address, cores=4)
            with pytest.raises(ValueError, match="non-finite rewards|not assigned"):
                await broken.start()
            await broken.close()
            good = AsyncWorker(server.address, cores=4)
            await good.start()  # picks up the broken worker's slices and finishes
            assert good.state == {"n": 2}
            await good.close()

    run(main())


def test_server_going_away_is_a_clear_error_not_a_hang() -> None:
    async def main() -> None:
        server = EmbeddedServer(ServerConfig(population_size=4, max_epochs=0))
        await server.start()
        worker = AsyncWorker(server.address, cores=2)
        task = asyncio.create_task(worker.start())
        while server.epoch < 3:
            await asyncio.sleep(0.01)
        await server.stop(grace=0)
        # Either the stream broke (EvochiError) or the server ended it cleanly and start()
        # returned; what must not happen is a hang.
        with contextlib.suppress(evochi.EvochiError):
            await asyncio.wait_for(task, 10)
        await worker.close()

    run(main())


def test_reconnect_rejoins_as_a_new_worker() -> None:
    async def main() -> None:
        config = ServerConfig(population_size=4, max_epochs=0)
        server = EmbeddedServer(config)
        await server.start()
        port = server.port
        policy = evochi.ReconnectPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=50)
        worker = AsyncWorker(f"127.0.0.1:{port}", cores=2, reconnect=policy, connect_timeout=5)
        task = asyncio.create_task(worker.start())
        while server.epoch < 2:
            await asyncio.sleep(0.01)
        first_id = worker.id
        await server.stop(grace=0)
        second = EmbeddedServer(ServerConfig(population_size=4, max_epochs=2), port=port)
        await second.start()
        await asyncio.wait_for(task, 20)
        assert worker.id != first_id
        await worker.close()
        await second.stop()

    run(main(), timeout=60)


def test_reconnecting_waits_at_most_one_heartbeat_interval_between_attempts() -> None:
    """A long back-off policy is cut to the server's heartbeat interval (1 s here): a server
    back after a restart (or saying that its training has finished) is found quickly."""

    async def main() -> None:
        config = ServerConfig(population_size=4, max_epochs=0, worker_timeout=2.0)
        server = EmbeddedServer(config)
        await server.start()
        port = server.port
        policy = evochi.ReconnectPolicy(initial_delay=30.0, max_delay=30.0)
        worker = AsyncWorker(f"127.0.0.1:{port}", cores=2, reconnect=policy)
        task = asyncio.create_task(worker.start())
        while server.epoch < 2:
            await asyncio.sleep(0.01)
        first_id = worker.id
        await server.stop(grace=0)
        second = EmbeddedServer(ServerConfig(population_size=4, max_epochs=2), port=port)
        await second.start()
        started = time.monotonic()
        await asyncio.wait_for(task, 20)  # it rejoined and the 2 epochs ran
        assert worker.id != first_id
        assert time.monotonic() - started < 10
        await worker.close()
        await second.stop()

    run(main(), timeout=60)


def test_give_up_after_is_checked() -> None:
    for bad in (0, -1.0, True, "soon", float("nan")):
        with pytest.raises(ValueError, match="give_up_after"):
            AsyncWorker("127.0.0.1:1", cores=1, reconnect=True, give_up_after=bad)
    for good in (0.5, 60, "auto", None):
        AsyncWorker("127.0.0.1:1", cores=1, reconnect=True, give_up_after=good)


class SlowFirstEvaluation(ReadmeWorker):
    """Its first evaluation outlasts the server's task deadline; it counts overlapping hooks."""

    def __init__(self, channel, cores: int, **kwargs) -> None:
        super().__init__(channel, cores, **kwargs)
        self.lock = threading.Lock()
        self.running = self.most_at_once = 0
        self.hooks: list[str] = []
        self.ids: set[str] = set()

    def _enter(self, name: str) -> None:
        self.ids.add(self.id)
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.hooks.append(name)

    def _leave(self) -> None:
        with self.lock:
            self.running -= 1

    def evaluate(self, epoch, slices):
        self._enter("evaluate")
        try:
            if self.hooks.count("evaluate") == 1:
                time.sleep(6.0)  # blocks its thread: the server drops the worker meanwhile
            return super().evaluate(epoch, slices)
        finally:
            self._leave()

    def on_state_change(self, state) -> None:
        self._enter("on_state_change")
        self._leave()


async def train_reconnecting(
    cls: type, config: ServerConfig, cores: int, caplog: pytest.LogCaptureFixture
) -> tuple[Any, list[str], int]:
    """Trains a reconnecting `cls` worker on an embedded server. Returns the closed worker,
    the server's 'worker left' lines other than the final ones, and the server's epoch."""
    async with EmbeddedServer(config) as server:
        policy = evochi.ReconnectPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=50)
        worker = cls(server.address, cores=cores, reconnect=policy)
        with caplog.at_level(logging.INFO, logger="evochi"):
            await worker.start()
        await worker.close()
        left = [r.getMessage() for r in caplog.records if "worker left" in r.getMessage()]
        return worker, [m for m in left if "training finished" not in m], server.epoch


def test_a_dropped_workers_hook_thread_never_runs_beside_the_rejoined_sessions_hooks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server drops the worker when its first evaluation misses the deadline (2 s); the
    # worker notices and rejoins while that evaluation's thread still runs. No hook may run
    # beside that thread (on the same environments it crashed MuJoCo), and the new session
    # waits for it before it joins, or the tasks it gets meanwhile miss their deadlines.
    config = ServerConfig(population_size=4, max_epochs=3, worker_timeout=2.0)
    worker, left, epoch = run(
        train_reconnecting(SlowFirstEvaluation, config, 2, caplog), timeout=60
    )
    assert len(left) == 1 and "evaluate task deadline missed" in left[0], left
    assert "outlasted its deadline (worker_timeout=2s), the next ones get 4s" in left[0]
    assert len(worker.ids) == 2, worker.ids  # dropped once, rejoined once
    assert epoch == 3 and worker.state.updates == 3
    assert worker.hooks.count("evaluate") >= 4  # the lost one and one per epoch
    assert worker.most_at_once == 1, worker.hooks


class SlowEveryEvaluation(SlowFirstEvaluation):
    def evaluate(self, epoch, slices):
        self._enter("evaluate")
        try:
            time.sleep(3.0)  # every task outlasts the 2 s worker_timeout
            return ReadmeWorker.evaluate(self, epoch, slices)
        finally:
            self._leave()


def test_a_lone_worker_slower_than_the_deadline_still_trains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Dropped at its first missed deadline, the worker rejoins and gets the same members:
    # with the same deadline it would miss it again forever. The stretched deadline (4 s)
    # lets it through, and it keeps it while its tasks stay slow.
    config = ServerConfig(population_size=4, max_epochs=2, worker_timeout=2.0)
    worker, left, epoch = run(
        train_reconnecting(SlowEveryEvaluation, config, 4, caplog), timeout=90
    )
    assert len(left) == 1 and "the next ones get 4s" in left[0], left
    assert epoch == 2 and worker.state.updates == 2


def test_stop_training_early_sends_stop_and_keeps_the_last_epoch() -> None:
    async def main() -> None:
        async with EmbeddedServer(ServerConfig(population_size=6, max_epochs=0)) as server:
            workers = [ReadmeWorker(server.address, cores=3) for _ in range(2)]
            tasks = [asyncio.create_task(w.start()) for w in workers]
            while server.epoch < 4:
                await asyncio.sleep(0.005)
            await server.stop_training()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)  # start() returned: stop
            assert all(w.stopped for w in workers)
            completed = server.epoch
            assert completed >= 3
            state = workers[0].codec.decode(server.state)
            assert state.updates == completed  # the state after the last completed epoch
            late = ReadmeWorker(server.address, cores=3)
            await asyncio.wait_for(late.start(), 10)  # told at once that it is over
            for w in [*workers, late]:
                await w.close()

    run(main())
