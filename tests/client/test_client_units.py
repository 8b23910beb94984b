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


# ---------------------------------------------------------------------- per-member metrics


def test_eval_keeps_the_published_two_field_tuple_and_carries_metrics() -> None:
    plain = evochi.Eval(slice(0, 2), [1.0, 2.0])
    sl, rewards = plain  # the published NamedTuple unpacks into two fields
    assert (sl, rewards, len(plain), plain.metrics) == (slice(0, 2), [1.0, 2.0], 2, None)
    rich = evochi.Eval(slice(0, 2), [1.0, 2.0], {"env_steps": [5, 7]})
    assert rich.slice == slice(0, 2) and rich.rewards == [1.0, 2.0]
    assert rich.metrics == {"env_steps": [5, 7]}
    assert "metrics={'env_steps': [5, 7]}" in repr(rich) and "metrics" not in repr(plain)
    assert pickle.loads(pickle.dumps(rich)).metrics == {"env_steps": [5, 7]}


def test_from_flat_splits_metrics_like_rewards() -> None:
    evals = evochi.Eval.from_flat(
        [slice(5, 7), slice(0, 3)], [1, 2, 3, 4, 5], {"env_steps": np.array([10, 20, 30, 40, 50])}
    )
    assert [e.metrics for e in evals] == [
        {"env_steps": [10.0, 20.0]},
        {"env_steps": [30.0, 40.0, 50.0]},
    ]
    assert [e.metrics for e in evochi.Eval.from_flat([slice(0, 1)], [1.0])] == [None]
    with pytest.raises(ValueError, match="metric 'env_steps' has shape"):
        evochi.Eval.from_flat([slice(0, 2)], [1, 2], {"env_steps": [1, 2, 3]})


def test_metrics_go_on_the_wire_as_the_evaluation_extension() -> None:
    evals = [evochi.Eval(slice(0, 2), [1.0, 2.0], {"env_steps": [3, 4], "bd/x": [0.5, -1]})]
    (message,) = _to_evaluations([slice(0, 2)], evals)
    assert [(m.name, list(m.values)) for m in message.metrics] == [
        ("env_steps", [3.0, 4.0]),
        ("bd/x", [0.5, -1.0]),
    ]
    (plain,) = _to_evaluations([slice(0, 2)], [evochi.Eval(slice(0, 2), [1.0, 2.0])])
    assert len(plain.metrics) == 0


@pytest.mark.parametrize(
    ("metrics", "error", "match"),
    [
        ({"env_steps": [1.0]}, ValueError, "1 values of metric 'env_steps' for slice"),
        ({"env_steps": [1.0, float("nan")]}, ValueError, r"non-finite values .* members \[4\]"),
        ({"": [1.0, 2.0]}, ValueError, "1 to 64 characters"),
        ({"a b": [1.0, 2.0]}, ValueError, "must start with a letter"),
        ({3: [1.0, 2.0]}, ValueError, "must be strings"),
        ({f"m{i}": [1.0, 2.0] for i in range(17)}, ValueError, "more than 16 metric names"),
        ([("env_steps", [1.0, 2.0])], TypeError, "must map names to values"),
    ],
)
def test_bad_metrics_are_refused_where_they_are_produced(
    metrics: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _to_evaluations([slice(3, 5)], [evochi.Eval(slice(3, 5), [1.0, 2.0], metrics)])
