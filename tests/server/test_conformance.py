"""Conformance: the real server, on both transports, driven with the raw generated stubs,
scenario by scenario, as a foreign client (the Go-era Python client, another language)
would."""

from __future__ import annotations

import asyncio
import math

import grpc
import grpc.aio
import numpy as np
import pytest

from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi.v1 import evochi_pb2 as pb
from tests.server.helpers import StubWorker, expect_error, play, reward_of, run

pytestmark = pytest.mark.timeout(60)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


class TRANSPORT_OF_TEST:  # a namespace the fixture patches
    name = "http2"


@pytest.fixture(autouse=True, params=["http2", "grpcio"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every scenario runs against both transports: they must be indistinguishable."""
    monkeypatch.setattr(TRANSPORT_OF_TEST, "name", request.param)
    return request.param


def config(**kw: object) -> ServerConfig:
    kw.setdefault("worker_timeout", 4.0)
    kw.setdefault("transport", TRANSPORT_OF_TEST.name)
    return ServerConfig(**kw)  # type: ignore[arg-type]


def expected_vector(epoch: int, population: int) -> list[float]:
    return [reward_of(epoch, m) for m in range(population)]


def test_one_worker_through_max_epochs() -> None:
    summaries: list[EpochSummary] = []

    async def scenario() -> None:
        cfg = config(population_size=13, max_epochs=3, worker_timeout=5.0)
        async with EmbeddedServer(cfg, on_epoch=summaries.append) as server:
            w = StubWorker(server.address, cores=5)
            hello = await w.subscribe()
            assert hello.id and hello.token
            assert not hello.HasField("state")
            assert hello.population_size == 13 and hello.max_epochs == 3
            assert hello.heartbeat_interval == 2
            vectors: dict[int, list[float]] = {}
            events = await play(w, vectors=vectors)
            await server.wait_finished(timeout=5)
            kinds = [pb.EventType.Name(e.type) for e in events]
            assert kinds[0] == "EVENT_TYPE_INITIALIZE" and kinds[-1] == "EVENT_TYPE_STOP"
            # 13 members on 5 cores: 3 evaluate tasks, then optimize and share per epoch.
            per_epoch = ["EVENT_TYPE_EVALUATE"] * 3 + [
                "EVENT_TYPE_OPTIMIZE",
                "EVENT_TYPE_SHARE_STATE",
            ]
            assert kinds[1:-1] == per_epoch * 3
            slices = [[(s.start, s.end) for s in e.evaluate.slices] for e in events[1:4]]
            assert slices == [[(0, 5)], [(5, 10)], [(10, 13)]]
            assert [e.evaluate.epoch for e in events[1:4]] == [1, 1, 1]
            for epoch in (1, 2, 3):
                assert vectors[epoch] == expected_vector(epoch, 13)
            assert server.epoch == 3 and server.state == b"state-4"
            await w.close()

    run(scenario())
    assert [s.epoch for s in summaries] == [1, 2, 3]
    assert [s.state for s in summaries] == [b"state-2", b"state-3", b"state-4"]
    assert all(s.workers == 1 and s.seconds >= 0 for s in summaries)
    assert summaries[1].rewards.dtype == np.float32
    assert summaries[1].rewards.tolist() == expected_vector(2, 13)


def test_four_workers_optimize_vector_is_exact() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=1000, max_epochs=4)) as server:
            workers = [StubWorker(server.address, cores=250) for _ in range(4)]
            # The first initializes alone; the others join once there is a state.
            await workers[0].subscribe()
            vectors = [dict[int, list[float]]() for _ in workers]
            first = asyncio.ensure_future(play(workers[0], vectors=vectors[0]))
            rest = [play(w, vectors=v) for w, v in zip(workers[1:], vectors[1:], strict=True)]
            await asyncio.gather(first, *rest)
            await server.wait_finished(timeout=5)
            for epoch in range(1, 5):
                # Every worker optimized every epoch with exactly the same vector.
                got = [v.get(epoch) for v in vectors]
                assert all(g == expected_vector(epoch, 1000) for g in got), epoch
            for w in workers:
                await w.close()

    run(scenario())


def test_worker_killed_mid_evaluation_its_slices_run_elsewhere() -> None:
    async def scenario() -> None:
        summaries: list[EpochSummary] = []
        cfg = config(population_size=40, max_epochs=2, straggler_reissue=False)
        async with EmbeddedServer(cfg, on_epoch=summaries.append) as server:
            a = StubWorker(server.address, cores=10)
            await a.subscribe()
            a.start_heartbeats()
            init = await a.expect(pb.EVENT_TYPE_INITIALIZE)
            b = StubWorker(server.address, cores=10)
            b_hello = asyncio.ensure_future(b.subscribe())
            await a.finish_initialization(init.initialize.task_id, b"state-1")
            await b_hello
            b.start_heartbeats()
            ev_a = await a.expect(pb.EVENT_TYPE_EVALUATE)
            ev_b = await b.expect(pb.EVENT_TYPE_EVALUATE)
            assert [(s.start, s.end) for s in ev_b.evaluate.slices] == [(10, 20)]
            await b.kill()  # b vanishes with [10, 20) unfinished
            # a evaluates everything else, including b's members, exactly once.
            await a.evaluate(ev_a, reward_of)
            evaluated: list[tuple[int, int]] = [(0, 10)]
            while True:
                event = await a.next_event()
                if event.type != pb.EVENT_TYPE_EVALUATE:
                    break
                evaluated += [(s.start, s.end) for s in event.evaluate.slices]
                await a.evaluate(event, reward_of)
            assert sorted(evaluated) == [(0, 10), (10, 20), (20, 30), (30, 40)]
            assert event.type == pb.EVENT_TYPE_OPTIMIZE
            assert list(event.optimize.rewards) == expected_vector(1, 40)
            await a.finish_optimization(event.optimize.task_id)
            await play(a)
            await server.wait_finished(timeout=5)
            await a.close()
            await b.close()
        assert [s.epoch for s in summaries] == [1, 2]
        assert summaries[0].rewards.tolist() == expected_vector(1, 40)

    run(scenario())


def test_join_during_optimize_receives_start_state_and_optimize() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=8, max_epochs=2)) as server:
            a = StubWorker(server.address, cores=8)
            await a.subscribe()
            a.start_heartbeats()
            init = await a.expect(pb.EVENT_TYPE_INITIALIZE)
            await a.finish_initialization(init.initialize.task_id, b"state-1")
            await a.evaluate(await a.expect(pb.EVENT_TYPE_EVALUATE), reward_of)
            opt_a = await a.expect(pb.EVENT_TYPE_OPTIMIZE)
            # b joins while a optimizes epoch 1.
            b = StubWorker(server.address, cores=8)
            hello = await b.subscribe()
            b.start_heartbeats()
            assert hello.HasField("state") and hello.state == b"state-1"
            opt_b = await b.expect(pb.EVENT_TYPE_OPTIMIZE)
            assert opt_b.optimize.epoch == 1
            assert list(opt_b.optimize.rewards) == list(opt_a.optimize.rewards)
            await a.finish_optimization(opt_a.optimize.task_id)
            # The server waits for b's optimize before asking anyone to share state.
            await a.no_event(0.3)
            await b.no_event(0.1)
            await b.finish_optimization(opt_b.optimize.task_id)
            vectors_a: dict[int, list[float]] = {}
            vectors_b: dict[int, list[float]] = {}
            events_a, events_b = await asyncio.gather(
                play(a, vectors=vectors_a), play(b, vectors=vectors_b)
            )
            shares = [
                e.share_state.epoch
                for e in events_a + events_b
                if e.type == pb.EVENT_TYPE_SHARE_STATE
            ]
            assert sorted(shares) == [1, 2]
            assert vectors_a[2] == vectors_b[2] == expected_vector(2, 8)
            await server.wait_finished(timeout=5)
            await a.close()
            await b.close()

    run(scenario())


def test_last_worker_leaves_new_worker_continues_at_the_right_epoch() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=6, max_epochs=4)) as server:
            a = StubWorker(server.address, cores=6)
            await play(
                a,
                stop_after=lambda e: (
                    e.type == pb.EVENT_TYPE_SHARE_STATE and e.share_state.epoch == 2
                ),
            )
            # Epoch 3 runs: a gets its evaluate task and vanishes.
            await a.expect(pb.EVENT_TYPE_EVALUATE)
            await a.kill()
            for _ in range(100):
                if not server.service.core.workers:
                    break
                await asyncio.sleep(0.02)
            assert server.epoch == 3
            b = StubWorker(server.address, cores=3)
            hello = await b.subscribe()
            assert hello.state == b"state-3"  # not initialize: the training goes on
            vectors: dict[int, list[float]] = {}
            events = await play(b, vectors=vectors)
            assert pb.EVENT_TYPE_INITIALIZE not in [e.type for e in events]
            assert events[0].evaluate.epoch == 3
            assert sorted(vectors) == [3, 4]
            assert vectors[3] == expected_vector(3, 6)
            await server.wait_finished(timeout=5)
            await a.close()
            await b.close()

    run(scenario())


async def evaluating(server: EmbeddedServer, cores: int = 4) -> tuple[StubWorker, pb.EvaluateEvent]:
    w = StubWorker(server.address, cores=cores)
    await w.subscribe()
    init = await w.expect(pb.EVENT_TYPE_INITIALIZE)
    await w.finish_initialization(init.initialize.task_id, b"state-1")
    event = await w.expect(pb.EVENT_TYPE_EVALUATE)
    return w, event.evaluate


MALFORMED = {
    "wrong slice": [(1, 5, [1.0] * 4)],
    "partial slice": [(0, 3, [1.0] * 3)],
    "overlapping slices": [(0, 4, [1.0] * 4), (2, 4, [1.0] * 2)],
    "duplicated slice": [(0, 4, [1.0] * 4), (0, 4, [1.0] * 4)],
    "too few rewards": [(0, 4, [1.0] * 3)],
    "too many rewards": [(0, 4, [1.0] * 5)],
    "no evaluations": [],
    "NaN": [(0, 4, [1.0, math.nan, 1.0, 1.0])],
    "inf": [(0, 4, [1.0, math.inf, 1.0, 1.0])],
    "-inf": [(0, 4, [-math.inf, 1.0, 1.0, 1.0])],
    "out of range": [(8, 12, [1.0] * 4)],
}


def test_each_malformed_finish_evaluation_is_rejected_and_nothing_recorded() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=8, max_epochs=1)) as server:
            w, ev = await evaluating(server)
            assert [(s.start, s.end) for s in ev.slices] == [(0, 4)]
            core = server.service.core
            for name, evaluations in MALFORMED.items():
                err = await expect_error(
                    w.finish_evaluation(ev.task_id, evaluations), INVALID_ARGUMENT
                )
                assert err.details(), name
                assert core.recorded_members == 0, name
            # Another worker's task, an unknown id: NOT_FOUND, nothing recorded.
            other, ev_other = await evaluating_second(server)
            await expect_error(
                w.finish_evaluation(ev_other.task_id, [(4, 8, [1.0] * 4)]), NOT_FOUND
            )
            await expect_error(w.finish_evaluation("nope", [(0, 4, [1.0] * 4)]), NOT_FOUND)
            await expect_error(w.finish_evaluation("", [(0, 4, [1.0] * 4)]), NOT_FOUND)
            # The task's right method only.
            await expect_error(w.finish_optimization(ev.task_id), FAILED_PRECONDITION)
            await expect_error(w.finish_share_state(ev.task_id, b"x"), FAILED_PRECONDITION)
            assert core.recorded_members == 0
            # The correct answer still goes through, once.
            await w.finish_evaluation(ev.task_id, [(0, 4, [7.0] * 4)])
            assert core.recorded_members == 4
            await expect_error(w.finish_evaluation(ev.task_id, [(0, 4, [9.0] * 4)]), NOT_FOUND)
            assert core.recorded_members == 4 and core.rewards[:4].tolist() == [7.0] * 4
            rejected = server.metrics.registry.get_sample_value(
                "evochi_rejected_requests_total",
                {"method": "FinishEvaluation", "code": "INVALID_ARGUMENT"},
            )
            assert rejected == len(MALFORMED)
            await w.close()
            await other.close()

    async def evaluating_second(server: EmbeddedServer) -> tuple[StubWorker, pb.EvaluateEvent]:
        w = StubWorker(server.address, cores=4)
        await w.subscribe()
        event = await w.expect(pb.EVENT_TYPE_EVALUATE)
        return w, event.evaluate

    run(scenario())


def test_heartbeat_out_of_order_is_failed_precondition() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=4)) as server:
            w = StubWorker(server.address, cores=4)
            await w.subscribe(prove=False)  # every heartbeat by hand
            await expect_error(w.heartbeat(2), FAILED_PRECONDITION)
            assert (await w.heartbeat(1)).ok
            await expect_error(w.heartbeat(1), FAILED_PRECONDITION)
            assert (await w.heartbeat(2)).ok
            await expect_error(w.heartbeat(7), FAILED_PRECONDITION)
            assert (await w.heartbeat(3)).ok
            await w.close()

    run(scenario())


def test_max_workers_is_resource_exhausted_and_bad_cores_invalid() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=4, max_workers=2)) as server:
            a, b = StubWorker(server.address, 2), StubWorker(server.address, 2)
            await a.subscribe()
            a.start_heartbeats()
            init = await a.expect(pb.EVENT_TYPE_INITIALIZE)
            await a.finish_initialization(init.initialize.task_id, b"state-1")
            await b.subscribe()  # hello read: b is registered
            c = StubWorker(server.address, 2)
            await expect_error(c.subscribe(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            for cores in (0, -3):
                bad = StubWorker(server.address, cores)
                await expect_error(bad.subscribe(), INVALID_ARGUMENT)
                await bad.close()
            assert len(server.service.core.workers) == 2
            # A place frees up when a worker leaves.
            await b.kill()
            for _ in range(100):
                if len(server.service.core.workers) < 2:
                    break
                await asyncio.sleep(0.02)
            d = StubWorker(server.address, 2)
            await d.subscribe()
            for w in (a, b, c, d):
                await w.close()

    run(scenario())


def test_missing_bad_or_foreign_tokens_are_unauthenticated() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=8)) as server:
            w, ev = await evaluating(server)
            stub = w.stub
            request = pb.FinishEvaluationRequest(
                task_id=ev.task_id,
                evaluations=[pb.Evaluation(slice=pb.Slice(start=0, end=4), rewards=[1.0] * 4)],
            )
            await expect_error(stub.FinishEvaluation(request), UNAUTHENTICATED)
            for metadata in (
                (("authorization", "Bearer forged"),),
                (("authorization", f"Basic {w.token}"),),
                (("authorization", w.token),),
                (("authorization", "Bearer "),),
            ):
                await expect_error(
                    stub.FinishEvaluation(request, metadata=metadata), UNAUTHENTICATED
                )
                await expect_error(
                    stub.Heartbeat(pb.HeartbeatRequest(seq_id=1), metadata=metadata),
                    UNAUTHENTICATED,
                )
            assert server.service.core.recorded_members == 0
            # A worker that left: its token died with it, but for the late result of the
            # evaluation it held (see test_late_results.py).
            token = w.token
            await w.kill()
            for _ in range(100):
                if not server.service.core.workers:
                    break
                await asyncio.sleep(0.02)
            auth = (("authorization", f"Bearer {token}"),)
            await expect_error(
                stub.Heartbeat(pb.HeartbeatRequest(seq_id=2), metadata=auth), UNAUTHENTICATED
            )
            await expect_error(
                stub.FinishOptimization(
                    pb.FinishOptimizationRequest(task_id=ev.task_id), metadata=auth
                ),
                UNAUTHENTICATED,
            )
            other = pb.FinishEvaluationRequest(task_id="another", evaluations=request.evaluations)
            await expect_error(
                stub.FinishEvaluation(other, metadata=auth), grpc.StatusCode.NOT_FOUND
            )
            await w.close()

    run(scenario())


def test_undecodable_request_bytes_are_invalid_argument() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=4)) as server:
            w = StubWorker(server.address, cores=4)
            await w.subscribe()
            for method in ("Heartbeat", "FinishEvaluation", "FinishShareState"):
                call = w.channel.unary_unary(
                    f"/evochi.v1.EvochiService/{method}",
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
                await expect_error(call(b"\xff\xff\xff\xff", metadata=w.auth()), INVALID_ARGUMENT)
            subscribe = w.channel.unary_stream(
                "/evochi.v1.EvochiService/Subscribe",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            stream = subscribe(b"\x08")  # truncated varint
            await expect_error(stream.read(), INVALID_ARGUMENT)
            # The server is unharmed.
            assert (await w.heartbeat()).ok
            await w.close()

    run(scenario())


def test_missed_heartbeats_end_the_stream_with_deadline_exceeded() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=4, worker_timeout=2.0)) as server:
            w = StubWorker(server.address, cores=4)
            await w.subscribe()  # and never heartbeats
            await w.expect(pb.EVENT_TYPE_INITIALIZE)
            err = await expect_error(w.read(), grpc.StatusCode.DEADLINE_EXCEEDED)
            assert "heartbeat" in (err.details() or "")
            await expect_error(w.heartbeat(1), UNAUTHENTICATED)
            # The initialize task goes to the next worker.
            v = StubWorker(server.address, cores=4)
            hello = await v.subscribe()
            assert not hello.HasField("state")
            await v.expect(pb.EVENT_TYPE_INITIALIZE)
            await w.close()
            await v.close()

    run(scenario())


def test_callback_errors_are_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def on_epoch(summary: EpochSummary) -> None:
        calls.append(summary.epoch)
        raise RuntimeError("checkpoint disk full")

    async def scenario() -> None:
        cfg = config(population_size=4, max_epochs=3)
        async with EmbeddedServer(cfg, on_epoch=on_epoch) as server:
            w = StubWorker(server.address, cores=4)
            await play(w)
            await server.wait_finished(timeout=5)
            await w.close()

    run(scenario())
    assert calls == [1, 2, 3]
    assert "on_epoch callback failed" in caplog.text


def test_two_embedded_servers_in_one_process_keep_separate_metrics() -> None:
    async def scenario() -> None:
        async with (
            EmbeddedServer(config(population_size=2, max_epochs=1)) as s1,
            EmbeddedServer(config(population_size=2, max_epochs=2)) as s2,
        ):
            assert s1.port != s2.port
            w1, w2 = StubWorker(s1.address, 2), StubWorker(s2.address, 2)
            await asyncio.gather(play(w1), play(w2))
            await asyncio.gather(s1.wait_finished(5), s2.wait_finished(5))
            get = lambda s: s.metrics.registry.get_sample_value("evochi_epochs_total")  # noqa: E731
            assert (get(s1), get(s2)) == (1.0, 2.0)
            await w1.close()
            await w2.close()

    run(scenario())


def test_join_token_is_required_when_configured() -> None:
    async def scenario() -> None:
        cfg = config(population_size=2, max_epochs=1, join_token="s3cret")
        async with EmbeddedServer(cfg) as server:
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                w = StubWorker(server.address, 2, metadata=metadata)
                await expect_error(w.subscribe(), UNAUTHENTICATED)
                await w.close()
            assert not server.service.core.workers
            ok = StubWorker(server.address, 2, metadata=(("authorization", "Bearer s3cret"),))
            await play(ok)
            await server.wait_finished(timeout=5)
            await ok.close()

    run(scenario())


def test_stop_ends_every_stream_and_late_joiners_get_stop() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(config(population_size=4, max_epochs=1)) as server:
            a = StubWorker(server.address, 2)
            await a.subscribe()
            b = StubWorker(server.address, 2)
            b_task = asyncio.ensure_future(play(b))
            events = await play(a)
            assert events[-1].type == pb.EVENT_TYPE_STOP
            assert (await b_task)[-1].type == pb.EVENT_TYPE_STOP
            await server.wait_finished(timeout=5)
            late = StubWorker(server.address, 2)
            hello = await late.subscribe(prove=False)
            assert hello.state == b"state-2"
            # A heartbeat sent before the client reads the stop is harmless, not an error.
            assert (await late.heartbeat(1)).ok
            await late.expect(pb.EVENT_TYPE_STOP)
            assert await late.read() is grpc.aio.EOF
            for w in (a, b, late):
                await w.close()

    run(scenario())
