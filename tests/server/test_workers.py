"""Scenarios with real ``evochi.v1.Worker`` subclasses against the embedded server.

The state is the history of reward sums; a member's reward depends on the state it was
evaluated with, so a worker evaluating or optimizing with a stale state changes the result.
"""

from __future__ import annotations

import asyncio

import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from tests.server.helpers import run
from tests.server.workers import expected, make

pytestmark = pytest.mark.timeout(60)


def test_one_worker_trains_to_max_epochs() -> None:
    summaries: list[EpochSummary] = []

    async def scenario() -> None:
        config = ServerConfig(population_size=10, max_epochs=4, worker_timeout=4)
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            w = make(server, cores=3)
            await w.start()
            assert w.stopped and w.state == expected(10, 4)
            assert w.optimized == [1, 2, 3, 4]
            await server.wait_finished(timeout=5)
            codec = w.codec
            assert codec.decode(server.state) == expected(10, 4)
            await w.close()

    run(scenario())
    assert [s.epoch for s in summaries] == [1, 2, 3, 4]


def test_four_workers_agree_and_match_the_single_worker_result() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=100, max_epochs=5, worker_timeout=4)
        async with EmbeddedServer(config) as server:
            workers = [make(server, cores=25) for _ in range(4)]
            await asyncio.gather(*(w.start() for w in workers))
            for w in workers:
                assert w.state == expected(100, 5)
                await w.close()
            # Members were spread over the workers, each evaluated once per epoch.
            for epoch in range(1, 6):
                members = sorted(
                    m for w in workers for e, a, b in w.evaluated if e == epoch for m in range(a, b)
                )
                assert members == list(range(100))

    run(scenario())


def test_worker_closed_mid_evaluation_changes_nothing() -> None:
    async def scenario() -> None:
        config = ServerConfig(
            population_size=40, max_epochs=3, worker_timeout=4, straggler_reissue=False
        )
        async with EmbeddedServer(config) as server:
            steady = make(server, cores=10)
            doomed = make(server, cores=10)
            doomed.evaluate_delay = 30.0  # would never finish in time
            steady_run = asyncio.ensure_future(steady.start())
            doomed_run = asyncio.ensure_future(doomed.start())
            await asyncio.wait_for(doomed.in_evaluate.wait(), 10)
            await doomed.close()  # leaves mid-evaluation: its slices go to `steady`
            doomed.gate.set()  # let its thread end (its late result has nowhere to go)
            await steady_run
            assert steady.state == expected(40, 3)
            doomed_run.cancel()
            await steady.close()

    run(scenario())


def test_worker_joining_during_optimize_ends_with_the_same_state() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=20, max_epochs=3, worker_timeout=4)
        async with EmbeddedServer(config) as server:
            first = make(server, cores=20)
            first.optimize_delay = 0.3
            first_run = asyncio.ensure_future(first.start())
            await asyncio.wait_for(first.in_optimize.wait(), 10)
            assert server.service.core.stage.value == "optimize"
            late = make(server, cores=5)
            await asyncio.gather(first_run, late.start())
            assert late.optimized[0] == 1  # it caught up with epoch 1 first
            assert first.state == late.state == expected(20, 3)
            await first.close()
            await late.close()

    run(scenario())


def test_new_worker_continues_after_the_last_one_left() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=12, max_epochs=4, worker_timeout=4)
        summaries: list[EpochSummary] = []
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            a = make(server, cores=12)
            a.optimize_delay = 0.2  # slow enough to leave it in the middle of epoch 3
            a_run = asyncio.ensure_future(a.start())
            while len(summaries) < 2:
                await asyncio.sleep(0.01)
            await a.close()
            a.gate.set()
            a_run.cancel()
            for _ in range(200):
                if not server.service.core.workers:
                    break
                await asyncio.sleep(0.01)
            epoch = server.epoch
            assert epoch == 3 and not server.finished
            b = make(server, cores=5)
            await b.start()
            assert b.optimized[0] == epoch and b.state == expected(12, 4)
            await b.close()

    run(scenario())


def test_join_token_and_reconnect_after_removal() -> None:
    async def scenario() -> None:
        config = ServerConfig(
            population_size=8, max_epochs=3, worker_timeout=2, join_token="let-me-in"
        )
        async with EmbeddedServer(config) as server:
            stranger = make(server, cores=8)
            with pytest.raises(evochi.SubscriptionRejectedError):
                await stranger.start()
            await stranger.close()
            w = make(server, cores=8, join_token="let-me-in", reconnect=True)
            await w.start()
            assert w.state == expected(8, 3)
            await w.close()

    run(scenario())
