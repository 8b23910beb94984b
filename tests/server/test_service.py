"""Service-level details that the scenarios do not pin down byte for byte."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from evochi.server import ServerConfig, core
from evochi.server.service import EvochiService, _varint
from evochi.v1 import evochi_pb2 as pb


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**31 - 1, 2**40])
def test_varint_matches_protobuf(value: int) -> None:
    # A uint64 field 1 is tag 0x08 + the varint: protobuf's own encoding as reference.
    from google.protobuf import wrappers_pb2

    encoded = b"\x08" + _varint(value)
    assert wrappers_pb2.UInt64Value.FromString(encoded).value == value
    if value:  # protobuf leaves a zero out entirely
        assert encoded == wrappers_pb2.UInt64Value(value=value).SerializeToString()


@pytest.mark.parametrize("population", [1, 3, 1000, 40_000])
@pytest.mark.parametrize("epoch", [1, 200, 2**31 - 1])
def test_preserialized_optimize_event_is_what_protobuf_builds(population: int, epoch: int) -> None:
    async def build() -> tuple[bytes, bytes]:
        service = EvochiService(ServerConfig(population_size=population))
        rewards = np.random.default_rng(epoch).normal(size=population).astype(np.float32)
        rewards[0] = -0.0
        event = core.Optimize(task_id="optimize-abc-7", epoch=epoch, rewards=rewards)
        ours = service._optimize_message(event)
        again = service._optimize_message(core.Optimize("t2", epoch, rewards))  # cached vector
        reference = pb.SubscribeResponse(
            type=pb.EVENT_TYPE_OPTIMIZE,
            optimize=pb.OptimizeEvent(
                task_id="optimize-abc-7", epoch=epoch, rewards=rewards.tolist()
            ),
        )
        parsed = pb.SubscribeResponse.FromString(ours)
        assert parsed == reference
        assert list(parsed.optimize.rewards) == rewards.tolist()
        assert pb.SubscribeResponse.FromString(again).optimize.task_id == "t2"
        return ours, reference.SerializeToString()

    ours, reference = asyncio.run(build())
    assert ours == reference  # even byte-identical to protobuf's own serialization
