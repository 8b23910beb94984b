"""examples/slurm/evochi.sbatch on a real SLURM (one node: `.ci/slurm-setup` brings it up):
a job requeued mid-training (as after a preemption) continues the same training from its
state directory and ends with the same bits as an uninterrupted local run."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evochi.server import EpochSummary, ServerConfig
from evochi.server.store import CheckpointStore
from evochi_torch.codec import decode_state
from evochi_torch.launch import WorkerSpec, train_processes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "evochi.sbatch"
EPOCHS = 40


def slurm_missing() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed here (as root, .ci/slurm-setup installs and starts it)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if not re.search(r"^(idle|mixed)", out.stdout, re.M):
        said = out.stdout.strip() or out.stderr.strip()
        return f"no idle SLURM node (sinfo: {said!r}); as root, .ci/slurm-setup starts one"
    return None


MISSING = slurm_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    match = re.search(r"JobState=(\w+)", out.stdout)
    return match.group(1) if match else f"unknown ({out.stderr.strip()})"


def wait_for(what: str, check, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"timed out waiting for {what}; job log:\n{tail}")


@pytest.mark.timeout(600)
def test_a_requeued_job_continues_the_same_training(tmp_path: Path) -> None:
    final: list[bytes] = []

    def record(summary: EpochSummary) -> None:
        final[:] = [summary.state]

    # The uninterrupted reference: the worker class's defaults, like the script.
    spec = WorkerSpec("examples.cartpole:CartPole", cores=32, threads=1)
    config = ServerConfig(population_size=32, max_epochs=EPOCHS)
    asyncio.run(train_processes(spec, config, ["cpu"], on_epoch=record))
    reference = decode_state(final[0])

    state_dir = tmp_path / "state"
    log = tmp_path / "job.log"
    port = free_port()
    env = {
        **os.environ,
        # The job inherits this environment: the checkout's evochi and its console scripts.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "EVOCHI_STATE_DIR": str(state_dir),
        "EVOCHI_MAX_EPOCHS": str(EPOCHS),
        "EVOCHI_PORT": str(port),
        # Loopback only (tests never leave the machine); a real cluster uses the defaults.
        "EVOCHI_SERVER_HOST": "127.0.0.1",
        "EVOCHI_LISTEN_HOST": "127.0.0.1",
    }
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", f"--job-name=evochi-test-{port}", str(SCRIPT)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    )  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]
    try:

        def stored_epoch() -> int:
            try:
                checkpoint = CheckpointStore(state_dir).load()
            except Exception:  # mid-write is impossible (atomic rename), but be safe
                return 0
            return checkpoint.epoch if checkpoint is not None else 0

        # Preempt it mid-training: SLURM kills the job and puts it back in the queue.
        wait_for("epoch 3 in the state dir", lambda: stored_epoch() >= 3, 300, log)
        interrupted_at = stored_epoch()
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
        wait_for("the job back in the queue", lambda: job_state(job) == "PENDING", 120, log)
        # A requeued job waits ~2 minutes (BeginTime) before it may start again: skip that.
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
        wait_for(
            "the requeued job to finish",
            lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
            400,
            log,
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)

    text = log.read_text()
    assert job_state(job) == "COMPLETED", text[-3000:]
    assert f"job {job} run 0 on" in text and f"job {job} run 1 on" in text, text[-3000:]
    assert interrupted_at < EPOCHS
    # The second run resumed: it did not start again from epoch 1.
    second_run = text.split(f"job {job} run 1 on", 1)[1]
    assert " epoch=1 " not in second_run and f" epoch={EPOCHS} " in second_run, second_run[-3000:]
    checkpoint = CheckpointStore(state_dir).load()
    assert checkpoint is not None
    result = decode_state(checkpoint.state)
    assert result.epoch == reference.epoch == EPOCHS
    assert torch.equal(result.params, reference.params)  # bitwise, not allclose
    for key in reference.opt_state:
        assert torch.equal(result.opt_state[key], reference.opt_state[key]), key
