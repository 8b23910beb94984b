"""TorchESWorker's ``score`` may return per-member metrics; the server sums them exactly."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from toy_workers import ToyRegression

from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi_torch.codec import decode_state


def steps_of(members: torch.Tensor) -> torch.Tensor:
    """A known per-member 'episode length'."""
    return members % 7 + 10


class StepCounting(ToyRegression):
    def score(self, policy, epoch, members):
        return super().score(policy, epoch, members), {"env_steps": steps_of(members)}


def test_scores_with_env_steps_reach_the_epoch_summary_and_train_the_same() -> None:
    population = ToyRegression.default_config.population_size
    epochs = 3

    async def train(worker_type: type[ToyRegression]) -> tuple[list[EpochSummary], bytes]:
        summaries: list[EpochSummary] = []
        config = ServerConfig(population_size=population, max_epochs=epochs)
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            workers = [worker_type(server.address, cores=c) for c in (5, 7)]
            await asyncio.gather(*(w.start() for w in workers))
            for w in workers:
                await w.close()
            assert server.state is not None
            return summaries, server.state

    async def scenario() -> None:
        with_steps, state = await train(StepCounting)
        plain, plain_state = await train(ToyRegression)
        expected = float(steps_of(torch.arange(population)).sum())
        for summary in with_steps:
            assert summary.metrics == {"env_steps": expected}
            assert summary.metric_exact("env_steps")
            np.testing.assert_array_equal(
                summary.member_metrics["env_steps"], steps_of(torch.arange(population)).numpy()
            )
        assert all(s.metrics == {} for s in plain)
        # Metrics are side information: the training itself is bit-identical.
        assert torch.equal(decode_state(state).params, decode_state(plain_state).params)

    asyncio.run(asyncio.wait_for(scenario(), 180))
