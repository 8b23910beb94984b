"""Worker processes killed with SIGKILL at random moments (fixed schedule) and new ones
joining: the training ends exactly as a fault-free one, every reward counted once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys

import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from tests.server.helpers import REPO, run
from tests.server.workers import History, expected, reward

pytestmark = pytest.mark.timeout(120)


def spawn(address: str, cores: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.server.chaos_worker", address, str(cores)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigkilled_workers_change_nothing() -> None:
    population, epochs = 48, 25
    summaries: list[EpochSummary] = []
    kills = 0

    async def scenario() -> None:
        nonlocal kills
        rng = random.Random(2024)
        config = ServerConfig(population_size=population, max_epochs=epochs, worker_timeout=3)
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            procs = [spawn(server.address, rng.choice([5, 8, 13])) for _ in range(3)]
            try:
                while not server.finished:
                    await asyncio.sleep(rng.uniform(0.2, 0.6))
                    live = [p for p in procs if p.poll() is None]
                    if server.finished or not live:
                        break
                    if kills < 6 and server.epoch >= 2:
                        victim = rng.choice(live)
                        victim.send_signal(signal.SIGKILL)
                        kills += 1
                        procs.append(spawn(server.address, rng.choice([5, 8, 13])))
                await server.wait_finished(timeout=60)
                state = server.state
                assert state is not None
                assert evochi.PickleZstdCodec([History]).decode(state) == expected(
                    population, epochs
                )
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                    p.wait(10)

    run(scenario(), timeout=110)
    assert kills >= 3
    assert [s.epoch for s in summaries] == list(range(1, epochs + 1))
    state = History()
    for s in summaries:
        assert s.rewards.tolist() == [reward(state, m) for m in range(population)]
        state = History([*state.sums, sum(reward(state, m) for m in range(population))])
