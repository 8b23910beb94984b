"""Resuming a training on the embedded server (``initial_state``/``start_epoch``) and the
per-member metrics extension (``Evaluation.metrics``), with real workers on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi.server.config import ConfigError, explicit_settings, resolve_config
from evochi.server.store import CheckpointError
from evochi.v1 import evochi_pb2 as pb
from evochi.v1.metrics import MAX_METRICS
from tests.server.helpers import (
    StubWorker,
    cli,
    expect_error,
    free_port,
    play,
    run,
    wait_for_port,
)
from tests.server.workers import History, HistoryWorker, expected, make, reward


class CountingWorker(HistoryWorker):
    """Records whether it was ever asked to initialize."""

    initialized = False

    def initialize(self) -> History:
        self.initialized = True
        return super().initialize()


def steps_of(epoch: int, member: int) -> float:
    """A known per-member metric, distinct per epoch and member."""
    return float(100 * epoch + member + 1)


class StepsWorker(HistoryWorker):
    """Reports ``env_steps`` (and a behaviour value) for every member it evaluates."""

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        evals = super().evaluate(epoch, slices)
        return [
            evochi.Eval(
                ev.slice,
                ev.rewards,
                {
                    "env_steps": [steps_of(epoch, m) for m in range(ev.slice.start, ev.slice.stop)],
                    "bd/x": [-0.5 * m for m in range(ev.slice.start, ev.slice.stop)],
                },
            )
            for ev in evals
        ]


async def train(server: EmbeddedServer, *workers: HistoryWorker) -> None:
    await asyncio.gather(*(w.start() for w in workers))
    for w in workers:
        await w.close()


# ---------------------------------------------------------------------- resume


def test_resumed_training_continues_exactly_where_the_first_one_stopped() -> None:
    population = 12

    async def scenario() -> None:
        first: list[EpochSummary] = []
        async with EmbeddedServer(
            ServerConfig(population_size=population, max_epochs=3), on_epoch=first.append
        ) as server:
            a, b = make(server, 5), make(server, 4)
            await train(server, a, b)
            assert server.finished
        assert [s.epoch for s in first] == [1, 2, 3]

        resumed: list[EpochSummary] = []
        async with EmbeddedServer(
            ServerConfig(population_size=population, max_epochs=6),
            on_epoch=resumed.append,
            initial_state=first[-1].state,
            start_epoch=4,
        ) as server:
            assert server.epoch == 4 and server.state == first[-1].state
            c = CountingWorker(server.address, 5)
            d = CountingWorker(server.address, 7)
            c.loop = d.loop = asyncio.get_running_loop()
            await train(server, c, d)
            assert server.finished and server.epoch == 6
        assert not c.initialized and not d.initialized  # no initialize task was issued
        assert [s.epoch for s in resumed] == [4, 5, 6]
        assert {e for e, _, _ in c.evaluated + d.evaluated} == {4, 5, 6}
        assert c.optimized == d.optimized == [4, 5, 6]
        # The state depends on every reward of every epoch: equal to an uninterrupted run.
        assert c.state == d.state == expected(population, 6)

        uninterrupted: list[EpochSummary] = []
        async with EmbeddedServer(
            ServerConfig(population_size=population, max_epochs=6), on_epoch=uninterrupted.append
        ) as server:
            await train(server, make(server, 9))
        for mine, theirs in zip(resumed, uninterrupted[3:], strict=True):
            assert mine.epoch == theirs.epoch
            np.testing.assert_array_equal(mine.rewards, theirs.rewards)
            assert mine.state == theirs.state

    run(scenario(), timeout=120)


def test_first_worker_of_a_resumed_training_gets_the_state_in_hello_and_evaluates() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=4, max_epochs=0, worker_timeout=30)
        async with EmbeddedServer(config, initial_state=b"opaque-state", start_epoch=41) as server:
            w = StubWorker(server.address, cores=4)
            try:
                hello = await w.subscribe()
                assert hello.HasField("state") and hello.state == b"opaque-state"
                w.start_heartbeats()
                event = await w.expect(pb.EVENT_TYPE_EVALUATE)
                assert event.evaluate.epoch == 41
                assert [(s.start, s.end) for s in event.evaluate.slices] == [(0, 4)]
            finally:
                await w.close()

    run(scenario())


def test_resuming_beyond_max_epochs_is_a_finished_training() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=4, max_epochs=5)
        async with EmbeddedServer(config, initial_state=b"final", start_epoch=6) as server:
            assert server.finished and server.epoch == 5 and server.state == b"final"
            w = StubWorker(server.address, cores=4)
            try:
                await w.subscribe()
                await w.expect(pb.EVENT_TYPE_STOP)
            finally:
                await w.close()

    run(scenario())


def test_a_checkpoint_in_state_dir_wins_over_the_initial_state(tmp_path: Path) -> None:
    population = 6

    async def scenario() -> None:
        config = ServerConfig(population_size=population, max_epochs=2, state_dir=str(tmp_path))
        async with EmbeddedServer(config) as server:
            await train(server, make(server, 6))
        # The restarted server continues from its checkpoint, not from the given state.
        config = ServerConfig(population_size=population, max_epochs=3, state_dir=str(tmp_path))
        async with EmbeddedServer(config, initial_state=b"ignored", start_epoch=1) as server:
            assert server.epoch == 3 and server.state != b"ignored"
            w = make(server, 6)
            await train(server, w)
            assert w.state == expected(population, 3)

    run(scenario(), timeout=120)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start_epoch": 3}, ValueError, "needs the initial_state"),
        ({"initial_state": b"", "start_epoch": 2}, ValueError, "must not be empty"),
        ({"initial_state": b"s", "start_epoch": 0}, ValueError, "between 1 and"),
        ({"initial_state": b"s", "start_epoch": True}, TypeError, "must be an int"),
        ({"initial_state": b"s", "start_epoch": 2.0}, TypeError, "must be an int"),
        ({"initial_state": "text", "start_epoch": 2}, TypeError, "must be bytes"),
    ],
)
def test_bad_resume_arguments_are_refused_clearly(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        EmbeddedServer(ServerConfig(population_size=4), **kwargs)  # type: ignore[arg-type]


def test_the_standalone_server_resumes_from_a_state_file(tmp_path: Path) -> None:
    state = tmp_path / "epoch-6.state"
    state.write_bytes(b"the state epoch 7 starts from")
    port = free_port()
    proc = cli(
        "--host=127.0.0.1", f"--port={port}", "--population-size=5", "--max-epochs=8",
        f"--initial-state={state}", "--start-epoch=7", "--worker-timeout=10s",
        "--finish-linger=0s",  # no other worker to wait for: exit once this one has its stop
    )  # fmt: skip
    try:
        wait_for_port(port, proc)

        async def worker() -> list[pb.SubscribeResponse]:
            w = StubWorker(f"127.0.0.1:{port}", cores=5)
            hello = await w.subscribe()
            assert hello.state == state.read_bytes()
            events = await play(w)
            await w.close()
            return events

        events = run(worker())
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    kinds = [e.type for e in events]
    assert pb.EVENT_TYPE_INITIALIZE not in kinds
    assert [e.evaluate.epoch for e in events if e.type == pb.EVENT_TYPE_EVALUATE] == [7, 8]
    assert "starting the training at epoch 7" in out and "training finished after epoch 8" in out


def test_resume_settings_come_from_flags_or_environment_and_are_checked(tmp_path: Path) -> None:
    settings = explicit_settings(
        ["--population-size=3"],
        {"EVOCHI_INITIAL_STATE": str(tmp_path / "s"), "EVOCHI_START_EPOCH": "4"},
    )
    config = resolve_config(settings)
    assert (config.initial_state_file, config.start_epoch) == (str(tmp_path / "s"), 4)
    with pytest.raises(ConfigError, match="start_epoch 4 needs the state"):
        resolve_config(explicit_settings(["--population-size=3", "--start-epoch=4"], {}))
    with pytest.raises(ConfigError, match="start_epoch must be between 1"):
        ServerConfig(population_size=3, initial_state_file="f", start_epoch=0)
    with pytest.raises(ValueError, match="not both"):
        EmbeddedServer(config, initial_state=b"s", start_epoch=4)

    async def missing() -> None:
        async with EmbeddedServer(config):
            pass

    with pytest.raises(CheckpointError, match="cannot read the initial state"):
        run(missing())
    (tmp_path / "s").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        run(missing())


# ---------------------------------------------------------------------- metrics


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_metrics_of_every_member_are_summed_per_epoch_and_exact(transport: str) -> None:
    population, epochs = 20, 3

    async def scenario() -> None:
        summaries: list[EpochSummary] = []
        config = ServerConfig(population_size=population, max_epochs=epochs, transport=transport)
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            workers = [StepsWorker(server.address, c) for c in (3, 7, 5)]
            for w in workers:
                w.loop = asyncio.get_running_loop()
            await train(server, *workers)
            registry = server.metrics.registry
            total = sum(steps_of(e, m) for e in range(1, epochs + 1) for m in range(population))
            assert registry.get_sample_value(
                "evochi_member_metric_sum", {"name": "env_steps"}
            ) == pytest.approx(total)
            assert registry.get_sample_value(
                "evochi_member_metric_members_total", {"name": "env_steps"}
            ) == float(population * epochs)
        assert [s.epoch for s in summaries] == [1, 2, 3]
        for s in summaries:
            members = np.arange(population)
            assert s.metrics["env_steps"] == sum(steps_of(s.epoch, m) for m in members)
            assert s.metrics["bd/x"] == pytest.approx(-0.5 * members.sum())
            assert s.metric_members == {"env_steps": population, "bd/x": population}
            assert s.metric_exact("env_steps") and not s.metric_exact("unknown")
            np.testing.assert_array_equal(
                s.member_metrics["env_steps"], [steps_of(s.epoch, m) for m in members]
            )
            assert not s.member_metrics["env_steps"].flags.writeable
        assert workers[0].state == expected(population, epochs)

    run(scenario(), timeout=120)


def test_workers_without_metrics_make_the_sum_partial_and_say_so() -> None:
    population, epochs = 24, 3

    async def scenario() -> None:
        summaries: list[EpochSummary] = []
        config = ServerConfig(population_size=population, max_epochs=epochs)
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            steps = StepsWorker(server.address, 4)
            plain = HistoryWorker(server.address, 5)
            steps.loop = plain.loop = asyncio.get_running_loop()
            await train(server, steps, plain)
        for s in summaries:
            reporting = [m for e, a, b in steps.evaluated if e == s.epoch for m in range(a, b)]
            silent = [m for e, a, b in plain.evaluated if e == s.epoch for m in range(a, b)]
            assert sorted(reporting + silent) == list(range(population))
            assert s.metric_members.get("env_steps", 0) == len(reporting)
            assert s.metrics.get("env_steps", 0.0) == sum(steps_of(s.epoch, m) for m in reporting)
            values = s.member_metrics.get("env_steps", np.full(population, np.nan))
            assert np.isnan(values[silent]).all()
            assert s.metric_exact("env_steps") == (not silent)
        # Both took part (evaluation order is up to the scheduler, so over the training).
        assert steps.evaluated and plain.evaluated
        assert any(not s.metric_exact("env_steps") for s in summaries)

    run(scenario(), timeout=120)


def test_a_training_without_metrics_has_an_empty_metrics_summary() -> None:
    async def scenario() -> None:
        summaries: list[EpochSummary] = []
        config = ServerConfig(population_size=8, max_epochs=2)
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            await train(server, make(server, 3))
        assert [(s.metrics, s.metric_members, s.member_metrics) for s in summaries] == [
            ({}, {}, {}),
            ({}, {}, {}),
        ]

    run(scenario())


def _evaluation(start: int, end: int, metrics: dict[str, list[float]]) -> pb.Evaluation:
    return pb.Evaluation(
        slice=pb.Slice(start=start, end=end),
        rewards=[float(m) for m in range(start, end)],
        metrics=[pb.Metric(name=n, values=v) for n, v in metrics.items()],
    )


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"env_steps": [1.0, 2.0]}, "needs 4 values of metric 'env_steps', got 2"),
        ({"env_steps": [1.0, float("nan"), 3.0, 4.0]}, "NaN or infinite value"),
        ({"env_steps": [1.0, float("inf"), 3.0, 4.0]}, "NaN or infinite value"),
        ({"": [1.0] * 4}, "1 to 64 characters"),
        ({"x" * 65: [1.0] * 4}, "1 to 64 characters"),
        ({"bad name": [1.0] * 4}, "must start with a letter"),
        ({f"m{i}": [1.0] * 4 for i in range(MAX_METRICS + 1)}, "at most 16 names"),
    ],
)
def test_bad_metrics_are_rejected_and_lose_nothing(
    metrics: dict[str, list[float]], match: str
) -> None:
    async def scenario() -> None:
        summaries: list[EpochSummary] = []
        config = ServerConfig(population_size=4, max_epochs=1, worker_timeout=30)
        async with EmbeddedServer(
            config, initial_state=b"s", start_epoch=1, on_epoch=summaries.append
        ) as server:
            w = StubWorker(server.address, cores=4)
            try:
                await w.subscribe()
                w.start_heartbeats()
                task = (await w.expect(pb.EVENT_TYPE_EVALUATE)).evaluate.task_id
                bad = pb.FinishEvaluationRequest(
                    task_id=task, evaluations=[_evaluation(0, 4, metrics)]
                )
                err = await expect_error(
                    w.stub.FinishEvaluation(bad, metadata=w.auth()),
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                assert match in (err.details() or ""), err.details()
                # Nothing was recorded: the same task is still open and a good result counts.
                good = pb.FinishEvaluationRequest(
                    task_id=task, evaluations=[_evaluation(0, 4, {"env_steps": [1, 2, 3, 4]})]
                )
                assert (await w.stub.FinishEvaluation(good, metadata=w.auth())).ok
                opt = await w.expect(pb.EVENT_TYPE_OPTIMIZE)
                assert list(opt.optimize.rewards) == [0.0, 1.0, 2.0, 3.0]
                await w.finish_optimization(opt.optimize.task_id)
                share = await w.expect(pb.EVENT_TYPE_SHARE_STATE)
                await w.finish_share_state(share.share_state.task_id, b"s2")
                await server.wait_finished(30)
            finally:
                await w.close()
        (summary,) = summaries
        assert summary.metrics == {"env_steps": 10.0}
        assert summary.metric_members == {"env_steps": 4}

    run(scenario())


def test_a_duplicate_metric_name_in_one_evaluation_is_rejected() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=2, max_epochs=1, worker_timeout=30)
        async with EmbeddedServer(config, initial_state=b"s") as server:
            w = StubWorker(server.address, cores=2)
            try:
                await w.subscribe()
                w.start_heartbeats()
                task = (await w.expect(pb.EVENT_TYPE_EVALUATE)).evaluate.task_id
                ev = _evaluation(0, 2, {"a": [1, 2]})
                ev.metrics.add(name="a", values=[3, 4])
                err = await expect_error(
                    w.stub.FinishEvaluation(
                        pb.FinishEvaluationRequest(task_id=task, evaluations=[ev]),
                        metadata=w.auth(),
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                assert "metric 'a' twice" in (err.details() or "")
            finally:
                await w.close()

    run(scenario())


def test_the_client_refuses_bad_metrics_before_sending() -> None:
    class BadMetrics(HistoryWorker):
        def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
            return [
                evochi.Eval(
                    s, [reward(self.state, m) for m in range(s.start, s.stop)], {"env_steps": [1.0]}
                )
                for s in slices
            ]

    async def scenario() -> None:
        config = ServerConfig(population_size=6, max_epochs=1)
        async with EmbeddedServer(config) as server:
            w = BadMetrics(server.address, 3)
            w.loop = asyncio.get_running_loop()
            with pytest.raises(ValueError, match="1 values of metric 'env_steps' for slice"):
                await w.start()
            await w.close()

    run(scenario())
