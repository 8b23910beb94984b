"""Unit tests of the pure core: no gRPC, no clock, every step explicit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evochi.server import core
from evochi.server.core import CoreConfig, Stage, Training, TrainingSnapshot
from tests.server.sim import Sim, SimWorker, state_of


def only(w: SimWorker, kind: type) -> core.Event:
    assert len(w.inbox) == 1 and isinstance(w.inbox[0], kind), w.inbox
    return w.inbox[0]


def kinds(w: SimWorker) -> list[type]:
    return [type(e) for e in w.inbox]


def started(sim: Sim, *cores: int) -> list[SimWorker]:
    """Workers joined, the first initialized: the training is evaluating epoch 1."""
    workers = [sim.join(c) for c in cores]
    first = workers[0]
    sim.step(first)  # hello
    sim.step(first)  # initialize
    for w in workers[1:]:
        sim.step(w)  # hello (sent once the state existed)
    return workers


# ---------------------------------------------------------------------- joining


def test_first_worker_gets_hello_without_state_then_initialize() -> None:
    sim = Sim(population_size=10, worker_timeout=7)
    w = sim.join(3)
    assert kinds(w) == [core.Hello, core.Initialize]
    hello = w.inbox[0]
    assert isinstance(hello, core.Hello)
    assert hello.state is None and hello.population_size == 10
    assert hello.heartbeat_interval == 3  # timeout / 2 in whole seconds
    assert hello.token


@pytest.mark.parametrize(("timeout", "interval"), [(0.5, 1), (1.9, 1), (2, 1), (60, 30), (61, 30)])
def test_heartbeat_interval_is_half_the_timeout_at_least_one(timeout: float, interval: int) -> None:
    assert Training(CoreConfig(population_size=1, worker_timeout=timeout)).heartbeat_interval == (
        interval
    )


def test_joiner_during_initialization_waits_for_the_state() -> None:
    sim = Sim(population_size=10)
    a = sim.join(4)
    b = sim.join(4)
    assert b.inbox == []  # no hello yet: it would carry no state
    sim.step(a)
    sim.step(a)  # initialize done
    assert kinds(b) == [core.Hello, core.Evaluate]
    hello = b.inbox[0]
    assert isinstance(hello, core.Hello) and hello.state == state_of(1)


def test_invalid_cores_and_max_workers() -> None:
    sim = Sim(population_size=10, max_workers=2)
    for cores in (0, -1):
        with pytest.raises(core.InvalidArgument):
            sim.t.join(cores, 0.0)
    sim.join(1)
    sim.join(1)
    with pytest.raises(core.ResourceExhausted):
        sim.t.join(1, 0.0)
    assert len(sim.t.workers) == 2


def test_slices_respect_cores_and_max_slices_per_eval() -> None:
    sim = Sim(population_size=10, max_slices_per_eval=2)
    (a,) = started(sim, 4)
    ev = only(a, core.Evaluate)
    assert isinstance(ev, core.Evaluate) and ev.slices == ((0, 4),) and ev.epoch == 1
    # A lost task leaves holes: [0, 4) returned, then handed out with at most 2 slices.
    sim.leave(a)
    b = sim.join(100)
    assert kinds(b) == [core.Hello, core.Evaluate]
    ev = b.inbox[1]
    assert isinstance(ev, core.Evaluate)
    assert ev.slices == ((0, 4), (4, 10))


def test_max_slices_per_eval_limits_the_slice_count() -> None:
    sim = Sim(population_size=12, max_slices_per_eval=1)
    a, b, c = started(sim, 3, 3, 3)
    sim.leave(b)  # returns [3, 6) on top of [9, 12)
    sim.step(a)  # a finishes [0, 3), gets one slice only though it has 3 cores
    ev = only(a, core.Evaluate)
    assert isinstance(ev, core.Evaluate) and len(ev.slices) == 1
    del c


# ---------------------------------------------------------------------- one training


def test_one_worker_runs_max_epochs_then_stop() -> None:
    sim = Sim(population_size=7, max_epochs=3)
    w = sim.join(3)
    sim.run()
    assert [s.epoch for s in sim.epochs] == [1, 2, 3]
    assert sim.finished and sim.t.finished and sim.t.epoch == 3
    assert sim.t.state == state_of(4)
    assert w.closed and kinds(w) == [core.Stop]  # the stream ends after stop
    sim.check_vectors()
    for summary in sim.epochs:
        assert summary.rewards.dtype == np.float32 and summary.rewards.shape == (7,)
        assert summary.state == state_of(summary.epoch + 1)


def test_four_workers_optimize_vector_is_exact() -> None:
    sim = Sim(population_size=1000, max_epochs=2)
    for _ in range(4):
        sim.join(250)
    sim.run()
    assert len(sim.epochs) == 2
    sim.check_vectors()
    for summary in sim.epochs:
        first = sim.first[summary.epoch]
        assert np.array_equal(summary.rewards, [first[m] for m in range(1000)])


def test_join_after_training_finished_gets_hello_and_stop() -> None:
    sim = Sim(population_size=3, max_epochs=1)
    sim.join(3)
    sim.run()
    late = sim.join(2)
    assert kinds(late) == [core.Hello, core.Stop] and late.closed
    assert late.id not in sim.t.workers


# ---------------------------------------------------------------------- bad requests


def evaluating(sim: Sim) -> tuple[SimWorker, core.Evaluate]:
    (w,) = started(sim, 4)
    ev = only(w, core.Evaluate)
    assert isinstance(ev, core.Evaluate)
    return w, ev


@pytest.mark.parametrize(
    "evaluations",
    [
        pytest.param([(0, 3, [1.0] * 3)], id="partial-slice"),
        pytest.param([(1, 5, [1.0] * 4)], id="wrong-slice"),
        pytest.param([(0, 4, [1.0] * 4), (0, 4, [1.0] * 4)], id="duplicated-slice"),
        pytest.param([(0, 2, [1.0] * 2), (2, 4, [1.0] * 2)], id="re-split-slice"),
        pytest.param([(0, 4, [1.0] * 3)], id="too-few-rewards"),
        pytest.param([(0, 4, [1.0] * 5)], id="too-many-rewards"),
        pytest.param([(0, 4, [1.0, float("nan"), 1.0, 1.0])], id="nan"),
        pytest.param([(0, 4, [1.0, float("inf"), 1.0, 1.0])], id="inf"),
        pytest.param([(0, 4, [1.0, float("-inf"), 1.0, 1.0])], id="-inf"),
        pytest.param([(0, 4, [1e39, 1.0, 1.0, 1.0])], id="float32-overflow"),
        pytest.param([], id="no-evaluations"),
        pytest.param([(-4, 0, [1.0] * 4)], id="negative-range"),
        pytest.param([(4, 0, [])], id="reversed-range"),
    ],
)
def test_malformed_evaluations_are_rejected_and_change_nothing(evaluations: list) -> None:
    sim = Sim(population_size=10)
    w, ev = evaluating(sim)
    with pytest.raises(core.InvalidArgument):
        sim.t.finish_evaluation(w.id, ev.task_id, evaluations, sim.now)
    assert sim.t.recorded_members == 0
    sim.t.check_invariants()
    # The task is still open: a correct answer is accepted afterwards.
    sim.apply(sim.t.finish_evaluation(w.id, ev.task_id, [(0, 4, [2.0] * 4)], sim.now))
    assert sim.t.recorded_members == 4
    assert sim.t.rewards[:4].tolist() == [2.0] * 4


def test_slices_may_come_in_any_order() -> None:
    sim = Sim(population_size=10, max_slices_per_eval=0)
    a, b = started(sim, 3, 3)
    sim.leave(a)  # [0, 3) back on top of [6, 10)
    c = sim.join(7)
    ev = c.inbox[1]
    assert isinstance(ev, core.Evaluate) and ev.slices == ((0, 3), (6, 10))
    sim.step(c)
    sim.apply(
        sim.t.finish_evaluation(c.id, ev.task_id, [(6, 10, [1.0] * 4), (0, 3, [1.0] * 3)], 0.0)
    )
    assert sim.t.recorded_members == 7
    del b


def test_task_ids_unknown_foreign_finished_or_of_another_kind() -> None:
    sim = Sim(population_size=10)
    a, b = started(sim, 4, 4)
    ev_a = only(a, core.Evaluate)
    ev_b = b.inbox[-1]
    assert isinstance(ev_a, core.Evaluate) and isinstance(ev_b, core.Evaluate)
    t = sim.t
    with pytest.raises(core.NotFound):
        t.finish_evaluation(a.id, "no-such-task", [(0, 4, [1.0] * 4)], 0.0)
    with pytest.raises(core.NotFound):  # b's task, a's token
        t.finish_evaluation(a.id, ev_b.task_id, [(4, 8, [1.0] * 4)], 0.0)
    with pytest.raises(core.FailedPrecondition):  # right task, wrong method
        t.finish_optimization(a.id, ev_a.task_id, 0.0)
    with pytest.raises(core.FailedPrecondition):
        t.finish_share_state(a.id, ev_a.task_id, b"x", 0.0)
    assert t.recorded_members == 0
    sim.step(a)
    recorded = t.recorded_members
    with pytest.raises(core.NotFound):  # duplicate submission
        t.finish_evaluation(a.id, ev_a.task_id, [(0, 4, [9.0] * 4)], 0.0)
    assert t.recorded_members == recorded and t.rewards[0] != 9.0


def test_empty_states_are_rejected() -> None:
    sim = Sim(population_size=4)
    w = sim.join(4)
    sim.step(w)
    init = only(w, core.Initialize)
    with pytest.raises(core.InvalidArgument):
        sim.t.finish_initialization(w.id, init.task_id, b"", 0.0)
    assert sim.t.stage is Stage.INIT


def test_heartbeats_must_be_in_order() -> None:
    sim = Sim(population_size=4)
    w = sim.join(4, reads=False)  # heartbeats by hand below
    t = sim.t
    with pytest.raises(core.FailedPrecondition):
        t.heartbeat(w.id, 2, 0.0)
    with pytest.raises(core.FailedPrecondition):
        t.heartbeat(w.id, 0, 0.0)
    t.heartbeat(w.id, 1, 0.0)
    with pytest.raises(core.FailedPrecondition):
        t.heartbeat(w.id, 1, 0.0)
    t.heartbeat(w.id, 2, 0.0)


def test_tokens_belong_to_live_workers_only() -> None:
    sim = Sim(population_size=4)
    a, b = started(sim, 2, 2)
    assert sim.t.authenticate(a.token or "") == a.id
    with pytest.raises(core.Unauthenticated):
        sim.t.authenticate("forged")
    sim.leave(a)
    with pytest.raises(core.Unauthenticated):
        sim.t.authenticate(a.token or "")
    assert sim.t.authenticate(b.token or "") == b.id


# ---------------------------------------------------------------------- faults


def test_worker_lost_mid_evaluation_its_slices_run_elsewhere() -> None:
    sim = Sim(population_size=10, max_epochs=1)
    _, b = started(sim, 5, 5)
    sim.leave(b)
    assert sim.left[-1].returned_members == 5
    sim.run()
    assert sim.finished
    sim.check_vectors()


def test_join_during_optimize_gets_start_state_and_optimize_and_is_waited_for() -> None:
    sim = Sim(population_size=4, max_epochs=2)
    (a,) = started(sim, 4)
    sim.step(a)  # evaluate -> optimize for everyone
    assert sim.t.stage is Stage.OPTIMIZE
    late = sim.join(2)
    assert kinds(late) == [core.Hello, core.Optimize]
    hello, optimize = late.inbox
    assert isinstance(hello, core.Hello) and hello.state == state_of(1)
    assert isinstance(optimize, core.Optimize) and optimize.epoch == 1
    sim.step(a)  # a optimizes; the late worker has not yet
    assert sim.t.stage is Stage.OPTIMIZE and kinds(a) == []
    sim.step(late)
    sim.step(late)
    assert sim.t.stage is Stage.SHARE
    sim.run()
    assert sim.finished
    sim.check_vectors()


def test_join_during_share_state_catches_up_before_evaluating() -> None:
    sim = Sim(population_size=4, max_epochs=3)
    (a,) = started(sim, 4)
    sim.step(a)
    sim.step(a)
    assert sim.t.stage is Stage.SHARE
    late = sim.join(2)
    assert kinds(late) == [core.Hello, core.Optimize]
    sim.step(a)  # share state: epoch 2 starts without waiting for the late worker
    assert sim.t.epoch == 2 and sim.t.stage is Stage.EVALUATE
    sim.run()
    assert sim.finished
    sim.check_vectors()


def test_last_worker_leaving_keeps_the_training() -> None:
    sim = Sim(population_size=6, max_epochs=4)
    (a,) = started(sim, 6)
    for _ in range(6):  # two epochs
        sim.step(a)
    assert sim.t.epoch == 3 and len(sim.epochs) == 2
    sim.step(a)  # half-way: evaluated, optimize pending
    sim.leave(a)
    assert sim.t.workers == {} and sim.t.epoch == 3
    b = sim.join(3)
    hello = b.inbox[0]
    assert isinstance(hello, core.Hello) and hello.state == state_of(3)
    assert kinds(b) == [core.Hello, core.Optimize]  # its rewards were kept
    sim.run()
    assert sim.finished and [s.epoch for s in sim.epochs] == [1, 2, 3, 4]
    sim.check_vectors()


def test_last_worker_leaving_mid_evaluation_continues_with_a_new_one() -> None:
    sim = Sim(population_size=6, max_epochs=2)
    (a,) = started(sim, 3)
    sim.step(a)  # [0, 3) recorded
    sim.leave(a)
    b = sim.join(6)
    assert kinds(b) == [core.Hello, core.Evaluate]
    ev = b.inbox[1]
    assert isinstance(ev, core.Evaluate) and ev.slices == ((3, 6),) and ev.epoch == 1
    sim.run()
    assert sim.finished
    sim.check_vectors()


def test_initializer_lost_initialization_goes_to_the_next_worker() -> None:
    sim = Sim(population_size=4, max_epochs=1)
    a = sim.join(2)
    b = sim.join(2)
    sim.step(a)  # hello; initialize pending
    sim.leave(a)
    assert kinds(b) == [core.Hello, core.Initialize]
    sim.run()
    assert sim.finished


def test_only_worker_lost_during_initialization_next_joiner_initializes() -> None:
    sim = Sim(population_size=4, max_epochs=1)
    a = sim.join(2)
    sim.leave(a)
    b = sim.join(2)
    assert kinds(b) == [core.Hello, core.Initialize]
    hello = b.inbox[0]
    assert isinstance(hello, core.Hello) and hello.state is None
    sim.run()
    assert sim.finished


def test_share_state_worker_lost_another_is_asked() -> None:
    sim = Sim(population_size=4, max_epochs=1)
    a, b = started(sim, 2, 2)
    for _ in range(2):
        sim.step(a)
        sim.step(b)
    # Both optimized; whoever was asked to share dies before answering.
    sharer = a if a.inbox else b
    other = b if sharer is a else a
    assert isinstance(sharer.inbox[0], core.ShareState)
    sim.leave(sharer)
    assert sim.left[-1].reassigned_task == "share_state"
    assert kinds(other) == [core.ShareState]
    sim.run()
    assert sim.finished


def test_worker_lost_mid_optimize_epoch_proceeds() -> None:
    sim = Sim(population_size=4, max_epochs=2)
    a, b = started(sim, 2, 2)
    sim.step(a)
    sim.step(b)
    assert sim.t.stage is Stage.OPTIMIZE
    sim.step(a)
    sim.leave(b)  # never answers its optimize
    assert sim.t.stage is Stage.SHARE
    sim.run()
    assert sim.finished
    sim.check_vectors()


def test_missed_heartbeat_and_missed_deadline_remove_workers() -> None:
    sim = Sim(population_size=4, worker_timeout=2.0, straggler_reissue=False)
    a, b = started(sim, 2, 2)
    sim.step(a)  # a is idle now
    b.hung = True
    sim.advance(1.5)  # a heartbeats, b does not; both still inside the timeout
    assert len(sim.t.workers) == 2
    sim.advance(1.0)
    assert b.id not in sim.t.workers and b.closed
    assert sim.left[-1].reason == "missed heartbeat" and sim.left[-1].returned_members == 2
    ev = only(a, core.Evaluate)
    assert isinstance(ev, core.Evaluate) and ev.slices == ((2, 4),)
    # a keeps heartbeating but never finishes the task: removed at the task deadline.
    sim.advance(1.0)
    sim.advance(0.9)
    assert a.id in sim.t.workers
    sim.advance(0.2)
    assert a.id not in sim.t.workers
    assert sim.left[-1].reason == "evaluate task deadline missed"


def test_straggler_reissue_first_result_wins() -> None:
    sim = Sim(population_size=4, worker_timeout=100.0, straggler_min_seconds=1.0, max_epochs=2)
    a, b = started(sim, 2, 2)
    slow = b.inbox[-1]
    assert isinstance(slow, core.Evaluate) and slow.slices == ((2, 4),)
    sim.step(a)  # a done with [0, 2): idle, nothing left on the stack
    assert kinds(a) == []
    sim.advance(0.5)
    assert kinds(a) == []  # b is not late yet
    sim.advance(1.0)
    dup = only(a, core.Evaluate)
    assert isinstance(dup, core.Evaluate) and dup.slices == ((2, 4),)
    sim.step(a)  # the copy wins
    assert sim.t.stage is Stage.OPTIMIZE
    recorded = sim.t.rewards.copy()
    sim.step(b)  # the late original: accepted, discarded
    assert np.array_equal(sim.t.rewards, recorded)
    sim.run()
    sim.check_vectors()


def test_straggler_reissue_can_be_disabled() -> None:
    sim = Sim(population_size=4, straggler_reissue=False, straggler_min_seconds=0.0)
    a, b = started(sim, 2, 2)
    sim.step(a)
    sim.advance(5.0)
    assert kinds(a) == []
    del b


def test_restored_snapshot_continues_and_finished_stays_finished() -> None:
    t = Training(CoreConfig(population_size=4, max_epochs=5), snapshot=TrainingSnapshot(3, b"S3"))
    assert t.epoch == 3 and t.stage is Stage.EVALUATE and t.state == b"S3"
    t = Training(CoreConfig(population_size=4, max_epochs=5), snapshot=TrainingSnapshot(6, b"S6"))
    assert t.finished and t.epoch == 5
    # A larger max_epochs continues a finished training.
    t = Training(CoreConfig(population_size=4, max_epochs=9), snapshot=TrainingSnapshot(6, b"S6"))
    assert not t.finished and t.epoch == 6


# ---------------------------------------------------------------------- property test

OPS = st.sampled_from(
    ["join", "leave", "step", "step", "step", "others", "others", "hang", "tick", "bad"]
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    pop=st.integers(1, 40),
    max_slices=st.integers(0, 3),
    reissue=st.booleans(),
    straggler_after=st.sampled_from([0.0, 0.5]),
)
def test_random_interleavings_count_every_member_exactly_once(
    data: st.DataObject, pop: int, max_slices: int, reissue: bool, straggler_after: float
) -> None:
    sim = Sim(
        population_size=pop,
        max_epochs=0,
        worker_timeout=2.0,
        max_slices_per_eval=max_slices,
        straggler_reissue=reissue,
        straggler_min_seconds=straggler_after,
    )
    sim.join(data.draw(st.integers(1, pop + 2), label="cores"))
    for _ in range(data.draw(st.integers(0, 80), label="ops")):
        op = data.draw(OPS)
        live = sim.live()
        if op == "join" or not live:
            sim.join(data.draw(st.integers(1, pop + 2)))
        elif op == "leave":
            sim.leave(data.draw(st.sampled_from(live)))
        elif op == "step":
            sim.step(data.draw(st.sampled_from(live)))
        elif op == "others":  # everyone but one slow worker makes progress
            slow = data.draw(st.sampled_from(live))
            for w in live:
                if w is not slow:
                    sim.step(w)
        elif op == "hang":
            data.draw(st.sampled_from(live)).hung = True
        elif op == "tick":
            sim.advance(data.draw(st.sampled_from([0.1, 0.6, 2.5])))
        elif op == "bad":
            w = data.draw(st.sampled_from(live))
            task = w.inbox[0] if w.inbox else None
            if isinstance(task, core.Evaluate):
                s, e = task.slices[0]
                recorded = sim.t.recorded_members
                with pytest.raises(core.CoreError):
                    sim.t.finish_evaluation(w.id, task.task_id, [(s, e, [0.0] * (e - s + 1))], 0)
                assert sim.t.recorded_members == recorded
    # Liveness: with one healthy worker staying, epochs keep completing.
    epochs_before = len(sim.epochs)
    sim.join(data.draw(st.integers(1, pop + 2)))
    for _ in range(200):
        sim.run(dt=0.05, until_epochs=epochs_before + 2)
        if len(sim.epochs) >= epochs_before + 2:
            break
        sim.advance(2.5)  # lets hung workers time out
    assert len(sim.epochs) >= epochs_before + 2, (sim.t.stage, sim.t.epoch)
    sim.check_vectors()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    pop=st.integers(2, 30),
    cores=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    max_slices=st.integers(0, 2),
)
def test_random_order_with_eager_reissue_first_result_wins(
    data: st.DataObject, pop: int, cores: list[int], max_slices: int
) -> None:
    # Re-issue without delay: every idle worker gets copies, answers race in random order.
    sim = Sim(
        population_size=pop,
        max_epochs=3,
        max_slices_per_eval=max_slices,
        straggler_min_seconds=0.0,
        straggler_factor=0.0,
    )
    workers = [sim.join(c) for c in cores]
    for _ in range(2000):
        busy = [w for w in workers if w.inbox and not w.closed]
        if not busy:
            break
        sim.step(data.draw(st.sampled_from(busy)))
        if data.draw(st.booleans()):
            sim.advance(0.01)
    assert sim.finished
    sim.check_vectors()


def test_late_calls_after_the_finish_are_stale_not_intruders() -> None:
    sim = Sim(population_size=4, max_epochs=1, straggler_min_seconds=0.0, straggler_factor=0.0)
    a, b = started(sim, 2, 2)
    late = b.inbox[-1]
    assert isinstance(late, core.Evaluate)
    b.hung = True  # b is busy with its evaluation until after the end
    sim.run()  # a does everything (b's slices re-issued to a); the training ends
    assert sim.finished and b.closed and kinds(b)[-1] is core.Stop
    t = sim.t
    assert t.authenticate(b.token or "") == b.id
    assert t.outstanding_results(sim.now) == 1  # b still owes its evaluation
    assert t.heartbeat(b.id, 1, sim.now) == []  # harmless, accepted
    rewards = t.rewards.copy()
    # Accepted and discarded: the straggler's client ends normally, nothing changes.
    assert t.finish_evaluation(b.id, late.task_id, [(2, 4, [99.0, 99.0])], sim.now) == []
    assert t.outstanding_results(sim.now) == 0
    assert (t.rewards == rewards).all() and t.finished
    with pytest.raises(core.Unauthenticated):
        t.authenticate("forged")
    del a


def test_memory_stays_flat_over_many_epochs_with_churn() -> None:
    import tracemalloc

    sim = Sim(population_size=10_000, max_epochs=0, worker_timeout=5.0)
    sim.track = sim.check = False  # per-member bookkeeping would dominate the run
    rng = np.random.default_rng(3)
    for _ in range(64):
        sim.join(int(rng.integers(100, 300)))
    sizes = []
    tracemalloc.start()
    try:
        for epoch in range(1, 201):
            sim.run(dt=0.001, until_epochs=1)  # sim.epochs is cleared below
            if epoch % 4 == 0:  # churn: four workers go, four come
                for w in rng.choice(sim.live(), 4, replace=False):
                    sim.leave(w)
                for _ in range(4):
                    sim.join(int(rng.integers(100, 300)))
            # Keep the simulation's own records from growing (they are not the server's).
            sim.optimize_vectors.clear()
            sim.first.clear()
            sim.epochs.clear()
            sim.left.clear()
            for w in list(sim.workers.values()):
                if w.closed:
                    del sim.workers[w.id]
            if epoch in (50, 200):
                sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert sim.t.epoch == 201
    assert sizes[1] - sizes[0] < 512 * 1024, sizes


def test_short_timeouts_still_allow_two_heartbeat_intervals() -> None:
    sim = Sim(population_size=4, worker_timeout=1.0, straggler_reissue=False)
    a, b = started(sim, 4, 4)  # a holds every member; b idle
    assert b.inbox == [] and sim.t.heartbeat_interval == 1
    sim.t.heartbeat(b.id, 2, 0.0)  # the sim sent heartbeat 1 right after hello
    sim.apply(sim.t.tick(1.5))  # 1.5 s without a heartbeat: within two 1 s intervals
    assert b.id in sim.t.workers
    sim.apply(sim.t.tick(2.01))
    assert b.id not in sim.t.workers
    assert [x.reason for x in sim.left if x.worker_id == b.id] == ["missed heartbeat"]
    del a


def test_a_missed_deadline_stretches_the_next_ones_so_a_lone_slow_worker_gets_through() -> None:
    # One worker whose evaluation takes 3 s against a 2 s worker_timeout: without the stretch
    # it rejoins, gets the same slice with the same deadline and misses it again, forever.
    sim = Sim(population_size=4, worker_timeout=2.0, straggler_reissue=False, max_epochs=3)
    (a,) = started(sim, 2)
    assert sim.t.task_timeout("evaluate") == 2.0
    sim.advance(1.5)
    sim.advance(1.0)  # 2.5 s: the first evaluation missed its deadline
    assert a.id not in sim.t.workers
    left = sim.left[-1]
    assert (left.cause, left.missed_kind, left.next_deadline_s) == ("timeout", "evaluate", 4.0)
    b = sim.join(2)  # the same process, rejoined
    sim.step(b)  # hello
    ev = only(b, core.Evaluate)
    assert isinstance(ev, core.Evaluate) and ev.epoch == 1 and ev.slices[0][0] == 0
    sim.advance(1.5)
    sim.advance(1.5)  # 3 s into its task: inside the stretched deadline of 4 s
    assert b.id in sim.t.workers
    sim.step(b)  # the evaluation, 3 s after it was assigned
    assert sim.t.task_timeout("evaluate") == 4.0  # 3 s does not fit in half of 2 s
    # A quick task shrinks the stretch back: 0.5 s fits in half of 2 s.
    sim.advance(0.5)
    assert isinstance(b.inbox[0], core.Evaluate)
    sim.step(b)
    assert sim.t.task_timeout("evaluate") == 2.0
    sim.run()
    assert sim.finished and len(sim.epochs) == 3
    sim.check_vectors()


def test_the_deadline_stretch_is_capped() -> None:
    sim = Sim(population_size=2, worker_timeout=1.0, straggler_reissue=False)
    (a,) = started(sim, 1)
    timeouts = []
    for _ in range(core.MAX_DEADLINE_STRETCH + 2):
        sim.advance(sim.t.task_timeout("evaluate") + 0.1)  # heartbeats go on; the task never ends
        assert a.id not in sim.t.workers
        timeouts.append(sim.left[-1].next_deadline_s)
        a = sim.join(1)
        sim.step(a)  # hello, then an evaluate task with the stretched deadline
    assert timeouts == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]


def test_workers_missing_the_same_deadline_together_stretch_it_once() -> None:
    # Every worker too slow for the deadline: four misses of the same 1x deadline in one
    # tick make it 2x, not 16x (a hung worker would otherwise hold its slices for 16x).
    sim = Sim(population_size=8, worker_timeout=2.0, straggler_reissue=False)
    workers = started(sim, 1, 1, 1, 1)
    assert all(isinstance(w.inbox[-1], core.Evaluate) for w in workers)
    sim.advance(2.5)
    assert not sim.t.workers
    assert [c.next_deadline_s for c in sim.left[-4:]] == [4.0] * 4
    assert sim.t.task_timeout("evaluate") == 4.0
