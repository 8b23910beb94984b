"""One training on a mixed fleet: three real `evochi-torch worker` processes, each sending a
different math library down another of its code paths (as another CPU generation, vendor or
BLAS would), must evaluate every epoch's members around one center.

The update is CPU-independent, so for every strategy no worker ever needs repairing. A
GymWorker's observation statistics come from center episodes that each worker simulates
itself (MuJoCo and the policy's matrix products round per CPU): there the state digest
catches a worker whose statistics came out different, and its next task carries the
training's state, so the centers still agree at every evaluation; a worker whose simulator
differs (observations one ulp off) is repaired every epoch the same way.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evochi.server import EmbeddedServer, ServerConfig
from evochi_torch.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Worker i runs with FLEET[i] (and i + 1 torch threads).
FLEET = [
    {},
    {
        "MKL_CBWR": "COMPATIBLE",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4,AVX512_ICL,AVX512_SPR",
        "EVOCHI_OTHER_SIMULATOR": "1",
    },  # read by fleet_workers.HopperOtherSimulator only
    {"ATEN_CPU_CAPABILITY": "default"},
]


async def train_fleet(
    target: str, strategy: str, population: int, epochs: int, logs: Path
) -> tuple[dict[int, set[str]], float]:
    """Trains with the fleet; returns the center digests seen per epoch and the number of
    repairs the server counted."""
    config = ServerConfig(population_size=population, max_epochs=epochs, worker_timeout=60.0)
    logs.mkdir()
    async with EmbeddedServer(config) as server:
        procs = []
        for i, switches in enumerate(FLEET):
            env = {**os.environ, **switches, "PYTHONPATH": f"{ROOT}:{HERE}",
                   "EVOCHI_CENTER_LOG": str(logs / f"worker{i}.log"),
                   "EVOCHI_FLEET_SIZE": str(len(FLEET))}  # fmt: skip
            command = [sys.executable, "-m", "evochi_torch", "worker", target,
                       "--server", server.address, "--strategy", strategy,
                       "--cores", str(population // 3), "--threads", str(i + 1),
                       "--log-level", "WARNING"]  # fmt: skip
            procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE))
        try:
            await server.wait_finished(timeout=240)
            loop = asyncio.get_running_loop()
            codes = [await loop.run_in_executor(None, p.wait, 60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert codes == [0, 0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
        repairs = sum(
            s.value
            for metric in server.metrics.registry.collect()
            if metric.name == "evochi_state_repairs"
            for s in metric.samples
            if s.name.endswith("_total")
        )
    seen: dict[int, set[str]] = {}
    evaluated_by = 0
    for log in logs.glob("*.log"):
        lines = log.read_text().split()
        evaluated_by += bool(lines)
        for epoch, digest in zip(lines[::2], lines[1::2], strict=True):
            seen.setdefault(int(epoch), set()).add(digest)
    assert evaluated_by >= 2, "the fleet test needs at least two workers evaluating"
    return seen, repairs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_evaluates_around_one_center_on_a_mixed_fleet(strategy, tmp_path):
    seen, repairs = asyncio.run(
        train_fleet("fleet_workers:ToyLogsCenter", strategy, 24, 4, tmp_path / "logs")
    )
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(len(digests) == 1 for digests in seen.values()), seen
    assert repairs == 0  # the update itself never differs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("worker", ["HopperLogsCenter", "HopperOtherSimulator"])
def test_gym_statistics_agree_at_every_evaluation_on_a_mixed_fleet(worker, tmp_path):
    seen, repairs = asyncio.run(
        train_fleet(f"fleet_workers:{worker}", "openai_es", 12, 4, tmp_path / "logs")
    )
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(len(digests) == 1 for digests in seen.values()), seen
    print(f"repairs: {repairs}")
    if worker == "HopperOtherSimulator":  # its observations are off on one worker
        assert repairs > 0
