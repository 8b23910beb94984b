"""The late result of a worker removed while it evaluated (missed deadline or heartbeat, lost
stream): its members that nobody has recorded yet are recorded from it, wherever they went
(back on the stack, or into another worker's open task); it is refused when every member is
recorded already, when the epoch's evaluation is over, and for anything but that one task.
The core's rules in the simulator (and in random interleavings), then the real server with
raw stubs and with `evochi.v1.Worker`."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig, core
from evochi.server.core import Stage
from evochi.v1 import evochi_pb2 as pb
from tests.server.helpers import StubWorker, expect_error, run
from tests.server.sim import Sim, SimWorker


def started(sim: Sim, *cores: int) -> list[SimWorker]:
    """Workers joined, the first initialized: the training is evaluating epoch 1."""
    workers = [sim.join(c) for c in cores]
    sim.step(workers[0])  # hello
    sim.step(workers[0])  # initialize
    for w in workers[1:]:
        sim.step(w)  # hello
    return workers


def evaluate_event(w: SimWorker) -> core.Evaluate:
    return next(e for e in w.inbox if isinstance(e, core.Evaluate))


def removed_for_its_deadline(sim: Sim, w: SimWorker) -> None:
    """``w`` keeps heartbeating, but its evaluation outlasts the task deadline."""
    w.hung = True  # it answers nothing (and sim.advance skips its heartbeats)...
    while w.id in sim.t.workers:
        w.seq += 1
        sim.apply(sim.t.heartbeat(w.id, w.seq, sim.now))  # ...but it beats
        sim.advance(0.5)
    assert sim.left[-1].worker_id == w.id


# ---------------------------------------------------------------------- the core's rules


def test_a_lone_workers_late_result_is_recorded_from_the_stack() -> None:
    sim = Sim(population_size=4, max_epochs=1, worker_timeout=2.0)
    (a,) = started(sim, 4)
    task = evaluate_event(a)
    assert task.slices == ((0, 4),)
    removed_for_its_deadline(sim, a)
    assert sim.left[-1].reason == "evaluate task deadline missed"
    assert sim.left[-1].returned_members == 4 and sim.t._stack == [(0, 4)]
    t = sim.t
    # Its token is good for that one result only: heartbeats and other calls fail as for
    # any removed worker (that is how a client learns it was removed).
    with pytest.raises(core.Unauthenticated):
        t.authenticate(a.token or "")
    assert t.authenticate(a.token or "", removed=True) == a.id
    with pytest.raises(core.Unauthenticated):
        t.heartbeat(a.id, a.seq + 1, sim.now)
    with pytest.raises(core.Unauthenticated):
        t.finish_optimization(a.id, task.task_id, sim.now)
    with pytest.raises(core.NotFound):
        t.finish_evaluation(a.id, "another-task", [(0, 4, [1.0] * 4)], sim.now)
    with pytest.raises(core.InvalidArgument):  # not the slices it was assigned
        sim.deliver_late(a, [(0, 3, [1.0] * 3)])
    assert t.recorded_members == 0
    metrics = [("env_steps", [10.0, 11.0, 12.0, 13.0])]
    commands = sim.deliver_late(a, [(0, 4, [5.0, 6.0, 7.0, 8.0], metrics)])
    assert core.LateEvaluation(a.id, 4, 1) in commands
    assert t.recorded_members == 4 and t._stack == [] and t.stage is Stage.OPTIMIZE
    # Once only: the same result again is a stranger's.
    with pytest.raises(core.Unauthenticated):
        t.finish_evaluation(a.id, task.task_id, [(0, 4, [9.0] * 4)], sim.now)
    # A new worker gets the epoch's start state and those rewards to optimize.
    sim.join(2)
    sim.run()
    assert sim.finished
    assert sim.optimize_vectors[1].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert sim.epochs[0].metrics == {"env_steps": 46.0}


def test_a_late_result_is_refused_when_another_worker_recorded_its_members() -> None:
    sim = Sim(population_size=6, max_epochs=1, worker_timeout=2.0, straggler_reissue=False)
    a, b, c = started(sim, 2, 2, 2)
    assert evaluate_event(a).slices == ((0, 2),)
    sim.leave(a)  # its stream is lost; the evaluation goes on
    sim.step(b)  # b finishes [2, 4), gets a's [0, 2) from the stack...
    assert evaluate_event(b).slices == ((0, 2),)
    sim.step(b)  # ...and finishes it; c is still evaluating
    rewards = sim.t.rewards.copy()
    with pytest.raises(core.NotFound, match="evaluated by another worker"):
        sim.deliver_late(a)
    assert (sim.t.rewards == rewards).all() and sim.t.recorded_members == 4
    sim.step(c)
    sim.run()
    assert sim.finished
    sim.check_vectors()


def test_a_late_result_counts_for_members_nobody_recorded_yet() -> None:
    sim = Sim(population_size=6, max_epochs=1, worker_timeout=2.0, straggler_reissue=False)
    a, b = started(sim, 4, 2)
    assert evaluate_event(a).slices == ((0, 4),)
    sim.leave(a)  # its stream is lost; the evaluation goes on
    sim.step(b)  # [4, 6) done; b takes [0, 2) of a's members
    sim.step(b)  # recorded; b now holds [2, 4), unfinished
    assert evaluate_event(b).slices == ((2, 4),)
    sim.deliver_late(a)  # [2, 4) come from a's result, [0, 2) stay b's
    assert sim.t.stage is Stage.OPTIMIZE
    vector_before_b = sim.t.rewards.copy()
    sim.step(b)  # its [2, 4) now comes second: accepted, discarded
    assert (sim.t.rewards == vector_before_b).all()
    sim.run()
    assert sim.finished
    sim.check_vectors()


def test_a_late_result_from_the_stack_splits_what_is_left_there() -> None:
    sim = Sim(population_size=8, worker_timeout=2.0, straggler_reissue=False)
    a, b = started(sim, 4, 2)
    assert evaluate_event(a).slices == ((0, 4),) and evaluate_event(b).slices == ((4, 6),)
    sim.leave(a)  # its stream is lost; the evaluation goes on
    # The stack holds [0, 4) on top of [6, 8): the late result takes [0, 4) off it.
    assert sorted(sim.t._stack) == [(0, 4), (6, 8)]
    sim.deliver_late(a)
    assert sim.t._stack == [(6, 8)]
    sim.t.check_invariants()


def test_a_late_result_after_the_epoch_is_refused() -> None:
    sim = Sim(population_size=4, worker_timeout=2.0, straggler_reissue=False)
    a, _ = started(sim, 2, 2)
    sim.leave(a)  # its stream is lost; the evaluation goes on
    sim.run(until_epochs=1)  # b evaluates everything; epoch 1 completes
    assert sim.t.epoch == 2
    with pytest.raises(core.Unauthenticated):  # forgotten with its epoch
        sim.deliver_late(a)
    sim.t.check_invariants()


def test_a_late_result_during_the_optimize_step_is_refused() -> None:
    sim = Sim(population_size=4, worker_timeout=2.0, straggler_reissue=False)
    a, b = started(sim, 2, 2)
    sim.leave(a)  # its stream is lost; the evaluation goes on
    sim.step(b)
    sim.step(b)  # all recorded; b gets its optimize task
    assert sim.t.stage is Stage.OPTIMIZE
    with pytest.raises(core.NotFound, match="after the epoch's evaluation was over"):
        sim.deliver_late(a)


def test_removed_workers_are_remembered_up_to_a_limit(monkeypatch) -> None:
    monkeypatch.setattr(core, "DROPPED_LIMIT", 2)
    sim = Sim(population_size=8, worker_timeout=2.0, straggler_reissue=False)
    workers = started(sim, 2, 2, 2, 2)
    for w in workers[:3]:
        sim.leave(w)  # a lost stream: its result may still come
    t = sim.t
    assert list(t._dropped) == [w.id for w in workers[1:3]]
    with pytest.raises(core.Unauthenticated):
        sim.deliver_late(workers[0])
    sim.deliver_late(workers[2])
    t.check_invariants()


LATE_OPS = st.sampled_from(
    ["join", "leave", "step", "step", "step", "others", "hang", "tick", "late", "late", "forged"]
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    pop=st.integers(1, 30),
    max_slices=st.integers(0, 3),
    reissue=st.booleans(),
)
def test_random_interleavings_with_late_results_count_every_member_once(
    data: st.DataObject, pop: int, max_slices: int, reissue: bool
) -> None:
    """Removed and hung workers answer late, at random moments, correctly or not: every
    member is still recorded exactly once per epoch (the optimize vector holds the first
    result recorded for each member), a refused call changes nothing, and epochs go on."""
    sim = Sim(
        population_size=pop,
        worker_timeout=2.0,
        max_slices_per_eval=max_slices,
        straggler_reissue=reissue,
        straggler_min_seconds=0.5,
    )
    sim.join(data.draw(st.integers(1, pop + 2), label="cores"))
    for _ in range(data.draw(st.integers(0, 80), label="ops")):
        op = data.draw(LATE_OPS)
        live = sim.live()
        late = [
            w
            for w in sim.workers.values()
            if (w.closed or w.hung) and any(isinstance(e, core.Evaluate) for e in w.inbox)
        ]
        if op == "join" or not live:
            sim.join(data.draw(st.integers(1, pop + 2)))
        elif op == "leave":
            sim.leave(data.draw(st.sampled_from(live)))
        elif op == "step":
            sim.step(data.draw(st.sampled_from(live)))
        elif op == "others":
            slow = data.draw(st.sampled_from(live))
            for w in live:
                if w is not slow:
                    sim.step(w)
        elif op == "hang":
            data.draw(st.sampled_from(live)).hung = True
        elif op == "tick":
            sim.advance(data.draw(st.sampled_from([0.1, 0.6, 2.5])))
        elif op in ("late", "forged") and late:
            w = data.draw(st.sampled_from(late))
            ev = evaluate_event(w)
            bad = None
            if op == "forged":  # shifted slices, or one more reward than members
                bad = [(s + 1, e + 1, [0.0] * (e - s)) for s, e in ev.slices]
                if data.draw(st.booleans()):
                    bad = [(s, e, [0.0] * (e - s + 1)) for s, e in ev.slices]
            recorded, rewards = sim.t.recorded_members, sim.t.rewards.copy()
            # A removed worker's result for members nobody recorded, in time: always taken.
            wanted = (
                w.closed
                and bad is None
                and ev.epoch == sim.t.epoch
                and sim.t.stage is Stage.EVALUATE
                and any(not sim.t.recorded[s:e].all() for s, e in ev.slices)
            )
            try:
                sim.deliver_late(w, bad)
            except core.CoreError as err:
                assert not wanted, err
                assert err.code in ("NOT_FOUND", "UNAUTHENTICATED", "INVALID_ARGUMENT")
                assert sim.t.recorded_members == recorded
                assert np.array_equal(sim.t.rewards, rewards)
                w.inbox.remove(ev)
            else:
                assert bad is None, "a forged result was accepted"
    epochs_before = len(sim.epochs)
    sim.join(data.draw(st.integers(1, pop + 2)))
    for _ in range(200):
        sim.run(dt=0.05, until_epochs=epochs_before + 2)
        if len(sim.epochs) >= epochs_before + 2:
            break
        sim.advance(2.5)
    assert len(sim.epochs) >= epochs_before + 2, (sim.t.stage, sim.t.epoch)
    sim.check_vectors()


# ---------------------------------------------------------------------- the real server


def reward(epoch: int, member: int, who: int) -> float:
    return float(epoch * 1000 + member * 10 + who)


async def evaluating(server: EmbeddedServer, cores: int) -> tuple[StubWorker, pb.EvaluateEvent]:
    """A stub worker that initialized the training and holds epoch 1's first evaluate task."""
    w = StubWorker(server.address, cores=cores)
    await w.subscribe()
    init = await w.expect(pb.EVENT_TYPE_INITIALIZE)
    await w.finish_initialization(init.initialize.task_id, b"state-1")
    return w, (await w.expect(pb.EVENT_TYPE_EVALUATE)).evaluate


