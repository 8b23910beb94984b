"""Load with churn: many workers leaving and joining while every reward is checked.

    python -m benchmarks.load [--workers 64] [--epochs 500] [--population 10000] [--churn-every 5]

Every reward is a known function of (epoch, member), so each worker checks the whole reward
vector it receives in optimize: a member missing (lost) or added twice (duplicated) is counted.
Every `--churn-every` epochs a quarter of the workers leave (some abruptly, mid-task) and as
many new ones join. Last line:
`load workers=64 epochs=500 population=10000 lost=0 duplicated=0 rss_growth_mb=...`
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig


def expected_rewards(epoch: int, population: int) -> np.ndarray:
    # Integers below 2**24 are exact in float32, the wire type of rewards.
    return ((epoch * 100_003 + np.arange(population)) % 16_000_000).astype(np.float32)


@dataclass
class Ledger:
    """What the workers saw, across all of them."""

    population: int
    lost: int = 0
    duplicated: int = 0
    checked: set[int] = field(default_factory=set)

    def check(self, epoch: int, rewards: list[float]) -> None:
        if epoch in self.checked:
            return
        self.checked.add(epoch)
        got = np.asarray(rewards, dtype=np.float32)
        want = expected_rewards(epoch, self.population)
        if got.shape != want.shape:
            self.lost += abs(got.size - want.size)
            return
        wrong = got != want
        doubled = wrong & (got == 2 * want) & (want != 0)
        self.duplicated += int(doubled.sum())
        self.lost += int((wrong & ~doubled).sum())


class CheckingWorker(evochi.Worker[dict]):
    def __init__(self, address: str, cores: int, ledger: Ledger) -> None:
        super().__init__(address, cores)
        self.ledger = ledger

    # Coroutine hooks: with 64 workers in one process, thread hops would dominate.
    async def initialize(self) -> dict:
        return {"epochs": 0}

    async def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        want = expected_rewards(epoch, self.population_size)
        return [evochi.Eval(s, want[s.start : s.stop].tolist()) for s in slices]

    async def optimize(self, epoch: int, rewards: list[float]) -> dict:
        self.ledger.check(epoch, rewards)
        return {"epochs": self.state["epochs"] + 1}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


async def run_load(
    workers: int, epochs: int, population: int, churn_every: int, seed: int = 0
) -> dict[str, float]:
    """Runs the load scenario; returns lost, duplicated, rss growth, epochs/s."""
    ledger = Ledger(population)
    rng = random.Random(seed)
    cores = -(-population // workers)
    progress = asyncio.Event()
    rss: dict[int, float] = {}

    def on_epoch(summary: EpochSummary) -> None:
        progress.set()
        if summary.epoch in (min(50, epochs // 2), epochs):
            rss[summary.epoch] = rss_mb()

    config = ServerConfig(population_size=population, max_epochs=epochs, worker_timeout=10.0)
    started = time.perf_counter()
    async with EmbeddedServer(config, on_epoch=on_epoch) as server:
        pool: dict[CheckingWorker, asyncio.Task[None]] = {}

        def join() -> None:
            worker = CheckingWorker(server.address, cores, ledger)
            pool[worker] = asyncio.create_task(worker.start())

        for _ in range(workers):
            join()
        last_churn = 0
        while not server.finished:
            try:
                await asyncio.wait_for(progress.wait(), timeout=30)
            except TimeoutError:
                raise RuntimeError(f"epoch {server.epoch} stuck for 30 s") from None
            progress.clear()
            if churn_every and server.epoch - last_churn >= churn_every and not server.finished:
                last_churn = server.epoch
                for worker in rng.sample(list(pool), max(1, workers // 4)):
                    # close() cancels whatever the worker is doing: mid-task departures.
                    task = pool.pop(worker)
                    await worker.close()
                    task.cancel()
                    join()
        for worker, task in pool.items():
            await asyncio.wait_for(task, 30)
            await worker.close()
    seconds = time.perf_counter() - started
    missing = epochs - len(ledger.checked)
    first = rss.get(min(50, epochs // 2), 0.0)
    return {
        "lost": ledger.lost + missing * population,
        "duplicated": ledger.duplicated,
        "rss_growth_mb": rss.get(epochs, first) - first,
        "epochs_per_s": epochs / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--churn-every", type=int, default=5, help="epochs between churns")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(run_load(args.workers, args.epochs, args.population, args.churn_every))
    print(
        f"load workers={args.workers} epochs={args.epochs} population={args.population} "
        f"lost={result['lost']} duplicated={result['duplicated']} "
        f"rss_growth_mb={result['rss_growth_mb']:.1f} epochs_per_s={result['epochs_per_s']:.1f}"
    )


if __name__ == "__main__":
    main()
