"""`make gpu-check` (benchmarks/gpu_check.py) and the CUDA-only tests it runs.

On a machine without a GPU the check must skip cleanly and say why; its code paths still run
here on the CPU (`--device cpu --quick`), so they cannot rot before a GPU shows up. Tests
with "cuda" in their name are the ones `make gpu-check` selects."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evochi.server import EpochSummary, ServerConfig
from evochi_torch.codec import decode_state
from evochi_torch.launch import WorkerSpec, train_processes

ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=280,
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_skips_cleanly_without_a_gpu() -> None:
    out = gpu_check()
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.splitlines()
    assert line.startswith("gpu-check: skipped: ")
    reason = "CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
    assert reason in line and "nothing was run" in line


def test_gpu_check_rejects_a_missing_device() -> None:
    # cuda:7 on a machine with fewer GPUs (or none): a skip that names the problem.
    out = gpu_check("--device", "cuda:7")
    assert out.returncode == 0 and "gpu-check: skipped: " in out.stdout
    if torch.cuda.is_available() and torch.cuda.device_count() < 8:
        assert "cuda:7 does not exist" in out.stdout


@pytest.mark.timeout(300)
def test_gpu_check_code_paths_run_on_the_cpu() -> None:
    out = gpu_check("--device", "cpu", "--quick")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for name in ("cuda-tests", "cartpole", "population_forward", "es_update", "lowrank"):
        [line] = [x for x in lines if x.startswith(f"gpu-check {name}: ")]
        assert ": ok (" in line, line
    assert "trained epochs=3" in out.stdout
    assert "device=cpu" in out.stdout  # population_forward ran with --device
    assert "x of inference" in out.stdout  # the low-rank step was timed against inference
    assert lines[-1].startswith("gpu-check: 5/5 checks ok on cpu")


@needs_cuda
@pytest.mark.timeout(300)
def test_cuda_worker_evaluates_on_the_device() -> None:
    final: list[bytes] = []

    def record(summary: EpochSummary) -> None:
        final[:] = [summary.state]

    spec = WorkerSpec("gpu_workers:CartPoleOnDevice", cores=32, threads=1)
    config = ServerConfig(population_size=32, max_epochs=3)
    result = asyncio.run(train_processes(spec, config, ["cuda:0"], on_epoch=record))
    assert (result.epochs, result.crashed) == (3, [])
    # The center stays a host tensor: the update is the same bits on every worker.
    state = decode_state(final[0])
    assert state.epoch == 3 and state.params.device.type == "cpu"
    assert torch.isfinite(state.params).all()


@needs_cuda
def test_cuda_host_to_device_traffic_per_epoch_is_o_of_params() -> None:
    from benchmarks.gpu_check import device_epoch

    r = device_epoch(torch.device("cuda:0"), num_params=100_000, members=64, epochs=2)
    # Only the center, offsets and signs cross per epoch, not the members' parameters.
    assert 0 < r["h2d_bytes_per_epoch"] < r["host_built_bytes_per_epoch"] / 10
