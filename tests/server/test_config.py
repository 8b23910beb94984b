"""Configuration: durations, EVOCHI_* variables, flags over environment, the CLI."""

from __future__ import annotations

import contextlib
import http.client
import signal
import urllib.request
from pathlib import Path

import pytest

from evochi.server.config import (
    ConfigError,
    ServerConfig,
    explicit_settings,
    parse_duration,
    resolve_config,
)
from evochi.v1 import evochi_pb2 as pb
from tests.server.helpers import StubWorker, cli, free_port, play, run, wait_for_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h2m3s", 3723.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("0", 0.0),
        ("42", 42.0),
        (" 2s ", 2.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_empty_duration() -> None:
    with pytest.raises(ConfigError, match="empty duration"):
        parse_duration("  ")


@pytest.mark.parametrize("text", ["s", "ten", "10x", "1m-3s", "-5s", "1d", "nan", "inf"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


def test_reference_defaults_from_environment() -> None:
    cfg = resolve_config(explicit_settings([], {"EVOCHI_POPULATION_SIZE": "50"}))
    assert cfg.population_size == 50
    assert cfg.port == 8080 and cfg.worker_timeout == 60.0
    assert (cfg.max_workers, cfg.max_epochs, cfg.max_slices_per_eval) == (0, 0, 0)
    assert cfg.log_level == "info" and cfg.heartbeat_interval == 30
    assert cfg.straggler_reissue and cfg.join_token is None and cfg.metrics_port is None


def test_environment_then_flags_win() -> None:
    env = {
        "EVOCHI_POPULATION_SIZE": "100",
        "EVOCHI_SERVER_PORT": "9000",
        "EVOCHI_WORKER_TIMEOUT": "1m30s",
        "EVOCHI_MAX_WORKERS": "8",
        "EVOCHI_MAX_EPOCHS": "20",
        "EVOCHI_MAX_SLICES_PER_EVAL": "3",
        "EVOCHI_LOG_LEVEL": "debug",
        "EVOCHI_JWT_SECRET": "not required, accepted",
        "EVOCHI_JOIN_TOKEN": "join",
        "EVOCHI_STRAGGLER_REISSUE": "false",
        "EVOCHI_TRANSPORT": "GRPCIO",
    }
    cfg = resolve_config(explicit_settings([], env))
    assert cfg.transport == "grpcio"
    assert (cfg.population_size, cfg.port, cfg.worker_timeout) == (100, 9000, 90.0)
    assert (cfg.max_workers, cfg.max_epochs, cfg.max_slices_per_eval) == (8, 20, 3)
    assert cfg.log_level == "debug" and cfg.jwt_secret == "not required, accepted"
    assert cfg.join_token == "join" and not cfg.straggler_reissue
    flags = [
        "--population-size=7",
        "--port=0",
        "--worker-timeout=10s",
        "--max-workers=2",
        "--max-epochs=3",
        "--max-slices-per-eval=1",
        "--log-level=WARNING",
        "--metrics-port=9100",
        "--host=127.0.0.1",
        "--transport=http2",
    ]
    cfg = resolve_config(explicit_settings(flags, env))
    assert cfg.transport == "http2"
    assert (cfg.population_size, cfg.port, cfg.worker_timeout) == (7, 0, 10.0)
    assert (cfg.max_workers, cfg.max_epochs, cfg.max_slices_per_eval) == (2, 3, 1)
    assert cfg.log_level == "warning" and cfg.metrics_port == 9100 and cfg.host == "127.0.0.1"


def test_stored_configuration_fills_what_is_not_given() -> None:
    stored = {"population_size": 30, "max_epochs": 12, "worker_timeout": 5.0, "unknown": 1}
    cfg = resolve_config(explicit_settings(["--max-epochs=20"], {}), stored)
    assert (cfg.population_size, cfg.max_epochs, cfg.worker_timeout) == (30, 20, 5.0)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "population size is required"),
        ([], {"EVOCHI_POPULATION_SIZE": "many"}, "EVOCHI_POPULATION_SIZE must be an integer"),
        ([], {"EVOCHI_POPULATION_SIZE": "0"}, "population_size must be between"),
        (["--population-size=-5"], {}, "population_size must be between"),
        (["--population-size=5", "--max-epochs=-1"], {}, "max_epochs"),
        (["--population-size=5", "--port=70000"], {}, "port"),
        ([], {"EVOCHI_POPULATION_SIZE": "5", "EVOCHI_WORKER_TIMEOUT": "soon"}, "duration"),
        ([], {"EVOCHI_POPULATION_SIZE": "5", "EVOCHI_WORKER_TIMEOUT": "0s"}, "worker_timeout"),
        (["--population-size=5", "--tls-cert=c.pem"], {}, "tls_cert and tls_key"),
        ([], {"EVOCHI_POPULATION_SIZE": "5", "EVOCHI_TRANSPORT": "h3"}, "transport must be one of"),
    ],
)
def test_bad_values_have_clear_errors(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(explicit_settings(argv, env))


def test_dataclass_validates_direct_use() -> None:
    with pytest.raises(ConfigError):
        ServerConfig(population_size=10, worker_timeout=-1)
    with pytest.raises(ConfigError):
        ServerConfig(population_size=2**31)
    assert ServerConfig(population_size=3, worker_timeout=1).heartbeat_interval == 1


def test_help_explains_every_flag_with_env_names() -> None:
    out, _ = cli("--help").communicate(timeout=30)
    for flag in (
        "--population-size",
        "--port",
        "--host",
        "--max-epochs",
        "--max-workers",
        "--worker-timeout",
        "--max-slices-per-eval",
        "--log-level",
        "--metrics-port",
        "--state-dir",
        "--join-token",
        "--tls-cert",
        "--tls-key",
        "--no-straggler-reissue",
        "--transport",
    ):
        assert flag in out
    for var in ("EVOCHI_POPULATION_SIZE", "EVOCHI_SERVER_PORT", "EVOCHI_WORKER_TIMEOUT",
                "EVOCHI_MAX_WORKERS", "EVOCHI_MAX_EPOCHS", "EVOCHI_MAX_SLICES_PER_EVAL",
                "EVOCHI_LOG_LEVEL", "EVOCHI_JWT_SECRET", "EVOCHI_JOIN_TOKEN",
                "EVOCHI_TRANSPORT"):  # fmt: skip
        assert var in out
    assert "default 8080" in out and "default 1m" in out


def test_cli_reports_bad_configuration() -> None:
    proc = cli()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "population size is required" in out
    proc = cli("--population-size=4", "--worker-timeout=forever")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "invalid duration" in out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_shuts_down_cleanly_on_signals(signum: int) -> None:
    port = free_port()
    proc = cli("--host=127.0.0.1", f"--port={port}", env={"EVOCHI_POPULATION_SIZE": "10"})
    try:
        wait_for_port(port, proc)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "listening on 127.0.0.1" in out and "shutting down" in out


@pytest.mark.timeout(60)
def test_cli_runs_a_training_serves_metrics_and_exits_when_finished() -> None:
    port, metrics_port = free_port(), free_port()
    proc = cli(
        "--host=127.0.0.1",
        f"--port={port}",
        f"--metrics-port={metrics_port}",
        "--max-epochs=2",
        "--worker-timeout=4s",
        env={"EVOCHI_POPULATION_SIZE": "6"},
    )
    try:
        wait_for_port(port, proc)
        metrics: list[str] = []

        async def worker() -> None:
            w = StubWorker(f"127.0.0.1:{port}", cores=4)

            def scrape(event: pb.SubscribeResponse) -> bool:
                # After the last share-state answer the server exits: scrapes may fail then.
                with contextlib.suppress(OSError, http.client.HTTPException):
                    url = f"http://127.0.0.1:{metrics_port}/metrics"
                    with urllib.request.urlopen(url, timeout=5) as r:
                        metrics.append(r.read().decode())
                return False

            await play(w, stop_after=scrape)
            await w.close()

        run(worker())
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "worker joined" in out
    assert "epoch=1 seconds=" in out and "epoch=2 seconds=" in out
    assert "reward_mean=" in out and "training finished after epoch 2" in out
    for name in ("evochi_workers", "evochi_epochs_total", "evochi_task_duration_seconds_bucket",
                 "evochi_reassignments_total", "evochi_rejected_requests_total"):  # fmt: skip
        assert name in "".join(metrics), name
    # Scraped during epoch 2 (the scrape at stop may race with the process exiting).
    assert any("evochi_epochs_total 1.0" in m and "evochi_workers 1.0" in m for m in metrics)


def test_finish_linger_defaults_to_twice_the_worker_timeout_and_is_settable() -> None:
    assert ServerConfig(population_size=1).linger_seconds == 120.0
    assert ServerConfig(population_size=1, worker_timeout=2.0).linger_seconds == 10.0
    cfg = resolve_config(explicit_settings(["--population-size=1", "--finish-linger=1m30s"], {}))
    assert cfg.finish_linger == 90.0 and cfg.linger_seconds == 90.0
    cfg = resolve_config(
        explicit_settings([], {"EVOCHI_POPULATION_SIZE": "1", "EVOCHI_FINISH_LINGER": "0"})
    )
    assert cfg.linger_seconds == 0.0
    with pytest.raises(ConfigError, match="finish_linger"):
        ServerConfig(population_size=1, finish_linger=-1.0)
