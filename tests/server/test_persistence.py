"""--state-dir: atomic checkpoints, restart without loss, refusal of foreign checkpoints."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

import evochi.v1 as evochi
from evochi.server import CheckpointError, EmbeddedServer, EpochSummary, ServerConfig
from evochi.server.store import Checkpoint, CheckpointStore
from tests.server.helpers import cli, free_port, run, wait_for_port
from tests.server.workers import HistoryWorker, expected, make

pytestmark = pytest.mark.timeout(90)


def test_store_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    assert store.load() is None
    store.save(Checkpoint(3, b"\x00state" * 1000, {"population_size": 5}))
    store.save(Checkpoint(4, b"next", {"population_size": 5}))
    loaded = store.load()
    assert loaded == Checkpoint(4, b"next", {"population_size": 5})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.evochi"]
    store.save(Checkpoint(1, None, {"population_size": 5}))  # the configuration alone
    assert store.load() == Checkpoint(1, None, {"population_size": 5})


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_checkpoints_are_refused_not_ignored(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(2, b"some state bytes", {"population_size": 5}))
    data = store.path.read_bytes()
    if damage == "truncate":
        data = data[:-3]
    elif damage == "flip":
        data = data[:-1] + bytes([data[-1] ^ 1])
    else:
        data = b"not a checkpoint at all"
    store.path.write_bytes(data)
    with pytest.raises(CheckpointError):
        store.load()


def test_checkpoint_of_another_population_is_refused(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).save(Checkpoint(2, b"s", {"population_size": 5}))

    async def scenario() -> None:
        server = EmbeddedServer(ServerConfig(population_size=6, state_dir=str(tmp_path)))
        with pytest.raises(CheckpointError, match="population size 5"):
            await server.start()

    run(scenario())


def test_embedded_restart_continues_without_loss(tmp_path: Path) -> None:
    summaries: list[EpochSummary] = []

    async def scenario() -> None:
        config = ServerConfig(
            population_size=16, max_epochs=6, worker_timeout=4, state_dir=str(tmp_path)
        )
        first = EmbeddedServer(config, on_epoch=summaries.append)
        await first.start()
        port = first.port
        workers = [make(first, cores=8, reconnect=True) for _ in range(2)]
        for w in workers:
            w.optimize_delay = 0.05
        runs = [asyncio.ensure_future(w.start()) for w in workers]
        while len(summaries) < 2:
            await asyncio.sleep(0.01)
        await first.stop(grace=0.5)
        stopped_at = CheckpointStore(tmp_path).load()
        assert stopped_at is not None and 3 <= stopped_at.epoch <= 6
        # The same address comes back; the workers reconnect with backoff.
        second = EmbeddedServer(config, port=port, on_epoch=summaries.append)
        await second.start()
        assert second.epoch == stopped_at.epoch
        await asyncio.gather(*runs)
        await second.wait_finished(timeout=20)
        for w in workers:
            assert w.state == expected(16, 6)
            await w.close()
        assert workers[0].codec.decode(second.state) == expected(16, 6)
        await second.stop()
        final = CheckpointStore(tmp_path).load()
        assert final is not None and final.epoch == 7

    run(scenario())
    epochs = [s.epoch for s in summaries]
    assert epochs[-1] == 6 and sorted(set(epochs)) == [1, 2, 3, 4, 5, 6]


def test_server_process_restart_with_only_state_dir(tmp_path: Path) -> None:
    port = free_port()
    state_dir = str(tmp_path / "state")
    args = ("--host=127.0.0.1", f"--port={port}", f"--state-dir={state_dir}")
    env = {"EVOCHI_POPULATION_SIZE": "12", "EVOCHI_MAX_EPOCHS": "8", "EVOCHI_WORKER_TIMEOUT": "4s"}
    server = cli(*args, env=env)
    outputs: list[str] = []

    async def scenario() -> None:
        nonlocal server
        wait_for_port(port, server)
        w = evochi_worker(port)
        w.optimize_delay = 0.1
        task = asyncio.ensure_future(w.start())
        store = CheckpointStore(state_dir)
        while (cp := await asyncio.to_thread(store.load)) is None or cp.epoch < 3:
            assert not task.done()
            await asyncio.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(server.communicate, timeout=20)
        outputs.append(out)
        assert server.returncode == 0, out
        # Restart with nothing but the directory: population and max epochs come from it.
        # (No linger after the finish: no other worker is out there to be told.)
        server = cli(*args, env={"EVOCHI_FINISH_LINGER": "0"})
        await asyncio.to_thread(wait_for_port, port, server)
        await asyncio.wait_for(task, 60)
        assert w.state == expected(12, 8)
        await w.close()
        out, _ = await asyncio.to_thread(server.communicate, timeout=20)
        outputs.append(out)
        assert server.returncode == 0, out

    try:
        run(scenario(), timeout=80)
    finally:
        server.kill()
    assert "continuing the training" in outputs[1]
    assert "training finished after epoch 8" in outputs[1]


def evochi_worker(port: int) -> HistoryWorker:
    w = HistoryWorker(f"127.0.0.1:{port}", 6, reconnect=evochi.ReconnectPolicy(initial_delay=0.2))
    w.loop = asyncio.get_running_loop()
    return w


def test_checkpoint_file_is_replaced_atomically(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(1, b"old", {"population_size": 1}))

    def crash(*args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(Checkpoint(2, b"new", {"population_size": 1}))
    monkeypatch.undo()
    loaded = store.load()
    assert loaded is not None and loaded.state == b"old"


def test_the_configuration_is_stored_at_startup(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=7, max_epochs=3, state_dir=str(tmp_path))
        async with EmbeddedServer(config):
            # Before any worker, before any state: the configuration alone.
            stored = CheckpointStore(tmp_path).load()
            assert stored == Checkpoint(1, None, config.stored_fields())
        # Restarted with other settings: they are what a later restart continues with.
        changed = ServerConfig(population_size=7, max_epochs=9, state_dir=str(tmp_path))
        async with EmbeddedServer(changed):
            stored = CheckpointStore(tmp_path).load()
            assert stored is not None and stored.config["max_epochs"] == 9
            assert stored.state is None

    run(scenario())


def test_server_killed_before_epoch_1_restarts_from_the_directory_alone(tmp_path: Path) -> None:
    port = free_port()
    state_dir = str(tmp_path / "state")
    args = ("--host=127.0.0.1", f"--port={port}", f"--state-dir={state_dir}")
    env = {"EVOCHI_POPULATION_SIZE": "12", "EVOCHI_MAX_EPOCHS": "3", "EVOCHI_WORKER_TIMEOUT": "4s"}
    server = cli(*args, env=env)
    try:
        wait_for_port(port, server)
        server.kill()  # SIGKILL: nothing runs at exit; no worker ever joined
        server.communicate(timeout=20)
        # Nothing but the directory: population, max epochs and timeout come from it. (No
        # linger after the finish: no other worker is out there to be told.)
        server = cli(*args, env={"EVOCHI_FINISH_LINGER": "0"})

        async def scenario() -> None:
            await asyncio.to_thread(wait_for_port, port, server)
            w = evochi_worker(port)
            await asyncio.wait_for(w.start(), 60)
            assert w.population_size == 12 and w.max_epochs == 3
            assert w.state == expected(12, 3)
            await w.close()

        run(scenario(), timeout=80)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0, out
        assert "training finished after epoch 3" in out
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