def late_members(server: EmbeddedServer) -> float:
    for metric in server.metrics.registry.collect():
        if metric.name == "evochi_late_members":
            return sum(s.value for s in metric.samples if s.name.endswith("_total"))
    raise AssertionError("no evochi_late_members metric")


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_a_dropped_workers_late_result_is_taken_by_the_real_server(transport: str) -> None:
    async def scenario() -> None:
        summaries: list[EpochSummary] = []
        config = ServerConfig(
            population_size=4, max_epochs=1, worker_timeout=1.0, transport=transport
        )
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            a, ev = await evaluating(server, 4)
            assert [(s.start, s.end) for s in ev.slices] == [(0, 4)]
            # It heartbeats no more and misses the task deadline: removed.
            await expect_error(a.read(10), grpc.StatusCode.DEADLINE_EXCEEDED)
            await expect_error(a.heartbeat(), grpc.StatusCode.UNAUTHENTICATED)
            await a.evaluate(pb.SubscribeResponse(evaluate=ev), lambda e, m: reward(e, m, 1))
            assert late_members(server) == 4
            # Once only.
            await expect_error(
                a.evaluate(pb.SubscribeResponse(evaluate=ev), lambda e, m: reward(e, m, 2)),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            b = StubWorker(server.address, cores=4)
            await b.subscribe()
            b.start_heartbeats()
            optimize = await b.expect(pb.EVENT_TYPE_OPTIMIZE)  # nothing left to evaluate
            assert list(optimize.optimize.rewards) == [reward(1, m, 1) for m in range(4)]
            await b.finish_optimization(optimize.optimize.task_id)
            share = await b.expect(pb.EVENT_TYPE_SHARE_STATE)
            await b.finish_share_state(share.share_state.task_id, b"state-2")
            await server.wait_finished(10)
            assert summaries[0].rewards.tolist() == [reward(1, m, 1) for m in range(4)]
            for w in (a, b):
                await w.close()

    run(scenario(), timeout=60)


def test_a_dropped_workers_late_result_is_refused_once_another_did_the_work() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=4, max_epochs=1, worker_timeout=1.0)
        async with EmbeddedServer(config) as server:
            a, ev = await evaluating(server, 4)
            await expect_error(a.read(10), grpc.StatusCode.DEADLINE_EXCEEDED)
            b = StubWorker(server.address, cores=4)
            await b.subscribe()
            b.start_heartbeats()
            retry = await b.expect(pb.EVENT_TYPE_EVALUATE)
            await b.evaluate(retry, lambda e, m: reward(e, m, 2))
            err = await expect_error(
                a.evaluate(pb.SubscribeResponse(evaluate=ev), lambda e, m: reward(e, m, 1)),
                grpc.StatusCode.NOT_FOUND,
            )
            assert "after the epoch's evaluation was over" in (err.details() or "")
            optimize = await b.expect(pb.EVENT_TYPE_OPTIMIZE)
            assert list(optimize.optimize.rewards) == [reward(1, m, 2) for m in range(4)]
            assert late_members(server) == 0
            for w in (a, b):
                await w.close()

    run(scenario(), timeout=60)


