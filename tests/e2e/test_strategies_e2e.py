"""Every strategy keeps the distributed guarantees of OpenAI-ES (whose own tests are in
test_torch_worker_e2e.py and test_chaos.py): one worker, and several workers with other
thread counts, SIGKILLed at every phase or joining late, or a SIGKILLed and restarted
server, end byte-identical, and every member's reward depends only on (seed, epoch, member)."""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest
import torch
from standalone import train_with_server_crash
from toy_workers import ToyRegression

from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi_torch import TorchESState
from evochi_torch.codec import decode_state
from evochi_torch.launch import WorkerProcesses, WorkerSpec

EPOCHS = 6
POPULATION = 24
# "<strategy>+lowrank": the strategy with rank-1 perturbations of the weight matrices.
STRATEGIES = ["pgpe", "snes", "sep_cma", "ars", "cem", "openai_es+lowrank", "ars+lowrank"]


def config_for(name: str):
    strategy, _, perturbation = name.partition("+")
    config = ToyRegression.default_config.replace(strategy=strategy)
    return config.replace(perturbation=perturbation) if perturbation else config


def run(coro, timeout: float = 150.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


def spec(strategy: str, die_at: str = "", cores: int = 5, threads: int = 1) -> WorkerSpec:
    config = config_for(strategy)
    kwargs = {"config": config, **({"die_at": die_at} if die_at else {})}
    return WorkerSpec("toy_workers:DiesAt", cores=cores, kwargs=kwargs, threads=threads,
                      reconnect=False)  # fmt: skip


def single_process(strategy: str) -> tuple[TorchESState, dict[int, np.ndarray]]:
    """The same training without server or processes: the worker's own hooks in a loop."""
    config = config_for(strategy)
    worker = ToyRegression("127.0.0.1:1", cores=POPULATION, config=config)
    worker.adopt_state(worker.initialize())
    rewards = {}
    for epoch in range(1, EPOCHS + 1):
        evals = worker.evaluate(epoch, [slice(0, POPULATION)])
        rewards[epoch] = np.asarray([r for ev in evals for r in ev.rewards], dtype=np.float64)
        worker.adopt_state(worker.optimize(epoch, rewards[epoch].tolist()))
    return worker.state, rewards


async def train(strategy: str) -> tuple[TorchESState, dict[int, np.ndarray], int]:
    rewards: dict[int, np.ndarray] = {}

    def record(summary: EpochSummary) -> None:
        assert summary.epoch not in rewards, "an epoch completed twice"
        rewards[summary.epoch] = summary.rewards.copy()

    # worker_timeout bounds how long a killed worker's task can stay assigned (generous:
    # the machine may be loaded).
    config = ServerConfig(population_size=POPULATION, max_epochs=EPOCHS, worker_timeout=10.0)
    groups = []
    async with EmbeddedServer(config, on_epoch=record) as server:
        try:
            # The first worker initializes the training and dies in the first update, so at
            # least one SIGKILL is certain; the others join meanwhile.
            for point, cores in (("optimize:0", 3), ("", 5), ("evaluate:2", 3)):
                groups.append(WorkerProcesses(spec(strategy, point, cores=cores),
                                              server.address, ["cpu"]).start())  # fmt: skip
            while server.epoch < 3 and not server.finished:
                await asyncio.sleep(0.01)
            groups.append(WorkerProcesses(spec(strategy, threads=2), server.address,
                                          ["cpu"]).start())  # fmt: skip
            await server.wait_finished()
            state = server.state
        finally:
            for group in groups:
                group.poll()
                group.stop()
    killed = sum(e.exitcode == -signal.SIGKILL for g in groups for e in g.exits)
    return decode_state(state), rewards, killed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_training_with_kills_and_late_joiner_equals_one_process(strategy) -> None:
    ref, ref_rewards = single_process(strategy)
    got, rewards, killed = run(train(strategy), timeout=280)
    assert killed >= 1  # the first worker's death in the first update is certain
    assert ref.config == got.config == config_for(strategy)
    assert ref.epoch == got.epoch == EPOCHS
    assert torch.equal(ref.params, got.params)
    assert ref.opt_state.keys() == got.opt_state.keys()
    for key in ref.opt_state:
        assert torch.equal(ref.opt_state[key], got.opt_state[key]), key
    assert sorted(rewards) == sorted(ref_rewards) == list(range(1, EPOCHS + 1))
    for epoch, expected in ref_rewards.items():
        np.testing.assert_array_equal(rewards[epoch], expected)
    initial = ToyRegression("127.0.0.1:1", cores=1).initialize()
    assert not torch.equal(ref.params, initial.params)  # it moved


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_server_restart_changes_no_bit(strategy, tmp_path, unused_port) -> None:
    """The strategy state travels in the training state, which the server stores opaquely:
    SIGKILL the standalone server mid-training, restart it from its --state-dir, and the
    reconnecting workers end with the single-process bits."""
    ref, _ = single_process(strategy)
    config = config_for(strategy)
    reconnecting = WorkerSpec("toy_workers:DiesAt", cores=7, threads=1, reconnect=True,
                              kwargs={"config": config})  # fmt: skip
    stored = run(
        train_with_server_crash(reconnecting, population=POPULATION, epochs=EPOCHS,
                                port=unused_port, state_dir=tmp_path / "training",
                                crash_after_epoch=3),
        timeout=280,
    )  # fmt: skip
    got = decode_state(stored)
    assert got.config == config_for(strategy) and got.epoch == EPOCHS
    assert torch.equal(ref.params, got.params)
    assert ref.opt_state.keys() == got.opt_state.keys()
    for key in ref.opt_state:
        assert torch.equal(ref.opt_state[key], got.opt_state[key]), key
