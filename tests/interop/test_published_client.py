"""Interoperability with the *published* Python client (evochi 0.1.4 on PyPI), the program
itself: its workers train on our server, alone and side by side with ours.

That client needs Python >= 3.12 (it uses PEP 695 generics), so it runs in its own
virtualenv, ``.venv-interop`` (created on first use with ``pip install evochi==0.1.4``), in
worker processes started by the test. Set ``EVOCHI_INTEROP_PYTHON`` to choose the
interpreter; without one >= 3.12, or without the package index, the tests are skipped
with the reason.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, ServerConfig
from tests.server.helpers import run

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-interop"
PUBLISHED = "evochi==0.1.4"
WORKER_SCRIPT = Path(__file__).with_name("published_worker.py")

pytestmark = pytest.mark.timeout(600)


def _python312() -> str | None:
    candidates = [os.environ.get("EVOCHI_INTEROP_PYTHON", "")]
    candidates += [shutil.which(f"python3.{minor}") or "" for minor in (12, 13, 14)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")))
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 12))"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="module")
def published_python() -> str:
    """The interpreter of a virtualenv holding the published client."""
    python = VENV / "bin" / "python"
    stamp = VENV / f".{PUBLISHED}"
    if not stamp.exists():
        base = _python312()
        if base is None:
            pytest.skip("the published client needs Python >= 3.12; none found")
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", PUBLISHED],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if install.returncode != 0:
            pytest.skip(f"cannot install {PUBLISHED}: {install.stderr.strip()[-300:]}")
        stamp.touch()
    return str(python)


def reward_of(epoch: int, member: int) -> float:
    return float((epoch * 7 + member * 3) % 11)  # as published_worker.py


def expected_state(epochs: int, population: int) -> dict[str, float]:
    total = sum(reward_of(e, m) for e in range(1, epochs + 1) for m in range(population))
    return {"epochs": epochs, "total": total, "evaluated": epochs * population}


class OurWorker(evochi.Worker[dict]):
    """The same worker as published_worker.py, on our client (default zstd+pickle codec)."""

    def initialize(self) -> dict:
        return {"epochs": 0, "total": 0.0, "evaluated": 0}

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        rewards = [reward_of(epoch, m) for s in slices for m in range(s.start, s.stop)]
        return evochi.Eval.from_flat(slices, rewards)

    def optimize(self, epoch: int, rewards: list[float]) -> dict:
        state = self.state
        return {
            "epochs": state["epochs"] + 1,
            "total": state["total"] + sum(rewards),
            "evaluated": state["evaluated"] + len(rewards),
        }


async def published_worker(python: str, address: str, cores: int) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        python, str(WORKER_SCRIPT), address, str(cores),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ""},  # the published evochi, not this checkout
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_published_workers_train_on_our_server(published_python: str, transport: str) -> None:
    population, epochs = 20, 5

    async def scenario() -> None:
        config = ServerConfig(
            population_size=population, max_epochs=epochs, worker_timeout=10, transport=transport
        )
        async with EmbeddedServer(config) as server:
            states = await asyncio.gather(
                published_worker(published_python, server.address, 7),
                published_worker(published_python, server.address, 6),
            )
            assert server.finished and server.epoch == epochs
        for state in states:
            assert state == expected_state(epochs, population)

    run(scenario(), timeout=240)


def test_a_fleet_of_published_and_our_workers_shares_one_training(published_python: str) -> None:
    population, epochs = 24, 6

    async def scenario() -> None:
        config = ServerConfig(population_size=population, max_epochs=epochs, worker_timeout=10)
        async with EmbeddedServer(config) as server:
            ours = OurWorker(server.address, cores=5)
            published = asyncio.ensure_future(published_worker(published_python, server.address, 9))
            await ours.start()
            their_state = await published
            await ours.close()
        assert their_state == ours.state == expected_state(epochs, population)

    run(scenario(), timeout=240)
