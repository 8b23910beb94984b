"""Ray-launched workers on a real local Ray cluster (2 CPUs, loopback only): the same bits as
the local launcher, a SIGKILLed actor restarted by Ray that joins again, and the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evochi.server import EmbeddedServer, EpochSummary, ServerConfig
from evochi_torch import ESConfig, TorchESState
from evochi_torch.__main__ import main
from evochi_torch.codec import decode_state
from evochi_torch.launch import WorkerSpec, train_processes

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'evochi[ray]'")

from evochi_torch.ray import RayPlacement, start_workers, train_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 6
TARGET = "examples.cartpole:CartPole"
CONFIG = ESConfig(population_size=32, sigma=0.2, learning_rate=0.2, optimizer="adam", seed=3)


def spec() -> WorkerSpec:
    return WorkerSpec(TARGET, cores=16, kwargs={"config": CONFIG}, threads=1)


def server_config(max_epochs: int = EPOCHS) -> ServerConfig:
    return ServerConfig(population_size=32, max_epochs=max_epochs, worker_timeout=60.0)


def run(coro, timeout: float = 240.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


class Final:
    """Records the last epoch's state (the training's result)."""

    def __init__(self) -> None:
        self.state: bytes | None = None
        self.epochs: list[int] = []

    def __call__(self, summary: EpochSummary) -> None:
        self.state = summary.state
        self.epochs.append(summary.epoch)

    def decoded(self) -> TorchESState:
        assert self.state is not None, "no epoch completed"
        return decode_state(self.state)


def assert_same(a: TorchESState, b: TorchESState) -> None:
    assert a.epoch == b.epoch == EPOCHS
    assert torch.equal(a.params, b.params)  # bitwise, not allclose
    for key in a.opt_state:
        assert torch.equal(a.opt_state[key], b.opt_state[key]), key


@pytest.fixture(scope="module")
def local_cluster():
    # Everything on loopback, small: tests share a 2-core machine.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference() -> TorchESState:
    """The local launcher's result: two worker processes, same seed."""
    final = Final()
    result = run(train_processes(spec(), server_config(), ["cpu", "cpu"], on_epoch=final))
    assert result.epochs == EPOCHS and not result.crashed
    return final.decoded()


@pytest.mark.timeout(300)
def test_ray_training_gives_the_local_launchers_bits(local_cluster, reference) -> None:
    final = Final()
    result = run(train_ray(spec(), server_config(), RayPlacement(num_workers=2), on_epoch=final))
    assert (result.epochs, result.stopped_early, result.crashed) == (EPOCHS, False, [])
    assert final.epochs == list(range(1, EPOCHS + 1))
    assert_same(final.decoded(), reference)


@pytest.mark.timeout(300)
def test_a_killed_actor_is_restarted_and_joins_again(local_cluster, reference) -> None:
    # One actor: after its SIGKILL the training can only finish if Ray restarts it and the
    # new process joins again.
    async def main():
        final = Final()
        async with EmbeddedServer(server_config(), on_epoch=final) as server:
            workers = start_workers(spec(), server.address, RayPlacement(num_workers=1))
            try:
                while server.epoch < 3:
                    await asyncio.sleep(0.05)
                [before] = await asyncio.to_thread(workers.info)
                os.kill(before["pid"], signal.SIGKILL)
                await server.wait_finished()
                [after] = await asyncio.to_thread(workers.info)
                joins = server.metrics.joins._value.get()
                await asyncio.to_thread(workers.wait, 60)
            finally:
                await asyncio.to_thread(workers.stop)
        return final, before, after, joins, workers.exits

    final, before, after, joins, exits = run(main())
    assert not before["restarted"]
    assert after["restarted"] and after["pid"] != before["pid"]
    assert joins == 2  # the first process, then its replacement as a new worker
    assert [(e.index, e.exitcode) for e in exits] == [(0, 0)]
    # Losing the worker mid-training loses nothing: the same bits as the fault-free run.
    assert_same(final.decoded(), reference)


@pytest.mark.timeout(300)
def test_cli_train_with_ray_joins_a_running_cluster(local_cluster, tmp_path: Path) -> None:
    # `--ray ADDRESS`: a second driver on the test's cluster, as a user would join one.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "evochi_torch", "train", TARGET, "--ray", local_cluster,
         "--num-workers", "2", "--max-epochs", "3", "--seed", "3", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained epochs=3" in out.stdout
    # A Ray training goes through the harness like any other: it leaves its run directory.
    assert (tmp_path / "checkpoint.safetensors").exists()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_cli_explains_bad_ray_flags(capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> tuple[int, str]:
        code = main(["worker", TARGET, "--server", "h:1", *args])
        return code, capsys.readouterr().err

    assert cli("--ray", "auto") == (2, "error: --ray needs --num-workers N\n")
    code, err = cli("--ray", "auto", "--num-workers", "2", "--devices", "cuda:0")
    assert code == 2 and "use --gpus-per-worker" in err
    code, err = cli("--ray", "auto", "--num-workers", "0")
    assert code == 2 and "--num-workers must be positive" in err
    code, err = cli("--ray", "auto", "--num-workers", "1", "--gpus-per-worker", "1.5")
    assert code == 2 and "must be whole" in err


@pytest.mark.timeout(300)
def test_cli_workers_leave_and_end_on_sigterm(local_cluster, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "workers.log"

    async def main() -> int:
        config = ServerConfig(population_size=32, max_epochs=0, worker_timeout=60.0)
        async with EmbeddedServer(config) as server:
            with log.open("w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "evochi_torch", "worker", TARGET,
                     "--server", server.address, "--ray", local_cluster, "--num-workers", "2",
                     "--cores", "16"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                )  # fmt: skip
            workers = server.metrics.workers
            while server.epoch < 3 or workers._value.get() < 2:
                assert proc.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None:
                await asyncio.sleep(0.1)
            # Both actors left the training (not timed out: the server saw them go)...
            while workers._value.get() > 0:
                await asyncio.sleep(0.05)
            return proc.returncode

    assert run(main()) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "terminated by SIGTERM; workers stopped" in log.read_text()
    # ...and Ray got their CPUs back: the actors are gone, not restarted.
    while ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.1)


def test_a_missing_ray_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = main(["worker", TARGET, "--server", "h:1", "--ray", "local", "--num-workers", "1"])
    assert code == 2
    assert "pip install 'evochi[ray]'" in capsys.readouterr().err
