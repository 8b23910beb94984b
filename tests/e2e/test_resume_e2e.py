"""TorchESWorker on a resumed embedded server ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import asyncio

import safetensors.torch
import torch
from toy_workers import ToyRegression

from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi_torch.codec import decode_state


async def train(
    epochs: int, *, initial_state: bytes | None = None, start_epoch: int = 1
) -> list[EpochSummary]:
    summaries: list[EpochSummary] = []
    config = ServerConfig(population_size=ToyRegression.default_config.population_size,
                          max_epochs=epochs)  # fmt: skip
    kw = {"initial_state": initial_state, "start_epoch": start_epoch} if initial_state else {}
    async with EmbeddedServer(config, on_epoch=summaries.append, **kw) as server:
        workers = [ToyRegression(server.address, cores=c) for c in (5, 11)]
        await asyncio.gather(*(w.start() for w in workers))
        for w in workers:
            await w.close()
    return summaries


def test_a_resumed_torch_training_equals_the_uninterrupted_one() -> None:
    async def scenario() -> None:
        whole = await train(5)
        first = await train(2)
        rest = await train(5, initial_state=first[-1].state, start_epoch=3)
        assert [s.epoch for s in rest] == [3, 4, 5]
        for resumed, straight in zip(rest, whole[2:], strict=True):
            assert (resumed.rewards == straight.rewards).all()
        final, expected = decode_state(rest[-1].state), decode_state(whole[-1].state)
        assert final.epoch == expected.epoch == 5
        assert torch.equal(final.params, expected.params)
        # Every tensor of the state (parameters, optimizer and strategy state), bit for bit.
        tensors, expected_tensors = (
            safetensors.torch.load(s) for s in (rest[-1].state, whole[-1].state)
        )
        assert tensors.keys() == expected_tensors.keys()
        for key, tensor in expected_tensors.items():
            assert torch.equal(tensors[key], tensor), key

    asyncio.run(asyncio.wait_for(scenario(), 180))
