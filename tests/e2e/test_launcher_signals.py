"""`evochi-torch worker|train` never orphans its workers: SIGTERM and SIGHUP stop every
worker process as Ctrl-C does (they leave the training cleanly), SIGKILL of the launcher
takes them down too (parent-death signal / parent watch), and a worker process told to stop
in the middle of an evaluation exits without waiting for it. Real processes throughout;
survivors are looked up by pid in /proc."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# This folder is on sys.path (pytest imports test modules rootdir-relative).
from test_launcher import terminal_signals

from evochi.server import EmbeddedServer, ServerConfig

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)"),
]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{Path(__file__).parent}"}


def launcher(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    with terminal_signals():  # SIGHUP as in a terminal, even if the suite runs under nohup
        return subprocess.Popen(
            [sys.executable, "-m", "evochi_torch", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV,
        )  # fmt: skip


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None once it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")  # a zombie has ended


def worker_pids(launcher_pid: int) -> list[int]:
    """The launcher's spawned worker processes."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[0] != launcher_pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


class Lines:
    """Collects a process's stderr lines in a thread; `seen` waits for a fragment."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def seen(self, fragment: str, timeout: float) -> bool:
        with self._new:
            return self._new.wait_for(lambda: any(fragment in line for line in self.lines), timeout)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_worker_launcher_signal_leaves_no_worker_process(sig: signal.Signals) -> None:
    workers: list[int] = []

    async def main() -> int:
        config = ServerConfig(population_size=24, max_epochs=0, worker_timeout=60.0)
        async with EmbeddedServer(config) as server:
            proc = launcher(
                "worker", "toy_workers:ToyRegression", "--server", server.address,
                "--workers", "2", "--log-level", "WARNING",
            )  # fmt: skip
            try:
                await wait_until(
                    lambda: server.epoch >= 3 or proc.poll() is not None, 120, "training"
                )
                assert proc.poll() is None, proc.communicate()[1]
                workers.extend(worker_pids(proc.pid))
                assert len(workers) == 2, workers
                proc.send_signal(sig)
                code = await asyncio.to_thread(proc.wait, 60)
                # The workers left the training cleanly: the server knows well before the
                # 60 s heartbeat timeout would have removed them.
                await wait_until(lambda: not server.service.core.workers, 30, "workers to leave")
                await wait_until(lambda: not any(map(alive, workers)), 30, "workers to exit")
                return code
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()

    try:
        code = asyncio.run(main())
    finally:
        kill_all(workers)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_train_launcher_signal_leaves_no_worker_process(sig: signal.Signals) -> None:
    proc = launcher(
        "train", "toy_workers:ToyRegression", "--workers", "2", "--max-epochs", "100000",
        "--log-level", "INFO",
    )  # fmt: skip
    workers: list[int] = []
    try:
        stderr = Lines(proc.stderr)
        # The embedded server logs each epoch: the workers are training.
        assert stderr.seen("epoch=2 ", 120), "".join(stderr.lines)[-3000:]
        workers.extend(worker_pids(proc.pid))
        assert len(workers) == 2, workers
        proc.send_signal(sig)
        code = proc.wait(60)

        async def gone() -> None:
            await wait_until(lambda: not any(map(alive, workers)), 30, "workers to exit")

        asyncio.run(gone())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        kill_all(workers)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
    if sig == signal.SIGTERM:
        assert stderr.seen("terminated by SIGTERM; workers stopped", 10)


def test_a_worker_stops_promptly_in_the_middle_of_an_evaluation(tmp_path: Path) -> None:
    """SIGTERM to a worker process whose evaluation (in a thread) would take minutes: it
    leaves the training and exits without waiting for it. The time is printed, not
    asserted (the machine is shared); the goal is under 2 s."""
    env = {**ENV, "EVOCHI_TEST_MARKERS": str(tmp_path)}
    workers: list[int] = []

    async def main() -> float:
        config = ServerConfig(population_size=24, max_epochs=0, worker_timeout=60.0)
        async with EmbeddedServer(config) as server:
            proc = launcher(
                "worker", "lifecycle_workers:SlowEvaluation", "--server", server.address,
                "--workers", "1", "--log-level", "WARNING", env=env,
            )  # fmt: skip
            try:
                await wait_until(
                    lambda: any(tmp_path.iterdir()) or proc.poll() is not None, 120, "evaluation"
                )
                assert proc.poll() is None, proc.communicate()[1]
                (marker,) = tmp_path.iterdir()
                pid = int(marker.name.split("-")[1])
                workers.append(pid)
                assert server.service.core.workers  # it holds an evaluate task
                os.kill(pid, signal.SIGTERM)
                sent = time.monotonic()
                await wait_until(lambda: not alive(pid), 60, "the worker process to exit")
                took = time.monotonic() - sent
                await wait_until(lambda: not server.service.core.workers, 30, "a clean leave")
                # Its only worker stopped normally: the launcher ends too, without error.
                assert await asyncio.to_thread(proc.wait, 60) == 0
                return took
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()

    try:
        took = asyncio.run(main())
    finally:
        kill_all(workers)
    print(f"\nworker exit after SIGTERM mid-evaluation: {took:.2f} s (goal < 2 s)")


def test_ctrl_c_on_an_example_says_how_to_resume_without_a_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with terminal_signals():
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.cartpole", "--run.target", "1e9",
             "--run.max-epochs", "100000", "--run.checkpoint-every", "1",
             "--run.run-dir", str(run_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT,
        )  # fmt: skip
    try:
        output = Lines(proc.stdout)
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert output.seen("epoch    3", 60), "".join(output.lines)[-3000:]
        workers = worker_pids(proc.pid)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        asyncio.run(wait_until(lambda: not any(map(alive, workers)), 30, "workers to exit"))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = "".join(output.lines)
    assert code == 130, text[-3000:]
    assert f"continue with --run.resume {run_dir}" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
