"""Workers end with their training: worker processes (`ending_worker.py`) against the
standalone server, which is SIGKILLed and restarted from its --state-dir like a crashed one.

- a worker whose server never comes back gives up after its `give_up_after`: exit 0 when it
  had finished the last epoch, else exit 1 with one `error:` line;
- a server restarted from a --state-dir whose training has finished tells (re)connecting
  workers so (hello + stop), including one that was in its reconnect back-off while the
  restarted server finished the training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.server.helpers import REPO, cli, free_port, wait_for_port

pytestmark = pytest.mark.timeout(120)


class Proc:
    """A child process whose output lines are collected by a thread, to wait for one."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(needle in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    raise AssertionError(f"no {needle!r} in:\n" + self.output)
                self._changed.wait(min(left, 0.2))

    @property
    def said(self) -> list[str]:
        """What the worker printed (not its log)."""
        return [line[2:] for line in self.lines if line.startswith("> ")]

    def wait(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output}") from None
        with self._changed:  # the last lines
            self._changed.wait_for(lambda: self._ended, 10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def worker(port: int, *args: str) -> Proc:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOCHI_")}
    command = [sys.executable, "-m", "tests.client.ending_worker", f"127.0.0.1:{port}", *args]
    popen = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return Proc(popen)


def server(port: int, *args: str) -> Proc:
    return Proc(cli("--host=127.0.0.1", f"--port={port}", *args))


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def test_a_worker_whose_server_never_comes_back_gives_up_with_an_error(procs) -> None:
    port = free_port()
    srv = server(port, "--population-size=4", "--max-epochs=50", "--worker-timeout=2s")
    procs.append(srv)
    wait_for_port(port, srv.popen)
    w = worker(port, "2", "--give-up-after=2", "--evaluate-seconds=0.05")
    procs.append(w)
    w.wait_for("> optimized 2")
    srv.kill()  # a crash mid-training: no stop, and no server ever again
    killed = time.monotonic()
    assert w.wait(30) == 1, w.output
    took = time.monotonic() - killed
    # The bound, plus at most one last try at connecting and the process's exit.
    assert 1.5 <= took <= 2 + 0.5 + 5, (took, w.output)
    errors = [line for line in w.lines if line.startswith("error:")]
    assert len(errors) == 1, w.output
    assert "gave up on the evochi server" in errors[0]
    assert (
        "(give_up_after=2s), and the training had not finished when it was last seen "
        "(epoch " in errors[0]
    )
    assert " of 50)" in errors[0]


def test_a_worker_that_finished_the_last_epoch_exits_0_when_the_server_is_gone(procs) -> None:
    port = free_port()
    srv = server(port, "--population-size=4", "--max-epochs=3", "--worker-timeout=2s")
    procs.append(srv)
    wait_for_port(port, srv.popen)
    # The last optimize step takes 1 s: the server dies meanwhile, before it could send stop.
    w = worker(port, "4", "--give-up-after=2", "--hold-last=1")
    procs.append(w)
    w.wait_for("> optimized 3")
    srv.kill()
    killed = time.monotonic()
    assert w.wait(30) == 0, w.output
    assert time.monotonic() - killed <= 1 + 2 + 0.5 + 5, w.output
    assert "the training has finished: stopping" in w.output
    assert w.said[-2:] == ["stop", '{"epochs": 3}'], w.output  # on_stop, the final state


def finished_state_dir(tmp_path: Path) -> Path:
    """A --state-dir whose training (population 4, 2 epochs) has finished."""
    state_dir = tmp_path / "state"
    port = free_port()
    srv = server(port, "--population-size=4", "--max-epochs=2", "--worker-timeout=2s",
                 f"--state-dir={state_dir}")  # fmt: skip
    try:
        wait_for_port(port, srv.popen)
        w = worker(port, "4")
        assert w.wait(60) == 0, w.output
        assert srv.wait(60) == 0, srv.output
    finally:
        srv.kill()
    return state_dir


def test_a_server_restarted_with_a_finished_training_stops_a_reconnecting_worker(
    procs, tmp_path: Path
) -> None:
    state_dir = finished_state_dir(tmp_path)
    port = free_port()
    # The worker is in its reconnect back-off before the server is back.
    w = worker(port, "4")
    procs.append(w)
    time.sleep(1.0)
    srv = server(port, f"--state-dir={state_dir}")
    procs.append(srv)
    started = time.monotonic()
    assert w.wait(30) == 0, w.output
    assert time.monotonic() - started < 15, w.output
    assert w.said[-3:] == ["joined", "stop", '{"epochs": 2}'], w.output
    assert srv.popen.poll() is None  # still answering: other workers may be reconnecting
    srv.popen.send_signal(signal.SIGTERM)
    assert srv.wait(30) == 0, srv.output
    assert "the training has finished (epoch 2 of 2)" in srv.output


def test_a_worker_in_its_back_off_while_a_restarted_server_finishes_stops_too(
    procs, tmp_path: Path
) -> None:
    """Two workers; the server is SIGKILLed near the end and restarted from its directory.
    One worker is frozen (SIGSTOP: "in its back-off") until the restarted server has finished
    the training with the other; then it reconnects, is told, and exits 0."""
    state_dir = tmp_path / "state"
    port = free_port()
    args = ("--population-size=8", "--max-epochs=6", "--worker-timeout=2s",
            f"--state-dir={state_dir}")  # fmt: skip
    srv = server(port, *args)
    procs.append(srv)
    wait_for_port(port, srv.popen)
    first = worker(port, "4", "--evaluate-seconds=0.1")
    second = worker(port, "4", "--evaluate-seconds=0.1")
    procs += [first, second]
    first.wait_for("> optimized 3")
    second.wait_for("> optimized 3")
    srv.kill()
    second.popen.send_signal(signal.SIGSTOP)
    try:
        srv = server(port, f"--state-dir={state_dir}")
        procs.append(srv)
        srv.wait_for("training finished after epoch 6")
        assert first.wait(30) == 0, first.output
    finally:
        second.popen.send_signal(signal.SIGCONT)
    assert second.wait(30) == 0, second.output
    assert second.said[-3:] == ["joined", "stop", '{"epochs": 6}'], second.output
    assert srv.wait(60) == 0, srv.output
    assert "telling reconnecting workers so" in srv.output


def test_evochi_torch_worker_gives_up_after_its_flag(unused_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOCHI_")}
    command = [
        sys.executable, "-m", "evochi_torch", "worker", "tests.e2e.toy_workers:ToyRegression",
        "--server", f"127.0.0.1:{unused_port}", "--give-up-after", "1", "--log-level", "ERROR",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 60
    assert "gave up on the evochi server" in done.stderr
    assert "give_up_after=1s), and it never joined a training" in done.stderr
    assert done.stderr.rstrip().endswith("error: worker 0 on cpu exited with code 3")
    assert "Traceback" not in done.stderr  # one line says it all


def test_a_worker_that_gave_up_is_not_restarted(unused_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOCHI_")}
    command = [
        sys.executable, "-m", "evochi_torch", "worker", "tests.e2e.toy_workers:ToyRegression",
        "--server", f"127.0.0.1:{unused_port}", "--give-up-after", "1", "--restart",
        "--log-level", "ERROR",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("exited with code 3") == 2, done.stderr  # log line + error line
    assert done.stderr.count("gave up on the evochi server") == 1, done.stderr
    assert "restarting it" not in done.stderr
