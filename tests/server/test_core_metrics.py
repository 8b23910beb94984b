"""The per-member metrics extension in the pure core: recording, first result wins,
validation that changes nothing, the per-training name bound."""

from __future__ import annotations

import numpy as np
import pytest

from evochi.server import core
from evochi.server.core import CoreConfig, Training
from evochi.v1.metrics import MAX_METRICS


def sent(commands: list[core.Command], worker_id: str, kind: type) -> core.Event:
    events = [c.event for c in commands if isinstance(c, core.Send) and c.worker_id == worker_id]
    matching = [e for e in events if isinstance(e, kind)]
    assert len(matching) == 1, events
    return matching[0]


def summary_of(commands: list[core.Command]) -> core.EpochSummary:
    (done,) = [c for c in commands if isinstance(c, core.EpochCompleted)]
    return done.summary


def rewards(s: int, e: int) -> list[float]:
    return [float(m) for m in range(s, e)]


def finish_epoch(t: Training, workers: list[str], now: float) -> core.EpochSummary:
    """Every worker optimizes; the first one shares; returns the epoch's summary."""
    out: list[core.Command] = []
    for w in workers:
        task = t.workers[w].task
        assert task is not None and task.kind == "optimize", task
        out += t.finish_optimization(w, task.id, now)
    share = next(w for w in t.workers.values() if w.task and w.task.kind == "share_state")
    assert share.task is not None
    out += t.finish_share_state(share.id, share.task.id, b"next", now)
    t.check_invariants()
    return summary_of(out)


def join(t: Training, cores: int, now: float) -> tuple[str, list[core.Command]]:
    """A worker that joins and proves it reads its stream (heartbeat 1), as real clients do:
    the core hands work only to such workers."""
    w, out = t.join(cores, now)
    return w, out + t.heartbeat(w, 1, now)


def started(pop: int, cores: int, **config: object) -> tuple[Training, str, core.Evaluate]:
    t = Training(CoreConfig(population_size=pop, worker_timeout=100.0, **config))  # type: ignore[arg-type]
    w, out = join(t, cores, 0.0)
    init = sent(out, w, core.Initialize)
    out = t.finish_initialization(w, init.task_id, b"S1", 0.0)
    return t, w, sent(out, w, core.Evaluate)  # type: ignore[return-value]


def test_re_issued_members_keep_the_metrics_of_the_first_result() -> None:
    t, b, original = started(4, 4, straggler_min_seconds=1.0)
    assert original.slices == ((0, 4),)
    a, _ = join(t, 2, 0.0)
    copy = sent(t.tick(1.5), a, core.Evaluate)  # b is late: a gets a copy of [0, 2)
    assert copy.slices == ((0, 2),)
    t.finish_evaluation(a, copy.task_id, [(0, 2, rewards(0, 2), [("env_steps", [1, 2])])], 1.6)
    t.check_invariants()
    late = [(0, 4, rewards(0, 4), [("env_steps", [10, 20, 30, 40]), ("bd", [5, 6, 7, 8])])]
    t.finish_evaluation(b, original.task_id, late, 1.7)
    summary = finish_epoch(t, [a, b], 2.0)
    np.testing.assert_array_equal(summary.member_metrics["env_steps"], [1, 2, 30, 40])
    np.testing.assert_array_equal(summary.member_metrics["bd"], [np.nan, np.nan, 7, 8])
    assert summary.metrics == {"env_steps": 73.0, "bd": 15.0}
    assert summary.metric_members == {"env_steps": 4, "bd": 2}
    assert summary.metric_exact("env_steps") and not summary.metric_exact("bd")


def test_a_rejected_result_records_nothing_and_registers_no_name() -> None:
    t, w, ev = started(4, 2)
    assert ev.slices == ((0, 2),)
    bad = [(0, 2, rewards(0, 2), [("fresh_name", [1, 2]), ("env_steps", [1])])]
    with pytest.raises(core.InvalidArgument, match="needs 2 values of metric 'env_steps'"):
        t.finish_evaluation(w, ev.task_id, bad, 0.1)
    t.check_invariants()
    assert t.recorded_members == 0 and t._metric_names == {}
    # All MAX_METRICS names are still free: nothing of the rejected request was kept.
    names = [(f"m{i}", [1.0, 1.0]) for i in range(MAX_METRICS)]
    out = t.finish_evaluation(w, ev.task_id, [(0, 2, rewards(0, 2), names)], 0.2)
    ev2 = sent(out, w, core.Evaluate)
    # The bound is per training: a 17th name is refused later too, known names are fine.
    with pytest.raises(core.InvalidArgument, match="at most 16 names"):
        t.finish_evaluation(w, ev2.task_id, [(2, 4, rewards(2, 4), [("m_new", [1, 1])])], 0.3)
    t.finish_evaluation(w, ev2.task_id, [(2, 4, rewards(2, 4), [("m3", [2, 2])])], 0.3)
    summary = finish_epoch(t, [w], 0.4)
    assert summary.metric_members == {f"m{i}": 2 if i != 3 else 4 for i in range(MAX_METRICS)}
    assert summary.metrics["m3"] == 6.0


def test_metrics_reset_every_epoch() -> None:
    t, w, ev = started(2, 2, max_epochs=3)
    t.finish_evaluation(w, ev.task_id, [(0, 2, rewards(0, 2), [("env_steps", [3, 4])])], 0.1)
    first = finish_epoch(t, [w], 0.2)
    task = t.workers[w].task
    assert task is not None
    t.finish_evaluation(w, task.id, [(0, 2, rewards(0, 2))], 0.3)  # no metrics this epoch
    second = finish_epoch(t, [w], 0.4)
    assert first.metrics == {"env_steps": 7.0} and second.metrics == {}
    assert not first.member_metrics["env_steps"].flags.writeable


def test_a_joiner_during_the_last_share_stops_with_the_final_state() -> None:
    # B joins while A shares the last epoch's state and has not heartbeated when the training
    # ends: its hello held the last epoch's start state, so it must get that epoch's optimize
    # before its stop (else its copy of the state ends one epoch behind everyone else's).
    t, a, evaluate = started(2, 2, max_epochs=1)
    out = t.finish_evaluation(a, evaluate.task_id, [(0, 2, rewards(0, 2), [])], 0.1)
    optimize = sent(out, a, core.Optimize)
    out = t.finish_optimization(a, optimize.task_id, 0.2)
    share = sent(out, a, core.ShareState)
    b, out = t.join(2, 0.3)  # no heartbeat yet
    assert sent(out, b, core.Hello).state == b"S1"
    out = t.finish_share_state(a, share.task_id, b"S2", 0.4)
    events = [c.event for c in out if isinstance(c, core.Send) and c.worker_id == b]
    kinds = [type(e) for e in events]
    assert kinds == [core.Optimize, core.Stop], kinds
    assert events[0].epoch == 1 and list(events[0].rewards) == rewards(0, 2)
    assert not [c for c in out if isinstance(c, core.Send) and c.worker_id == a
                and isinstance(c.event, core.Optimize)]  # fmt: skip
    # Its late FinishOptimization is accepted and discarded.
    assert t.finish_optimization(b, events[0].task_id, 0.5) == []
