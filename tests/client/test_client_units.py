"""Client pieces that need no server: Eval, result checks, codec, channel options."""

import asyncio
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import zstandard

import evochi.v1 as evochi
from evochi.v1.worker import _state_types, _to_evaluations


@dataclass
class State:
    seed: int
    weights: list[float]


class StateWorker(evochi.Worker[State]):
    def initialize(self) -> State:
        return State(1, [])

    def evaluate(self, epoch, slices):
        return []

    def optimize(self, epoch, rewards):
        return self.state


def test_from_flat_splits_in_slice_order() -> None:
    evals = evochi.Eval.from_flat([slice(5, 7), slice(0, 3)], [1, 2, 3, 4, 5])
    assert evals == [
        evochi.Eval(slice(5, 7), [1.0, 2.0]),
        evochi.Eval(slice(0, 3), [3.0, 4.0, 5.0]),
    ]
    with pytest.raises(ValueError, match="4 rewards for slices totalling 5"):
        evochi.Eval.from_flat([slice(5, 7), slice(0, 3)], [1, 2, 3, 4])


def test_results_must_match_assigned_slices() -> None:
    slices = [slice(0, 2), slice(4, 5)]
    ok = _to_evaluations(slices, [evochi.Eval(slice(4, 5), [1]), evochi.Eval(slice(0, 2), [2, 3])])
    assert [(e.slice.start, e.slice.end, list(e.rewards)) for e in ok] == [
        (4, 5, [1.0]),
        (0, 2, [2.0, 3.0]),
    ]
    with pytest.raises(ValueError, match="not assigned"):
        _to_evaluations(slices, [evochi.Eval(slice(0, 3), [1, 2, 3])])
    with pytest.raises(ValueError, match="no rewards for slices \\[4, 5\\)"):
        _to_evaluations(slices, [evochi.Eval(slice(0, 2), [1, 2])])
    with pytest.raises(ValueError, match="1 rewards for slice \\[0, 2\\)"):
        _to_evaluations(slices, [evochi.Eval(slice(0, 2), [1]), evochi.Eval(slice(4, 5), [1])])
    with pytest.raises(ValueError, match="twice"):
        _to_evaluations(slices, [evochi.Eval(slice(0, 2), [1, 2])] * 2)
    with pytest.raises(ValueError, match=r"non-finite rewards for members \[1, 4\]"):
        _to_evaluations(
            slices,
            [evochi.Eval(slice(0, 2), [0, float("nan")]), evochi.Eval(slice(4, 5), [np.inf])],
        )


def test_state_type_is_taken_from_the_subclass() -> None:
    assert _state_types(StateWorker) == [State]

    class Sub(StateWorker):
        pass

    assert _state_types(Sub) == [State]


def test_default_codec_is_wire_compatible_with_the_published_client() -> None:
    worker = StateWorker("127.0.0.1:1", cores=1)
    state = State(3, [0.5])
    published = zstandard.ZstdCompressor().compress(pickle.dumps(state))
    assert worker.codec.decode(published) == state
    assert (
        pickle.loads(zstandard.ZstdDecompressor().decompress(worker.codec.encode(state))) == state
    )


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_codec_refuses_code_and_garbage() -> None:
    codec = evochi.PickleZstdCodec([State])
    evil = zstandard.ZstdCompressor().compress(pickle.dumps(Evil()))
    with pytest.raises(
        evochi.StateDecodeError, match="refusing to unpickle posix.system|os.system"
    ):
        codec.decode(evil)
    with pytest.raises(evochi.StateDecodeError, match="not on the state allow-list"):
        codec.decode(zstandard.ZstdCompressor().compress(pickle.dumps(Evil)))
    blob = codec.encode(State(1, [1.0] * 1000))
    with pytest.raises(evochi.StateDecodeError, match="truncated"):
        codec.decode(blob[: len(blob) // 2])
    with pytest.raises(evochi.StateDecodeError, match="zstd"):
        codec.decode(b"not a state")
    assert codec.decode(codec.encode({"a": np.arange(3)}))["a"].tolist() == [0, 1, 2]


def test_cores_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cores must be a positive integer"):
        StateWorker("127.0.0.1:1", cores=0)


def test_unreachable_server_raises_clearly(unused_port: int) -> None:
    async def main() -> None:
        worker = StateWorker(f"127.0.0.1:{unused_port}", cores=1, connect_timeout=0.5)
        try:
            with pytest.raises(evochi.ServerUnavailableError, match="could not connect"):
                await worker.start()
        finally:
            await worker.close()

    asyncio.run(main())


def test_channel_options_raise_message_limits() -> None:
    options = dict(evochi.channel_options())
    assert options["grpc.max_receive_message_length"] >= 1 << 30
    assert options["grpc.max_send_message_length"] >= 1 << 30
    with pytest.raises(ValueError):
        evochi.channel_options(0)
