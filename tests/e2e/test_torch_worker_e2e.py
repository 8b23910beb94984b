"""TorchESWorker end to end: real server, real worker processes, real parameters."""

from __future__ import annotations

import asyncio

import pytest
import torch
from toy_workers import NaNAtMember3, ToyRegression, mse

from evochi.server import EmbeddedServer, ServerConfig
from evochi_torch import ESConfig, TorchESState
from evochi_torch.codec import decode_state
from evochi_torch.launch import WorkerProcesses, WorkerSpec

TARGET = "toy_workers:ToyRegression"
EPOCHS = 6


def run(coro, timeout: float = 120.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


async def train(groups: list[tuple[int, int, int]], epochs: int = EPOCHS) -> TorchESState:
    """Trains with worker groups (count, torch threads, epoch at which they join)."""
    config = ServerConfig(population_size=24, max_epochs=epochs, worker_timeout=30.0)
    async with EmbeddedServer(config) as server:
        started = []
        try:
            for count, threads, join_at in groups:
                while server.epoch < join_at:
                    await asyncio.sleep(0.01)
                spec = WorkerSpec(TARGET, cores=5, threads=threads, reconnect=False)
                started.append(WorkerProcesses(spec, server.address, ["cpu"] * count).start())
            await server.wait_finished()
            state = server.state
        finally:
            for procs in started:
                procs.stop()
    assert state is not None
    return decode_state(state)


def assert_identical(a: TorchESState, b: TorchESState) -> None:
    assert a.epoch == b.epoch
    assert torch.equal(a.params, b.params)  # bitwise, not allclose
    assert a.opt_state.keys() == b.opt_state.keys()
    for key in a.opt_state:
        assert torch.equal(a.opt_state[key], b.opt_state[key]), key


@pytest.mark.timeout(240)
def test_one_worker_and_three_workers_with_other_thread_counts_agree_bitwise() -> None:
    single = run(train([(1, 2, 0)]))
    several = run(train([(3, 1, 0)]))
    assert single.epoch == EPOCHS
    assert_identical(single, several)
    initial = ToyRegression("127.0.0.1:1", cores=1).initialize()
    assert mse(single.params) < 0.9 * mse(initial.params)  # it learns


@pytest.mark.timeout(240)
def test_workers_joining_mid_training_stay_in_lock_step() -> None:
    reference = run(train([(1, 1, 0)]))
    joined = run(train([(1, 1, 0), (2, 1, 3)]))
    assert_identical(reference, joined)


def test_population_mismatch_is_refused_at_hello() -> None:
    async def main() -> None:
        async with EmbeddedServer(ServerConfig(population_size=26, max_epochs=1)) as server:
            worker = ToyRegression(server.address, 8)
            with pytest.raises(ValueError, match="population size mismatch.*26.*24"):
                await worker.start()
            await worker.close()

    run(main())


def test_nan_rewards_name_the_member_or_get_the_penalty() -> None:
    async def main(config: ESConfig | None) -> NaNAtMember3:
        async with EmbeddedServer(ServerConfig(population_size=24, max_epochs=2)) as server:
            worker = NaNAtMember3(server.address, 24, config=config)
            try:
                await worker.start()
            finally:
                await worker.close()
            return worker

    with pytest.raises(ValueError, match="member 3: nan"):
        run(main(None))
    penalised = run(main(ToyRegression.default_config.replace(nan_penalty=-10.0)))
    assert penalised.state.epoch == 2


def test_a_worker_with_other_noise_refuses_to_join() -> None:
    from toy_workers import OtherNoise

    from evochi_torch import NoiseMismatchError

    async def main() -> None:
        async with EmbeddedServer(ServerConfig(population_size=24, max_epochs=3)) as server:
            first = ToyRegression(server.address, 24)
            task = asyncio.create_task(first.start())
            while server.state is None:
                await asyncio.sleep(0.01)
            stranger = OtherNoise(server.address, 24)
            with pytest.raises(NoiseMismatchError, match="noise table differs"):
                await stranger.start()
            await stranger.close()
            await task  # the training itself is unharmed
            assert first.state.epoch == 3
            await first.close()

    run(main())