class SlowFirstEvaluation(evochi.Worker[dict]):
    """Its first evaluation outlasts the server's task deadline and its session."""

    def __init__(self, address: str, cores: int) -> None:
        policy = evochi.ReconnectPolicy(initial_delay=0.05, max_delay=0.2)
        super().__init__(address, cores, reconnect=policy)
        self.evaluated: list[tuple[int, int, int]] = []

    def initialize(self) -> dict:
        return {"epochs": 0}

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        if not self.evaluated:
            time.sleep(3.5)
        self.evaluated += [(epoch, s.start, s.stop) for s in slices]
        return [
            evochi.Eval(s, [reward(epoch, m, 0) for m in range(s.start, s.stop)]) for s in slices
        ]

    def optimize(self, epoch: int, rewards: list[float]) -> dict:
        return {"epochs": self.state["epochs"] + 1}


def test_a_workers_evaluation_that_outlived_its_session_still_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker is removed (deadline 1 s) and its session ends (its heartbeat is refused)
    while its first evaluation runs on; it sends that result when the evaluation returns,
    before it rejoins, and the server records it: no member of epoch 1 is evaluated twice."""

    async def scenario() -> None:
        config = ServerConfig(population_size=4, max_epochs=2, worker_timeout=1.0)
        async with EmbeddedServer(config) as server:
            w = SlowFirstEvaluation(server.address, cores=4)
            with caplog.at_level(logging.INFO, logger="evochi"):
                await asyncio.wait_for(w.start(), 40)
            await w.close()
            assert w.state == {"epochs": 2}
            assert [e for e in w.evaluated if e[0] == 1] == [(1, 0, 4)]
            assert late_members(server) == 4

    run(scenario(), timeout=60)
    messages = [r.getMessage() for r in caplog.records]
    assert any("evaluate task deadline missed" in m for m in messages), messages
    assert any("recorded 4 members of epoch 1 from the late result" in m for m in messages)
