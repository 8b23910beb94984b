"""A clean end with the *published* client (evochi 0.1.4): a straggler still evaluating
when the last epoch completes gets OK for its late result, its `start()` returns and its
process exits 0, on both transports, embedded and with the standalone server (which exits 0
once the straggler is done); a published worker joining a server restarted with a finished
training is told so (hello + stop) and exits 0. Skipped like test_published_client.py
without Python >= 3.12.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from evochi.server import EmbeddedServer, ServerConfig
from tests.interop.test_published_client import (
    expected_state,
    published_python,  # noqa: F401 (the fixture)
    published_worker,
)
from tests.server.helpers import cli, free_port, run, wait_for_port

pytestmark = pytest.mark.timeout(600)

POP, EPOCHS = 12, 3
STRAGGLER_SCRIPT = Path(__file__).with_name("published_straggler.py")


class Straggler:
    """published_straggler.py in its own process. It starts alone, so it trains the first
    epochs by itself and holds a task of the last one (it says "straggling") before the
    fast worker is started: that one finishes the training with the re-issued slices."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, python: str, address: str, cores: int, release: Path) -> Straggler:
        proc = await asyncio.create_subprocess_exec(
            python, str(STRAGGLER_SCRIPT), address, str(cores), str(release),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": ""},  # the published evochi, not this checkout
        )  # fmt: skip
        return cls(proc)

    async def straggling(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if line.decode().strip() != "straggling":
            _, err = await self.proc.communicate()
            raise AssertionError(f"expected 'straggling', got {line!r}: {err.decode()[-2000:]}")

    async def result(self) -> dict[str, float]:
        out, err = await asyncio.wait_for(self.proc.communicate(), 120)
        assert self.proc.returncode == 0, err.decode()[-2000:]  # start() raised on an error
        return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_a_published_straggler_ends_cleanly_on_the_embedded_server(
    published_python: str,  # noqa: F811
    transport: str,
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"

    async def scenario() -> None:
        config = ServerConfig(
            population_size=POP,
            max_epochs=EPOCHS,
            worker_timeout=30,
            straggler_min_seconds=0.2,
            transport=transport,
        )
        async with EmbeddedServer(config) as server:
            slow = await Straggler.start(published_python, server.address, POP // 2, release)
            await slow.straggling()
            fast = asyncio.ensure_future(
                published_worker(published_python, server.address, POP // 2)
            )
            await server.wait_finished(timeout=150)
            assert server.service.core.outstanding_results(0.0) == 1
            release.touch()
            assert await fast == expected_state(EPOCHS, POP)
            # It missed the last optimize (stop came first) and ended without an error.
            assert await slow.result() == expected_state(EPOCHS - 1, POP)
            assert await server.wait_drained(timeout=60)

    run(scenario(), timeout=300)


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_the_standalone_server_exits_0_after_a_published_straggler(
    published_python: str,  # noqa: F811
    transport: str,
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    port = free_port()
    server = cli(
        "--host=127.0.0.1", f"--port={port}", f"--population-size={POP}",
        f"--max-epochs={EPOCHS}", "--worker-timeout=30s", f"--transport={transport}",
    )  # fmt: skip
    try:

        async def scenario() -> None:
            await asyncio.to_thread(wait_for_port, port, server)
            address = f"127.0.0.1:{port}"
            slow = await Straggler.start(published_python, address, POP // 2, release)
            await slow.straggling()
            # The fast worker's start() returns at stop: the training ended without `slow`.
            assert await published_worker(published_python, address, POP // 2) == expected_state(
                EPOCHS, POP
            )
            # Longer than a shutdown's grace period (2 s): a server that does not wait for
            # owed results is gone by now and the straggler's result fails.
            await asyncio.sleep(3.0)
            assert server.poll() is None
            release.touch()
            assert await slow.result() == expected_state(EPOCHS - 1, POP)

        run(scenario(), timeout=300)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, out


def test_a_published_worker_is_told_that_a_restarted_servers_training_has_finished(
    published_python: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The standalone server restarted from the --state-dir of a finished training answers a
    published worker's Subscribe with hello (the final state) + stop: its `start()` returns
    and it exits 0 holding the final state, as at any normal end."""
    port = free_port()
    args = ("--host=127.0.0.1", f"--port={port}", f"--state-dir={tmp_path / 'state'}")
    address = f"127.0.0.1:{port}"
    server = cli(*args, f"--population-size={POP}", f"--max-epochs={EPOCHS}",
                 "--worker-timeout=30s")  # fmt: skip
    try:

        async def train() -> None:
            await asyncio.to_thread(wait_for_port, port, server)
            final = await published_worker(published_python, address, POP)
            assert final == expected_state(EPOCHS, POP)

        run(train(), timeout=300)
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
        server = cli(*args)

        async def rejoin() -> None:
            await asyncio.to_thread(wait_for_port, port, server)
            final = await published_worker(published_python, address, POP)
            assert final == expected_state(EPOCHS, POP)

        run(rejoin(), timeout=300)
        assert server.poll() is None  # still answering: others may be reconnecting
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, out
    assert f"the training has finished (epoch {EPOCHS} of {EPOCHS})" in out
