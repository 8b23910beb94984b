"""`train_workers` runs one race for every kind of workers behind the `Supervisor` interface:
finish, early stop, or every worker gone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from evochi.server import ServerConfig
from evochi_torch.launch import Supervisor, WorkerExit, WorkerSpec, train_workers


class GoneWorkers:
    """Workers that never join and end at once, each with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.exits: list[WorkerExit] = []
        self.grace = 0.1
        self.stopped = False

    async def supervise(self) -> list[WorkerExit]:
        self.exits = [WorkerExit(0, "fake", self.code), WorkerExit(1, "fake", self.code)]
        return self.exits

    def stop(self) -> None:
        self.stopped = True


def test_workers_that_all_end_before_the_training_are_an_error_and_are_stopped() -> None:
    started: list[GoneWorkers] = []

    async def start(spec: WorkerSpec, server: Any) -> Supervisor:
        assert server.address  # the embedded server runs before the workers start
        started.append(GoneWorkers(1))
        return started[-1]

    config = ServerConfig(population_size=4, worker_timeout=5.0)
    with pytest.raises(RuntimeError, match="every worker ended before the training finished"):
        asyncio.run(train_workers(WorkerSpec("m:C"), config, start))
    assert started[0].stopped
    assert "worker 1 on fake exited with code 1" in " ".join(e.describe() for e in started[0].exits)
