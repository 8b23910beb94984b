"""`evochi-torch`: train, worker, crash reporting and Ctrl-C, as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from evochi.server import EmbeddedServer, ServerConfig
from evochi_torch.launch import parse_devices, spread
from evochi_torch.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{Path(__file__).parent}"}


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "evochi_torch", *args]


def test_device_parsing_and_spreading() -> None:
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert parse_devices("all") == ([f"cuda:{i}" for i in range(gpus)] or ["cpu"])
    with pytest.raises(ValueError, match="not a device"):
        parse_devices("gpu7")
    assert spread(["cuda:0", "cuda:1"], 3) == ["cuda:0", "cuda:1", "cuda:0"]


def test_help_explains_every_flag() -> None:
    for command in ("train", "worker"):
        out = subprocess.run(launcher(command, "--help"), capture_output=True, text=True, env=ENV)
        assert out.returncode == 0
        for flag in ("--es.sigma", "--es.learning-rate", "--es.population-size"):
            assert flag in out.stdout, (command, flag)
        # The flat spellings are named in the help as deprecated aliases.
        assert "(deprecated alias: --sigma)" in " ".join(out.stdout.split()), command
        if command == "train":
            for flag in ("--run.devices", "--run.cores", "--run.run-dir", "--run.resume",
                         "--run.overwrite"):  # fmt: skip
                assert flag in out.stdout, flag
        else:
            for flag in ("--devices", "--cores", "--server"):
                assert flag in out.stdout, flag
    bad = subprocess.run(launcher("train", "nope:Nothing"), capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "cannot import module 'nope'" in bad.stderr


@pytest.mark.timeout(120)
def test_train_runs_an_embedded_server_and_local_workers(tmp_path) -> None:
    run_dir = ["--run-dir", str(tmp_path / "run")]
    out = subprocess.run(
        launcher("train", "toy_workers:ToyRegression", "--workers", "2", "--max-epochs", "3",
                 *run_dir),
        capture_output=True, text=True, env=ENV, timeout=100,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "trained epochs=3" in out.stdout


@pytest.mark.timeout(120)
def test_train_with_a_strategy_the_user_module_registers(tmp_path) -> None:
    # user_strategy.py registers "mine" (OpenAI-ES under another name, with an option of its
    # own) at import, as a user's module would: the launcher imports it before its flags.
    run_dir = tmp_path / "run"
    out = subprocess.run(
        launcher("train", "user_strategy:Worker", "--es.strategy", "mine",
                 "--es.strategy-options.gradient-scale", "0.5", "--run.workers", "1",
                 "--run.max-epochs", "2", "--run.run-dir", str(run_dir)),
        capture_output=True, text=True, env=ENV, timeout=100,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "deprecated" not in out.stderr  # the current spelling warns of nothing
    assert "trained epochs=2" in out.stdout
    es = json.loads((run_dir / "config.json").read_text())["es"]
    assert es["strategy"] == "mine" and es["strategy_options"] == {"gradient_scale": 0.5}

    helped = subprocess.run(
        launcher("train", "user_strategy:Worker", "--help"), capture_output=True, text=True, env=ENV
    )
    assert helped.returncode == 0
    assert "mine" in helped.stdout and "--es.strategy-options.gradient-scale" in helped.stdout
    builtin = subprocess.run(launcher("train", "--help"), capture_output=True, text=True, env=ENV)
    assert "{" + ",".join(sorted(STRATEGIES)) + "}" in builtin.stdout
    assert "mine" not in STRATEGIES and "mine" not in builtin.stdout

    bad = subprocess.run(
        launcher("train", "user_strategy:Worker", "--es.strategy", "nope", "--run.max-epochs", "1"),
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "invalid choice: 'nope'" in bad.stderr
    assert "'mine'" in bad.stderr and "'openai_es'" in bad.stderr


@contextlib.contextmanager
def terminal_signals() -> Iterator[None]:
    """Ctrl-C and hang-up reach processes started inside as in a terminal. A suite run in a
    shell's background (or under nohup) passes SIGINT/SIGHUP on ignored, and a launcher
    rightly keeps ignoring them: a signal test would wait for ever. (Not preexec_fn: Python
    code between fork and exec in a process with gRPC threads can deadlock or abort.)"""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP)}
    # Handlers, unlike SIG_IGN, are reset to the default by exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _start_worker_cli(target: str, address: str, *extra: str) -> subprocess.Popen:
    with terminal_signals():
        return subprocess.Popen(
            launcher("worker", target, "--server", address, *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip


@pytest.mark.timeout(120)
def test_worker_crashes_are_reported() -> None:
    async def main() -> tuple[int, str]:
        config = ServerConfig(population_size=24, max_epochs=0, worker_timeout=30.0)
        async with EmbeddedServer(config) as server:
            proc = _start_worker_cli(
                "toy_workers:CrashOnFirstTask", server.address, "--workers", "2"
            )
            # Bounded: pytest-timeout cannot be relied on to interrupt a busy event loop.
            await asyncio.to_thread(proc.wait, 100)
            return proc.returncode, proc.stderr.read()

    code, stderr = asyncio.run(main())
    assert code == 1
    assert "worker 0 on cpu exited with code 3" in stderr
    assert "worker 1 on cpu exited with code 3" in stderr


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_worker_cleanly() -> None:
    async def main() -> tuple[int, float, int, int]:
        config = ServerConfig(population_size=24, max_epochs=0, worker_timeout=30.0)
        async with EmbeddedServer(config) as server:
            proc = _start_worker_cli("toy_workers:ToyRegression", server.address, "--workers", "2")
            while server.epoch < 3:
                assert proc.poll() is None, proc.stderr.read()
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            await asyncio.to_thread(proc.wait, 100)
            waited = time.monotonic() - sent
            # With every worker gone the training cannot advance.
            await asyncio.sleep(1.0)
            epoch = server.epoch
            await asyncio.sleep(1.0)
            return proc.returncode, waited, epoch, server.epoch

    code, waited, before, after = asyncio.run(main())
    assert code == 130
    assert waited < 15
    assert before == after


@pytest.mark.timeout(120)
def test_console_script_finds_the_examples_from_a_checkout(tmp_path) -> None:
    # The README's command, as a user types it in the repository root: no PYTHONPATH.
    script = Path(sys.executable).with_name("evochi-torch")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_dir = ["--run.run-dir", str(tmp_path / "run")]  # not the checkout's runs/
    out = subprocess.run(
        [str(script), "train", "examples.cartpole:CartPole", "--run.workers", "1",
         "--run.max-epochs", "2", *run_dir],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=100,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "trained epochs=2" in out.stdout


@pytest.mark.timeout(120)
def test_train_finishes_cleanly_when_the_last_callback_is_slow() -> None:
    # Workers stopped at max_epochs exit while the last on_epoch still runs: a finish,
    # not "every worker process ended".
    from evochi_torch.launch import WorkerSpec, train_processes

    seen: list[int] = []

    def slow(summary) -> None:
        time.sleep(1.0)
        seen.append(summary.epoch)

    config = ServerConfig(population_size=24, max_epochs=2)
    spec = WorkerSpec("toy_workers:ToyRegression", cores=12)
    result = asyncio.run(train_processes(spec, config, ["cpu"], on_epoch=slow))
    assert (result.epochs, result.stopped_early, result.crashed) == (2, False, [])
    assert seen == [1, 2]
