"""Faults change nothing: SIGKILLed workers, late joiners and a restarted server give the
same bits as a fault-free run, and every member's reward is counted exactly once."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from standalone import train_with_server_crash

from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi_torch import TorchESState
from evochi_torch.codec import decode_state
from evochi_torch.launch import WorkerProcesses, WorkerSpec

EPOCHS = 10
POPULATION = 24


def run(coro, timeout: float = 180.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


def spec(die_at: str = "", cores: int = 5) -> WorkerSpec:
    kwargs = {"die_at": die_at} if die_at else {}
    return WorkerSpec("toy_workers:DiesAt", cores=cores, kwargs=kwargs, threads=1, reconnect=False)


async def reference() -> tuple[TorchESState, dict[int, np.ndarray]]:
    rewards: dict[int, np.ndarray] = {}

    def record(summary: EpochSummary) -> None:
        rewards[summary.epoch] = summary.rewards.copy()

    config = ServerConfig(population_size=POPULATION, max_epochs=EPOCHS, worker_timeout=30.0)
    async with EmbeddedServer(config, on_epoch=record) as server:
        with WorkerProcesses(spec(), server.address, ["cpu"]):
            await server.wait_finished()
        return decode_state(server.state), rewards


def assert_same(a: TorchESState, b: TorchESState) -> None:
    assert a.epoch == b.epoch == EPOCHS
    assert torch.equal(a.params, b.params)
    for key in a.opt_state:
        assert torch.equal(a.opt_state[key], b.opt_state[key]), key


@pytest.fixture(scope="module")
def fault_free() -> tuple[TorchESState, dict[int, np.ndarray]]:
    return run(reference())


@pytest.mark.timeout(300)
def test_sigkill_at_every_phase_and_churn_change_nothing(fault_free) -> None:
    ref_state, ref_rewards = fault_free
    # Doomed workers each SIGKILL themselves at one point of the protocol; fault-free
    # workers join late at random epochs (fixed seed).
    doomed = ["optimize:2", "evaluate:1", "share:3", "evaluate:4", "optimize:6", "share:5",
              "evaluate:7", "share:8"]  # fmt: skip
    late_joins = sorted(random.Random(1234).sample(range(2, 9), 3))

    async def chaos() -> tuple[TorchESState, dict[int, np.ndarray]]:
        rewards: dict[int, np.ndarray] = {}

        def record(summary: EpochSummary) -> None:
            assert summary.epoch not in rewards, "an epoch completed twice"
            rewards[summary.epoch] = summary.rewards.copy()

        # worker_timeout bounds how long a killed worker's task can stay assigned.
        config = ServerConfig(population_size=POPULATION, max_epochs=EPOCHS, worker_timeout=3.0)
        groups = []
        async with EmbeddedServer(config, on_epoch=record) as server:
            try:
                # The first worker dies while initializing; the others join meanwhile.
                groups.append(WorkerProcesses(spec("initialize"), server.address, ["cpu"]).start())
                # Joined, so it holds the initialize task (a fixed head start is not enough
                # on a loaded machine: another worker could join first and initialize).
                while not server.service.core.workers:
                    await asyncio.sleep(0.01)
                for point in [*doomed, ""]:
                    groups.append(WorkerProcesses(spec(point, 3), server.address, ["cpu"]).start())
                for join_epoch in late_joins:
                    while server.epoch < join_epoch and not server.finished:
                        await asyncio.sleep(0.01)
                    groups.append(WorkerProcesses(spec(), server.address, ["cpu"]).start())
                await server.wait_finished()
                state = server.state
            finally:
                for group in groups:
                    group.poll()
                    group.stop()
        killed = [e for g in groups for e in g.exits if e.exitcode == -signal.SIGKILL]
        # initialize and both optimize deaths are certain (every worker optimizes); the
        # evaluate and share-state ones depend on which worker gets which task.
        assert len(killed) >= 3, f"only {len(killed)} workers were killed: {killed}"
        assert groups[0].exits[0].exitcode == -signal.SIGKILL  # died in initialize
        return decode_state(state), rewards

    state, rewards = run(chaos(), timeout=280)
    assert_same(state, ref_state)
    assert sorted(rewards) == list(range(1, EPOCHS + 1))
    for epoch, expected in ref_rewards.items():
        # The same reward for every member: nothing lost, nothing counted twice.
        np.testing.assert_array_equal(rewards[epoch], expected)


@pytest.mark.timeout(300)
def test_server_restart_with_state_dir_loses_nothing(
    fault_free, tmp_path: Path, unused_port
) -> None:
    ref_state, _ = fault_free
    reconnecting = WorkerSpec("toy_workers:DiesAt", cores=7, threads=1, reconnect=True)
    stored = run(
        train_with_server_crash(reconnecting, population=POPULATION, epochs=EPOCHS,
                                port=unused_port, state_dir=tmp_path / "training",
                                crash_after_epoch=4),
        timeout=280,
    )  # fmt: skip
    assert_same(decode_state(stored), ref_state)
