"""Work only for workers that prove they read their stream (the pure core).

A peer can subscribe and never read its stream (e.g. HTTP/2 streams with a zero receive
window): it never learns its token, never heartbeats, never evaluates. Work handed to it
would be held until the worker timeout, so the core gives work (initialize, evaluate,
optimize, share state) only after the first heartbeat, which carries the token from hello.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evochi.server import core
from evochi.server.config import explicit_settings, resolve_config
from evochi.server.core import Stage
from tests.server.sim import Sim, SimWorker

# Long enough that no fake ever times out within a test that must not wait for it.
NEVER = 10_000.0


def kinds(w: SimWorker) -> list[type]:
    return [type(e) for e in w.inbox]


def evaluating(sim: Sim, *cores: int) -> list[SimWorker]:
    """Honest workers joined, the first initialized: the training evaluates epoch 1."""
    workers = [sim.join(c) for c in cores]
    for w in workers:
        while w.inbox and not isinstance(w.inbox[0], core.Evaluate):
            sim.step(w)
    assert sim.t.stage is Stage.EVALUATE
    return workers


def test_first_worker_gets_initialize_only_after_its_first_heartbeat() -> None:
    sim = Sim(population_size=10, worker_timeout=7)
    w = sim.join(3, reads=False)
    assert kinds(w) == [core.Hello]
    hello = w.inbox[0]
    assert isinstance(hello, core.Hello) and hello.state is None
    sim.apply(sim.t.heartbeat(w.id, 1, 0.5))
    assert kinds(w) == [core.Hello, core.Initialize]


def test_a_silent_joiner_gets_no_slices_and_the_others_finish_the_epoch() -> None:
    sim = Sim(population_size=20, worker_timeout=NEVER, straggler_reissue=False)
    (a,) = evaluating(sim, 4)
    fake = sim.join(8, reads=False)
    b = sim.join(4)
    assert kinds(fake) == [core.Hello]  # its hello, nothing else
    sim.run(until_epochs=3)
    assert len(sim.epochs) == 3 and sim.now < NEVER
    assert kinds(fake) == [core.Hello]
    assert fake.id in sim.t.workers  # still waiting for its heartbeat deadline
    sim.check_vectors()
    del a, b


def test_a_silent_first_joiner_delays_initialization_until_its_deadline_only() -> None:
    sim = Sim(population_size=6, worker_timeout=4.0)
    fake = sim.join(3, reads=False)
    honest = sim.join(3)
    # A hello without state cannot be taken back: one candidate at a time gets one.
    assert kinds(fake) == [core.Hello] and honest.inbox == []
    sim.advance(4.5, heartbeat=False)
    assert fake.id not in sim.t.workers
    assert [x.reason for x in sim.left] == ["no heartbeat after hello"]
    assert sim.left[0].returned_members == 0 and sim.left[0].reassigned_task is None
    assert kinds(honest) == [core.Hello, core.Initialize]
    sim.run(until_epochs=2)
    assert len(sim.epochs) == 2


def test_silent_workers_are_removed_at_the_heartbeat_deadline() -> None:
    sim = Sim(population_size=8, worker_timeout=6.0)
    a, b = evaluating(sim, 4, 4)
    fakes = [sim.join(2, reads=False) for _ in range(50)]
    assert len(sim.t.workers) == 52
    # Honest workers keep training (and heartbeating), fakes do not: until the 6 s deadline.
    while sim.now < 5.5:
        sim.run(until_epochs=len(sim.epochs) + 1)
    assert len(sim.t.workers) == 52
    while sim.now < 6.5:
        sim.run(until_epochs=len(sim.epochs) + 1)
    assert set(sim.t.workers) == {a.id, b.id}
    removed = [x for x in sim.left if x.reason == "no heartbeat after hello"]
    assert sorted(x.worker_id for x in removed) == sorted(f.id for f in fakes)
    assert all(x.returned_members == 0 for x in removed)
    assert all(kinds(f) == [core.Hello] for f in fakes)


def test_a_late_heartbeat_gets_work_with_the_missed_optimize_steps_first() -> None:
    sim = Sim(population_size=4, worker_timeout=NEVER)
    evaluating(sim, 4)
    late = sim.join(4, reads=False)  # hello with epoch 1's start state
    sim.run(until_epochs=2)
    assert sim.t.epoch == 3 and kinds(late) == [core.Hello]
    late.reads, late.seq = True, 1
    sim.step(late)  # reads its hello now, then heartbeats
    sim.apply(sim.t.heartbeat(late.id, 1, sim.now))
    first = late.inbox[0]
    assert isinstance(first, core.Optimize) and first.epoch == 1
    sim.run(until_epochs=4)
    assert len(sim.epochs) == 4
    sim.check_vectors()


def test_the_rule_can_be_switched_off() -> None:
    sim = Sim(population_size=10, heartbeat_before_work=False)
    w = sim.join(3)
    assert kinds(w) == [core.Hello, core.Initialize]
    sim.step(w)
    sim.step(w)
    fake = sim.join(4, reads=False)
    assert kinds(fake) == [core.Hello, core.Evaluate]  # the old behaviour: work at once


def test_a_silent_joiner_in_the_last_epoch_is_removed_not_stopped() -> None:
    sim = Sim(population_size=4, max_epochs=1, worker_timeout=4.0)
    evaluating(sim, 4)
    fake = sim.join(4, reads=False)
    while not sim.finished:  # the end waits for its heartbeat, up to its deadline
        sim.advance(0.5)
        sim.run()
    assert kinds(fake) == [core.Hello] and fake.closed
    assert [x.reason for x in sim.left if x.worker_id == fake.id] == ["no heartbeat after hello"]
    with pytest.raises(core.Unauthenticated):
        sim.t.heartbeat(fake.id, 1, sim.now)


OPS = st.sampled_from(["join", "fake", "leave", "step", "hang", "tick", "prove"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pop=st.integers(1, 25), max_slices=st.integers(0, 2))
def test_random_interleavings_with_silent_workers(
    data: st.DataObject, pop: int, max_slices: int
) -> None:
    # Sim checks the core's invariants after every call, among them: no task of any kind
    # is ever held by a worker that has not heartbeated.
    sim = Sim(population_size=pop, worker_timeout=3.0, max_slices_per_eval=max_slices)
    for _ in range(data.draw(st.integers(0, 60), label="ops")):
        op = data.draw(OPS)
        live = sim.live()
        if op == "join" or not live:
            sim.join(data.draw(st.integers(1, pop + 2)))
        elif op == "fake":
            sim.join(data.draw(st.integers(1, pop + 2)), reads=False)
        elif op == "leave":
            sim.leave(data.draw(st.sampled_from(live)))
        elif op == "step":
            sim.step(data.draw(st.sampled_from(live)))
        elif op == "hang":
            data.draw(st.sampled_from(live)).hung = True
        elif op == "tick":
            sim.advance(data.draw(st.sampled_from([0.1, 1.0, 3.5])))
        elif op == "prove":  # a slow reader finally sends heartbeat 1
            w = data.draw(st.sampled_from(live))
            if w.seq == 0 and w.inbox and isinstance(w.inbox[0], core.Hello):
                w.seq, w.reads = 1, True
                sim.apply(sim.t.heartbeat(w.id, 1, sim.now))
    for w in sim.live():
        if not w.reads:
            assert all(isinstance(e, core.Hello | core.Stop) for e in w.inbox), w.inbox
    # Liveness: with fresh honest workers, epochs keep completing.
    epochs_before = len(sim.epochs)
    for _ in range(200):
        sim.join(data.draw(st.integers(1, pop + 2)))
        sim.run(dt=0.05, until_epochs=epochs_before + 2)
        if len(sim.epochs) >= epochs_before + 2:
            break
        sim.advance(3.5)  # lets hung (and silent) workers time out
    assert len(sim.epochs) >= epochs_before + 2, (sim.t.stage, sim.t.epoch)
    sim.check_vectors()


def test_the_rule_is_on_by_default_and_off_by_flag_or_environment() -> None:
    base = {"EVOCHI_POPULATION_SIZE": "4"}
    assert resolve_config(explicit_settings([], base)).heartbeat_before_work
    off = {**base, "EVOCHI_HEARTBEAT_BEFORE_WORK": "false"}
    assert not resolve_config(explicit_settings([], off)).heartbeat_before_work
    flag = ["--no-heartbeat-before-work"]
    assert not resolve_config(explicit_settings(flag, base)).heartbeat_before_work


def test_a_joiner_in_the_last_epoch_ends_with_the_final_state() -> None:
    # No later epoch would replay the last optimize step for it: the share waits for its
    # first heartbeat (here it comes after every member is recorded).
    sim = Sim(population_size=4, max_epochs=2, worker_timeout=8.0)
    (a,) = evaluating(sim, 4)
    sim.run(until_epochs=1)
    late = sim.join(2, reads=False)  # hello with epoch 2's start state
    sim.run()
    assert sim.t.stage is Stage.OPTIMIZE and not sim.finished  # waits for late
    late.reads, late.seq = True, 1
    sim.step(late)
    sim.apply(sim.t.heartbeat(late.id, 1, sim.now))
    assert kinds(late) == [core.Optimize]
    sim.run()
    assert sim.finished and a.state == late.state == b"S3"


def test_a_silent_joiner_delays_the_last_epoch_by_one_heartbeat_timeout_at_most() -> None:
    sim = Sim(population_size=4, max_epochs=2, worker_timeout=8.0)
    evaluating(sim, 4)
    sim.run(until_epochs=1)
    sim.join(2, reads=False)
    sim.run()
    started = sim.now
    assert not sim.finished
    while not sim.finished:
        sim.advance(0.5)
        sim.run()
    assert sim.now - started <= 8.5
