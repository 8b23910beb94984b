"""The table of bad inputs (docs/server.md), walked against a live training: every bad
request gets its precise status and changes nothing; the training ends exactly right."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import grpc.aio
import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, ServerConfig
from evochi.v1 import evochi_pb2 as pb
from evochi.v1 import evochi_pb2_grpc as pb_grpc
from tests.server.helpers import StubWorker, expect_error, run
from tests.server.workers import History, expected, make

pytestmark = pytest.mark.timeout(90)

POP, EPOCHS = 24, 4
CODE = grpc.StatusCode


def honest_reward(epoch: int, member: int) -> float:
    return float((epoch - 1) * 1000 + member)  # what HistoryWorker computes at that epoch


def bad_evaluations(slices: list[tuple[int, int]]) -> dict[str, list[tuple[int, int, list[float]]]]:
    (s, e), rest = slices[0], slices[1:]
    ok_rest = [(a, b, [0.0] * (b - a)) for a, b in rest]
    width = e - s
    return {
        "slice out of range": [(POP, POP + width, [0.0] * width), *ok_rest],
        "shifted slice": [(s + 1, e + 1, [0.0] * width), *ok_rest],
        "partial slice": [(s, e - 1, [0.0] * (width - 1)), *ok_rest] if width > 1 else [],
        "overlapping slices": [(s, e, [0.0] * width), (s, e, [0.0] * width), *ok_rest],
        "missing slice": ok_rest,
        "too few rewards": [(s, e, [0.0] * (width - 1)), *ok_rest],
        "too many rewards": [(s, e, [0.0] * (width + 1)), *ok_rest],
        "NaN": [(s, e, [math.nan] * width), *ok_rest],
        "inf": [(s, e, [math.inf] * width), *ok_rest],
        "negative start": [(-1, e, [0.0] * (width + 1)), *ok_rest],
    }


async def attacker(server: EmbeddedServer, log: list[str]) -> None:
    """A subscribed worker that tries every bad variant before answering correctly."""
    codec = evochi.PickleZstdCodec([History])
    w = StubWorker(server.address, cores=5)
    await w.subscribe()
    w.start_heartbeats()
    core = server.service.core
    while True:
        event = await w.read(None)
        if event is grpc.aio.EOF:
            return
        if event.type == pb.EVENT_TYPE_EVALUATE:
            ev = event.evaluate
            slices = [(s.start, s.end) for s in ev.slices]
            for name, evaluations in bad_evaluations(slices).items():
                if evaluations or name == "missing slice":
                    await expect_error(
                        w.finish_evaluation(ev.task_id, evaluations), CODE.INVALID_ARGUMENT
                    )
                    log.append(name)
            await expect_error(w.finish_optimization(ev.task_id), CODE.FAILED_PRECONDITION)
            await expect_error(w.finish_share_state(ev.task_id, b"x"), CODE.FAILED_PRECONDITION)
            await expect_error(w.finish_initialization(ev.task_id, b"x"), CODE.FAILED_PRECONDITION)
            # Only this worker holds these members (no re-issue): none may be recorded yet.
            assert core.epoch == ev.epoch
            assert not any(core.recorded[a:b].any() for a, b in slices)
            await w.evaluate(event, honest_reward)
            good = [(a, b, [honest_reward(ev.epoch, m) for m in range(a, b)]) for a, b in slices]
            await expect_error(w.finish_evaluation(ev.task_id, good), CODE.NOT_FOUND)
            log.append("duplicate submission")
        elif event.type == pb.EVENT_TYPE_OPTIMIZE:
            if event.optimize.epoch == EPOCHS:
                # Once the last epoch's state is shared (by an honest worker, possibly before
                # this arrives) the training is over: late calls are accepted and discarded.
                await w.finish_optimization(event.optimize.task_id)
                continue
            stale = CODE.NOT_FOUND
            await expect_error(w.finish_optimization("stale-" + event.optimize.task_id), stale)
            await w.finish_optimization(event.optimize.task_id)
            await expect_error(w.finish_optimization(event.optimize.task_id), stale)
        elif event.type == pb.EVENT_TYPE_SHARE_STATE:
            ss = event.share_state
            await expect_error(w.finish_share_state(ss.task_id, b""), CODE.INVALID_ARGUMENT)
            log.append("empty state")
            await w.finish_share_state(ss.task_id, codec.encode(expected(POP, ss.epoch)))
        elif event.type == pb.EVENT_TYPE_STOP:
            pass


async def stateless_attacks(server: EmbeddedServer, victim_token: str, log: list[str]) -> None:
    address = server.address
    probe = StubWorker(address, cores=1)
    stub = probe.stub
    some_request = pb.FinishEvaluationRequest(task_id="t", evaluations=[])
    # Tokens: missing, malformed, forged, an expired one (a worker that left).
    await expect_error(stub.FinishEvaluation(some_request), CODE.UNAUTHENTICATED)
    for metadata in (
        (("authorization", "Bearer"),),
        (("authorization", "Token abc"),),
        (("authorization", "Bearer forged.jwt.token"),),
        (("authorization", victim_token[:-2] + "xx"),),
    ):
        await expect_error(
            stub.FinishEvaluation(some_request, metadata=metadata), CODE.UNAUTHENTICATED
        )
        await expect_error(
            stub.Heartbeat(pb.HeartbeatRequest(seq_id=1), metadata=metadata), CODE.UNAUTHENTICATED
        )
    log.append("bad tokens")
    # Garbage bytes on every method.
    for method in ("Heartbeat", "FinishEvaluation", "FinishOptimization",
                   "FinishInitialization", "FinishShareState"):  # fmt: skip
        raw = probe.channel.unary_unary(
            f"/evochi.v1.EvochiService/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        garbage = b"\x0a\xff\xff\xff\xff\x0f"
        # Strangers' bytes are not even parsed; a worker's garbage is INVALID_ARGUMENT.
        await expect_error(raw(garbage), CODE.UNAUTHENTICATED)
        await expect_error(raw(garbage, metadata=probe.auth(victim_token)), CODE.INVALID_ARGUMENT)
    log.append("garbage bytes")
    # Zero, negative cores; a huge core count is served (tasks never exceed the population).
    for cores in (0, -1, -(2**31)):
        bad = StubWorker(address, cores)
        await expect_error(bad.subscribe(), CODE.INVALID_ARGUMENT)
        await bad.close()
    log.append("bad cores")
    huge = StubWorker(address, cores=2**31 - 1)
    hello = await huge.subscribe()
    assert hello.token
    # An expired token: it left, its token died with it.
    expired = huge.token
    await huge.kill()
    for _ in range(200):
        try:
            server.service.core.authenticate(expired)
        except Exception:
            break
        await asyncio.sleep(0.01)
    await expect_error(
        stub.Heartbeat(pb.HeartbeatRequest(seq_id=1), metadata=huge.auth(expired)),
        CODE.UNAUTHENTICATED,
    )
    log.append("expired token")
    await huge.close()
    # Oversized message: above the server's limit, refused by gRPC itself.
    big = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 24)])
    big_stub = pb_grpc.EvochiServiceStub(big)
    await expect_error(
        big_stub.FinishShareState(
            pb.FinishShareStateRequest(task_id="t", state=b"\x00" * (300 * 1024)),
            metadata=probe.auth(victim_token),
        ),
        CODE.RESOURCE_EXHAUSTED,
    )
    await big.close()
    log.append("oversized message")
    # Out-of-order heartbeats change nothing (a worker of its own: the honest ones may
    # already be stopped on a slow machine, and stopped workers' heartbeats are accepted).
    beating = StubWorker(address, 1)
    await beating.subscribe(prove=False)  # every heartbeat by hand
    for seq in (0, 2, 10**6, -1):
        await expect_error(beating.heartbeat(seq), CODE.FAILED_PRECONDITION)
    assert (await beating.heartbeat(1)).ok
    await beating.close()
    log.append("heartbeat out of order")
    for _ in range(500):  # until the server has seen it leave
        if len(server.service.core.workers) < 4:
            break
        await asyncio.sleep(0.01)
    # Too many workers.
    extra = [StubWorker(address, 1) for _ in range(2)]
    await extra[0].subscribe()
    await expect_error(extra[1].subscribe(), CODE.RESOURCE_EXHAUSTED)
    log.append("max workers")
    for w in extra:
        await w.close()
    await probe.close()


def test_bad_input_table_against_a_live_training() -> None:
    log: list[str] = []

    async def scenario() -> None:
        config = ServerConfig(
            population_size=POP,
            max_epochs=EPOCHS,
            worker_timeout=30,
            max_workers=4,
            max_message_bytes=256 * 1024,
            straggler_reissue=False,
        )
        async with EmbeddedServer(config) as server:
            honest = [make(server, cores=6), make(server, cores=4)]
            for w in honest:
                # Epoch 1's optimize waits for the stateless attacks to end, so that the
                # training is alive throughout however slow the machine is.
                w.optimize_delay = 60.0
            runs = [asyncio.ensure_future(w.start()) for w in honest]
            while server.state is None:
                await asyncio.sleep(0.01)
            rogue = asyncio.ensure_future(attacker(server, log))
            while not honest[0].ready:
                await asyncio.sleep(0.01)
            victim_token: Any = honest[0]._token
            await stateless_attacks(server, victim_token, log)
            for w in honest:
                w.gate.set()
            await asyncio.gather(*runs)
            await asyncio.wait_for(rogue, 10)
            await server.wait_finished(timeout=10)
            for w in honest:
                assert w.state == expected(POP, EPOCHS)
                await w.close()
            assert evochi.PickleZstdCodec([History]).decode(server.state) == expected(POP, EPOCHS)
            rejected = server.metrics.registry.get_sample_value(
                "evochi_rejected_requests_total",
                {"method": "FinishEvaluation", "code": "INVALID_ARGUMENT"},
            )
            assert rejected and rejected >= 9

    run(scenario(), timeout=80)
    for name in ("bad tokens", "garbage bytes", "bad cores", "expired token", "oversized message",
                 "heartbeat out of order", "max workers", "NaN", "inf", "overlapping slices",
                 "slice out of range", "too few rewards", "duplicate submission"):  # fmt: skip
        assert name in log, name
