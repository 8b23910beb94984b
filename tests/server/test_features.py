"""Server features over gRPC: TLS, straggler re-issue, a CI-sized load with churn."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi.v1 import evochi_pb2 as pb
from tests.server.helpers import StubWorker, play, reward_of, run
from tests.server.workers import HistoryWorker, expected

pytestmark = pytest.mark.timeout(90)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_tls_server_trains_over_a_secure_channel_and_refuses_plaintext(
    tmp_path: Path, transport: str
) -> None:
    cert, key = self_signed(tmp_path)

    async def scenario() -> None:
        config = ServerConfig(
            population_size=8,
            max_epochs=2,
            worker_timeout=4,
            tls_cert=str(cert),
            tls_key=str(key),
            transport=transport,
        )
        async with EmbeddedServer(config) as server:
            plain = StubWorker(server.address, cores=4)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(plain.subscribe(), 10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await plain.close()
            channel = evochi.secure_channel(server.address, root_certificates=cert.read_bytes())
            w = HistoryWorker(channel, cores=4)
            w.loop = asyncio.get_running_loop()
            await w.start()
            assert w.state == expected(8, 2)
            await w.close()

    run(scenario())


class SlowFirstEpoch(HistoryWorker):
    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        self.evaluate_delay = 1.0 if epoch == 1 else 0.0
        self.started.set()
        return super().evaluate(epoch, slices)


class WaitsForSlowFirstEpoch(HistoryWorker):
    """Evaluates its half of epoch 1 only once the slow worker has the other half (it gets
    work one heartbeat after its hello; this worker would otherwise take both halves)."""

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        if epoch == 1:
            self.slow_started.wait(30)
        return super().evaluate(epoch, slices)


def test_straggler_slices_are_reissued_and_the_late_result_discarded() -> None:
    summaries: list[EpochSummary] = []

    async def scenario() -> None:
        config = ServerConfig(
            population_size=20, max_epochs=6, worker_timeout=6, straggler_min_seconds=0.2
        )
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            fast = WaitsForSlowFirstEpoch(server.address, cores=10)
            fast.loop = asyncio.get_running_loop()
            fast.optimize_delay = 0.25
            slow = SlowFirstEpoch(server.address, cores=10)
            slow.loop = asyncio.get_running_loop()
            slow.started = fast.slow_started = threading.Event()
            # Both are there before initialization ends: each gets half of epoch 1.
            await asyncio.gather(fast.start(), slow.start())
            assert any(e == 1 for e, _, _ in slow.evaluated)
            # The straggler's late result was dropped; it caught up on the optimize steps
            # it missed (in order) and ends with the same state.
            assert fast.state == slow.state == expected(20, 6)
            assert slow.optimized == list(range(1, 7))
            # Epoch 1 did not wait for the straggler's 1 s evaluation (waiting would take
            # at least 1 s + the 0.25 s optimize).
            assert summaries[0].seconds < 1.2
            reissued = server.metrics.registry.get_sample_value("evochi_reissued_members_total")
            assert reissued and reissued >= 1
            slow.gate.set()
            await fast.close()
            await slow.close()

    run(scenario())


def test_load_64_workers_with_churn_counts_every_member_once() -> None:
    population, epochs, workers = 10_000, 12, 64
    summaries: list[EpochSummary] = []

    async def scenario() -> None:
        config = ServerConfig(
            population_size=population, max_epochs=epochs, worker_timeout=10,
            straggler_reissue=False,
        )  # fmt: skip
        rng = random.Random(7)
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            first = StubWorker(server.address, cores=population // workers + 1)
            tasks = {asyncio.ensure_future(play(first)): first}
            while server.state is None:
                await asyncio.sleep(0.01)
            for _ in range(workers - 1):
                w = StubWorker(server.address, cores=population // workers + 1)
                tasks[asyncio.ensure_future(play(w))] = w
            churned, next_churn = 0, 3
            while not server.finished:
                await asyncio.sleep(0.05)
                # At epochs 3, 6 and 9, or the first epoch this loop sees after one of them
                # (a loaded machine may starve it through a whole epoch).
                if server.epoch >= next_churn and next_churn < epochs:
                    next_churn += 3
                    # Kill a few workers mid-epoch and start as many new ones.
                    for victim_task in rng.sample(sorted(tasks, key=id), 4):
                        await tasks.pop(victim_task).kill()
                        victim_task.cancel()
                        w = StubWorker(server.address, cores=rng.randint(50, 400))
                        tasks[asyncio.ensure_future(play(w))] = w
                        churned += 1
            await asyncio.wait(tasks, timeout=10)
            for w in tasks.values():
                await w.close()
            assert churned >= 8

    run(scenario(), timeout=80)
    assert [s.epoch for s in summaries] == list(range(1, epochs + 1))
    for s in summaries:
        assert s.rewards.tolist() == [reward_of(s.epoch, m) for m in range(population)]


def test_subscribe_stream_events_have_the_type_field_set() -> None:
    # Foreign clients dispatch on `type` (the published client does): never leave it 0.
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=3, max_epochs=1)) as server:
            w = StubWorker(server.address, cores=3)
            events = await play(w)
            assert all(e.type != pb.EVENT_TYPE_UNSPECIFIED for e in events)
            assert all(e.WhichOneof("event") for e in events)
            await w.close()

    run(scenario())
