"""A standalone `evochi-server` process that is SIGKILLed once mid-training and restarted from
its `--state-dir`, with reconnecting workers: the server-restart half of the fault tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from evochi.server.store import CheckpointStore
from evochi_torch.launch import WorkerProcesses, WorkerSpec


async def _wait_for_line(proc: subprocess.Popen, needle: str) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, proc.stderr.readline)
        if not line:
            raise AssertionError(f"server exited before logging {needle!r}")
        if needle in line:
            return


async def train_with_server_crash(
    spec: WorkerSpec, *, population: int, epochs: int, port: int, state_dir: Path,
    crash_after_epoch: int, devices: tuple[str, ...] = ("cpu", "cpu"),
) -> bytes:  # fmt: skip
    """Trains to `epochs`, SIGKILLing the server once `crash_after_epoch` is logged and
    restarting it on the same state dir; returns the stored final state (bytes). `spec`
    should reconnect (`reconnect=True`), so the same workers carry on."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable, "-m", "evochi.server", "--population-size", str(population),
        "--max-epochs", str(epochs), "--port", str(port), "--host", "127.0.0.1",
        "--state-dir", str(state_dir), "--worker-timeout", "10s",
    ]  # fmt: skip

    def start_server() -> subprocess.Popen:
        return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)

    server = start_server()
    with WorkerProcesses(spec, f"127.0.0.1:{port}", list(devices)):
        try:
            await _wait_for_line(server, f"epoch={crash_after_epoch} ")
            server.kill()  # no goodbye: a crash, not a clean shutdown
            server.wait()
            crashed_at = CheckpointStore(state_dir).load()
            # Else the test would restart a finished training and prove nothing.
            assert crashed_at is not None and crashed_at.epoch <= epochs, (
                f"the server finished before the crash: {crashed_at}"
            )
            print(f"server crashed with epoch {crashed_at.epoch} of {epochs} to run")
            server = start_server()
            await _wait_for_line(server, "training finished")
            # A finished standalone server flushes its state dir and exits by itself.
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, server.wait, 60) == 0
        finally:
            server.kill()
            server.wait()
    stored = CheckpointStore(state_dir).load()
    assert stored is not None, "the restarted server stored no state"
    return stored.state
