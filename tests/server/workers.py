"""A real ``evochi.v1.Worker`` whose result depends on every reward and every state."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import evochi.v1 as evochi
from evochi.server import EmbeddedServer


@dataclass
class History:
    sums: list[float] = field(default_factory=list)


def reward(state: History, member: int) -> float:
    return float(len(state.sums) * 1000 + member)


def expected(population: int, epochs: int) -> History:
    state = History()
    for _ in range(epochs):
        state = History([*state.sums, sum(reward(state, m) for m in range(population))])
    return state


class HistoryWorker(evochi.Worker[History]):
    def __init__(self, address: str, cores: int, **kw: object) -> None:
        super().__init__(address, cores, **kw)  # type: ignore[arg-type]
        self.evaluated: list[tuple[int, int, int]] = []
        self.optimized: list[int] = []
        self.in_evaluate = asyncio.Event()
        self.in_optimize = asyncio.Event()
        self.loop = asyncio.get_event_loop_policy().get_event_loop()
        self.evaluate_delay = 0.0
        self.gate = threading.Event()  # set: a delayed hook returns at once
        self.optimize_delay = 0.0
        self.stopped = False

    def initialize(self) -> History:
        return History()

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        self.loop.call_soon_threadsafe(self.in_evaluate.set)
        self.gate.wait(self.evaluate_delay)
        self.evaluated += [(epoch, s.start, s.stop) for s in slices]
        return [
            evochi.Eval(s, [reward(self.state, m) for m in range(s.start, s.stop)]) for s in slices
        ]

    def optimize(self, epoch: int, rewards: list[float]) -> History:
        self.loop.call_soon_threadsafe(self.in_optimize.set)
        self.gate.wait(self.optimize_delay)
        self.optimized.append(epoch)
        return History([*self.state.sums, sum(rewards)])

    def on_stop(self, cancel: object) -> None:
        self.stopped = True


def make(server: EmbeddedServer, cores: int, **kw: object) -> HistoryWorker:
    w = HistoryWorker(server.address, cores, **kw)
    w.loop = asyncio.get_running_loop()
    return w
