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
import threading
from pathlib import Path

import pytest

import evochi.v1 as evochi
from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi.v1 import evochi_pb2 as pb
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


def steps_of(epoch: int, member: int) -> float:
    return float(epoch * 100 + member)


class OurMetricWorker(OurWorker):
    """Reports env steps per member (the metrics extension); its first evaluation waits
    for ``gate``, so that a worker joining meanwhile gets the rest of that epoch."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.members: dict[int, list[int]] = {}

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        self.gate.wait()
        members = [m for s in slices for m in range(s.start, s.stop)]
        self.members.setdefault(epoch, []).extend(members)
        rewards = [reward_of(epoch, m) for m in members]
        steps = [steps_of(epoch, m) for m in members]
        return evochi.Eval.from_flat(slices, rewards, {"env_steps": steps})


def test_published_workers_and_metric_reporting_workers_share_a_training(
    published_python: str,
) -> None:
    """The published client knows nothing of the metrics extension: it trains side by side
    with our workers that send metrics, and the summary says the sum is partial."""
    population, epochs = 24, 4

    async def scenario() -> None:
        summaries: list[EpochSummary] = []
        # No straggler copies: each member's result comes from the worker it was given to.
        config = ServerConfig(
            population_size=population, max_epochs=epochs, worker_timeout=20,
            straggler_reissue=False,
        )  # fmt: skip
        async with EmbeddedServer(config, on_epoch=summaries.append) as server:
            ours = OurMetricWorker(server.address, cores=5)
            training = asyncio.ensure_future(ours.start())
            while server.state is None:  # ours initialized and holds its first slice
                await asyncio.sleep(0.02)
            published = asyncio.ensure_future(published_worker(published_python, server.address, 9))
            while len(server.service.core.workers) < 2 and not published.done():
                await asyncio.sleep(0.02)
            ours.gate.set()
            their_state = await published
            await training
            await ours.close()
        assert their_state == ours.state == expected_state(epochs, population)
        assert [s.epoch for s in summaries] == list(range(1, epochs + 1))
        for s in summaries:
            mine = ours.members.get(s.epoch, [])
            assert s.metric_members.get("env_steps", 0) == len(mine)
            assert s.metrics.get("env_steps", 0.0) == sum(steps_of(s.epoch, m) for m in mine)
        # Epoch 1 was shared (ours held 5 members while the published worker joined).
        assert 0 < summaries[0].metric_members["env_steps"] < population
        assert not summaries[0].metric_exact("env_steps")

    run(scenario(), timeout=240)


PARSE_WITH_PUBLISHED_CODE = """
import json, sys
from evochi.v1 import evochi_pb2 as pb
request = pb.FinishEvaluationRequest.FromString(bytes.fromhex(sys.argv[1]))
fields = [f.name for f in pb.Evaluation.DESCRIPTOR.fields]
evaluations = [[e.slice.start, e.slice.end, list(e.rewards)] for e in request.evaluations]
request.DiscardUnknownFields()
print(json.dumps({"module": pb.__file__, "fields": fields, "task_id": request.task_id,
                  "evaluations": evaluations, "reserialized": request.SerializeToString().hex()}))
"""


def test_the_published_clients_generated_code_skips_the_metrics_extension(
    published_python: str,
) -> None:
    new = pb.FinishEvaluationRequest(
        task_id="task-7",
        evaluations=[
            pb.Evaluation(
                slice=pb.Slice(start=2, end=4),
                rewards=[0.5, 3.0],
                metrics=[pb.Metric(name="env_steps", values=[17, 250])],
            )
        ],
    )
    out = subprocess.run(
        # -P: not this checkout's evochi from the working directory, the published one.
        [published_python, "-P", "-c", PARSE_WITH_PUBLISHED_CODE, new.SerializeToString().hex()],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = json.loads(out.stdout)
    assert Path(parsed["module"]).is_relative_to(VENV)
    assert parsed["fields"] == ["slice", "rewards"]  # really the pre-extension schema
    assert parsed["task_id"] == "task-7"
    assert parsed["evaluations"] == [[2, 4, [0.5, 3.0]]]
    del new.evaluations[0].metrics[:]
    assert bytes.fromhex(parsed["reserialized"]) == new.SerializeToString()
