"""A worker whose update comes out with other bits (another CPU, BLAS or GPU) is caught by
its state digest and handed the shared state with its next task, so every epoch's members
are evaluated around one state. The core's rules in the simulator (which asserts, at every
evaluate and optimize, that the worker holds the epoch's shared start state), then the real
server with `evochi.v1.Worker` subclasses."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, ServerConfig, core
from tests.server.helpers import run
from tests.server.sim import Sim


def drifts_of(sim: Sim) -> list[core.StateDrift]:
    return [c for c in sim.history if isinstance(c, core.StateDrift)]


def test_a_drifting_worker_gets_the_shared_state_with_its_next_task() -> None:
    sim = Sim(population_size=6, max_epochs=4)
    workers = [sim.join(2) for _ in range(3)]
    drifter = workers[2]
    drifter.drifts = True
    sim.run()
    assert sim.finished and [s.epoch for s in sim.epochs] == [1, 2, 3, 4]
    # The sim asserted every evaluate and optimize ran on the epoch's shared start state.
    ids = {w.id for w in workers}
    for summary in sim.epochs:
        flagged = {d.worker_id for d in drifts_of(sim) if d.epoch == summary.epoch + 1}
        if summary.state.endswith(drifter.id.encode()):  # it shared: the others differ
            assert flagged == ids - {drifter.id}
        else:
            assert flagged == {drifter.id}
    # Each flag is repaired by the next task, except after the last epoch (there is none).
    last = {d.worker_id for d in drifts_of(sim) if d.epoch == 5}
    assert sum(w.repairs for w in workers) == len(drifts_of(sim)) - len(last)


def test_when_the_drifter_shares_the_others_take_its_state() -> None:
    sim = Sim(population_size=4, max_epochs=3)
    a = sim.join(4)
    sim.step(a)  # hello
    sim.step(a)  # initialize
    a.drifts = True  # the only worker for epoch 1: it shares its own bits
    sim.run(until_epochs=1)
    assert sim.epochs[0].state.endswith(a.id.encode())
    b = sim.join(4)
    sim.run()
    assert sim.finished and b.state is not None  # the sim checked it at each of its tasks
    for d in drifts_of(sim):
        assert d.expected in {s.state for s in sim.epochs}


def test_peers_without_digests_are_never_sent_a_state() -> None:
    sim = Sim(population_size=6, max_epochs=3)
    workers = [sim.join(2) for _ in range(3)]
    for w in workers:
        w.digests = False
    sim.run()
    assert sim.finished and not drifts_of(sim)
    assert all(w.repairs == 0 for w in workers)


@settings(max_examples=40, deadline=None)
@given(
    drifters=st.lists(st.booleans(), min_size=1, max_size=4),
    population=st.integers(2, 9),
    cores=st.integers(1, 5),
)
def test_any_mix_of_drifting_and_silent_workers_evaluates_around_one_state(
    drifters: list[bool], population: int, cores: int
) -> None:
    sim = Sim(population_size=population, max_epochs=3)
    for i, drifts in enumerate(drifters):
        w = sim.join(cores)
        w.digests = i % 3 != 2  # some peers speak no extension (never checked)
        w.drifts = drifts
    sim.run()
    # The sim asserted at every task that each digest-reporting worker held the shared state.
    assert sim.finished
    # Each flagged worker's digest differed from the shared one it was compared with.
    assert all(d.digest != d.expected and d.expected for d in drifts_of(sim))


# ---------------------------------------------------------------------- the real server


class Counter(evochi.Worker[dict]):
    """A toy training over the published client's codec: the state is a dict whose 'x' is
    updated from the rewards; `skew` adds a worker-specific rounding to each update."""

    def __init__(self, *args, skew: float = 0.0, seen: list | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skew = skew
        self.seen = seen if seen is not None else []

    def initialize(self) -> dict:
        return {"x": 0.0, "epoch": 0}

    def evaluate(self, epoch, slices):
        self.seen.append((self.state["epoch"], self.state["x"]))
        return [evochi.Eval(s, [float(m) for m in range(s.start, s.stop)]) for s in slices]

    def optimize(self, epoch, rewards):
        x = self.state["x"] + float(np.mean(rewards)) + self.skew
        return {"x": x, "epoch": self.state["epoch"] + 1}

    def state_digest(self, state: dict) -> bytes:
        return pickle.dumps((state["epoch"], state["x"]))


@pytest.mark.timeout(120)
def test_real_server_repairs_a_drifting_worker_and_counts_it(caplog) -> None:
    async def main() -> tuple[list, list, float | None]:
        config = ServerConfig(population_size=8, max_epochs=5, worker_timeout=10.0)
        async with EmbeddedServer(config) as server:
            good_seen: list = []
            bad_seen: list = []
            good = Counter(server.address, 4, seen=good_seen)
            bad = Counter(server.address, 4, skew=1e-9, seen=bad_seen)
            await asyncio.gather(good.start(), bad.start())
            repairs = server.metrics.registry.get_sample_value(
                "evochi_state_repairs_total", {"worker": bad.id}
            )
            return good_seen, bad_seen, repairs

    good_seen, bad_seen, repairs = run(main())
    assert repairs is not None and repairs >= 1
    by_epoch: dict[int, set[float]] = {}
    for epoch, x in good_seen + bad_seen:
        by_epoch.setdefault(epoch, set()).add(x)
    assert len(by_epoch) >= 4
    assert all(len(xs) == 1 for xs in by_epoch.values()), by_epoch
    assert "computed other bits than the shared state" in caplog.text
    assert "adopting the training's state" in caplog.text
