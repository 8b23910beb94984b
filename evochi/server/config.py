"""Server configuration: the ``ServerConfig`` dataclass, ``EVOCHI_*`` variables and flags.

Precedence, highest first: command-line flags, environment variables, the configuration
stored in ``--state-dir`` (when restarting a training), built-in defaults (the reference
server's).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evochi.errors import EvochiError

__all__ = ["ConfigError", "ServerConfig", "build_parser", "parse_duration", "resolve_config"]

LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
TRANSPORTS = ("http2", "grpcio")
INT32_MAX = 2**31 - 1


class ConfigError(EvochiError, ValueError):
    """A configuration value that cannot be used; the message names the setting."""


@dataclass
class ServerConfig:
    """Everything that shapes a training and the server around it.

    ``worker_timeout`` is in seconds: a worker that misses a heartbeat or does not finish a
    task within it is removed and its work re-assigned. After a missed task deadline the next
    tasks of that kind get twice as long, up to 16x, so that a lone worker slower than the
    deadline still gets through. Heartbeats are requested every ``worker_timeout / 2`` whole
    seconds (at least 1).
    """

    population_size: int
    max_epochs: int = 0
    max_workers: int = 0
    worker_timeout: float = 60.0
    max_slices_per_eval: int = 0
    # Straggler re-issue: when every slice is handed out and a worker is idle, a copy of an
    # evaluate task older than max(straggler_min_seconds, straggler_factor * expected
    # duration) goes to the idle worker; the first result wins.
    straggler_reissue: bool = True
    straggler_factor: float = 2.0
    straggler_min_seconds: float = 1.0
    # Work goes only to workers that sent their first heartbeat (the token from hello): a
    # peer that subscribes and never reads its stream cannot hold slices. Off only for a
    # client that waits a whole interval before its first heartbeat.
    heartbeat_before_work: bool = True
    # Subscribe must carry this token (``authorization: Bearer <token>``) when set.
    join_token: str | None = None
    # Signs the per-worker tokens (HS512 JWT); a random secret per server when unset.
    jwt_secret: str | None = None
    # Directory for the checkpoint (epoch + start state + configuration); None = memory only.
    state_dir: str | None = None
    # Resume: start at epoch ``start_epoch`` from the encoded state in this file (no
    # initialize task). A checkpoint in ``state_dir`` wins. EmbeddedServer also takes the
    # state as bytes (``initial_state=``).
    initial_state_file: str | None = None
    start_epoch: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    # gRPC message limit in both directions; states of real policies exceed gRPC's 4 MiB.
    max_message_bytes: int = 1 << 30
    # "http2": evochi's own gRPC transport on asyncio (fast); "grpcio": grpc.aio's server.
    transport: str = "http2"
    # Standalone server only (EmbeddedServer takes host and port as arguments).
    host: str = "0.0.0.0"
    port: int = 8080
    metrics_port: int | None = None
    log_level: str = "info"
    # Standalone server only: after the finish, keep answering Subscribe (hello + stop) until
    # this many seconds have passed since a worker may last have started reconnecting (one
    # was lost, or the server continued a stored training), so that workers in their
    # reconnect back-off learn that the training has finished. None: max(10 s,
    # 2 x worker_timeout); evochi workers retry at least once per heartbeat interval.
    finish_linger: float | None = None

    def __post_init__(self) -> None:
        def check_int(name: str, low: int, high: int = INT32_MAX) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, got {value}")

        check_int("population_size", 1)
        check_int("max_epochs", 0)
        check_int("max_workers", 0)
        check_int("max_slices_per_eval", 0)
        check_int("port", 0, 65535)
        check_int("max_message_bytes", 1024, INT32_MAX)
        check_int("start_epoch", 1)
        if self.start_epoch != 1 and not self.initial_state_file:
            raise ConfigError(
                f"start_epoch {self.start_epoch} needs the state that epoch starts from: "
                "initial_state_file (--initial-state FILE)"
            )
        if self.metrics_port is not None:
            check_int("metrics_port", 0, 65535)
        if self.finish_linger is not None:
            value = self.finish_linger
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"finish_linger must be a finite non-negative number, got "
                                  f"{value!r}")  # fmt: skip
        for name in ("worker_timeout", "straggler_factor", "straggler_min_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.worker_timeout <= 0:
            raise ConfigError(f"worker_timeout must be positive, got {self.worker_timeout}")
        self.worker_timeout = float(self.worker_timeout)
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")
        if self.transport not in TRANSPORTS:
            raise ConfigError(
                f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}"
            )
        if self.join_token == "":
            self.join_token = None

    @property
    def heartbeat_interval(self) -> int:
        return max(1, int(self.worker_timeout / 2))

    @property
    def linger_seconds(self) -> float:
        """How long a finished standalone server keeps answering (see ``finish_linger``)."""
        if self.finish_linger is not None:
            return float(self.finish_linger)
        return max(10.0, 2.0 * self.worker_timeout)

    @property
    def logging_level(self) -> int:
        level = self.log_level.lower()
        return {"warn": logging.WARNING}.get(level, getattr(logging, level.upper()))

    def stored_fields(self) -> dict[str, Any]:
        """The training-shaping settings written next to a checkpoint."""
        return {
            "population_size": self.population_size,
            "max_epochs": self.max_epochs,
            "max_workers": self.max_workers,
            "worker_timeout": self.worker_timeout,
            "max_slices_per_eval": self.max_slices_per_eval,
            "straggler_reissue": self.straggler_reissue,
        }


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string (``10s``, ``1m30s``, ``500ms``); a bare number is seconds."""
    raw = text.strip()
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"invalid duration {text!r}")
        return value
    if not raw:
        raise ConfigError("empty duration")
    pos, total = 0, 0.0
    while pos < len(raw):
        match = _DURATION_PART.match(raw, pos)
        if match is None:
            raise ConfigError(
                f"invalid duration {text!r}: expected e.g. 10s, 1m30s, 500ms (units ns us ms s m h)"
            )
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total


def _int(text: str, name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from None


def _bool(text: str, name: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {text!r}")


# field name -> (environment variable, parser from string)
ENVIRONMENT: dict[str, tuple[str, Any]] = {
    "population_size": ("EVOCHI_POPULATION_SIZE", _int),
    "port": ("EVOCHI_SERVER_PORT", _int),
    "host": ("EVOCHI_SERVER_HOST", lambda v, _n: v.strip()),
    "worker_timeout": ("EVOCHI_WORKER_TIMEOUT", lambda v, _n: parse_duration(v)),
    "max_workers": ("EVOCHI_MAX_WORKERS", _int),
    "max_epochs": ("EVOCHI_MAX_EPOCHS", _int),
    "max_slices_per_eval": ("EVOCHI_MAX_SLICES_PER_EVAL", _int),
    "log_level": ("EVOCHI_LOG_LEVEL", lambda v, _n: v.strip()),
    "jwt_secret": ("EVOCHI_JWT_SECRET", lambda v, _n: v),
    "metrics_port": ("EVOCHI_METRICS_PORT", _int),
    "state_dir": ("EVOCHI_STATE_DIR", lambda v, _n: v),
    "initial_state_file": ("EVOCHI_INITIAL_STATE", lambda v, _n: v),
    "start_epoch": ("EVOCHI_START_EPOCH", _int),
    "join_token": ("EVOCHI_JOIN_TOKEN", lambda v, _n: v),
    "tls_cert": ("EVOCHI_TLS_CERT", lambda v, _n: v),
    "tls_key": ("EVOCHI_TLS_KEY", lambda v, _n: v),
    "straggler_reissue": ("EVOCHI_STRAGGLER_REISSUE", _bool),
    "heartbeat_before_work": ("EVOCHI_HEARTBEAT_BEFORE_WORK", _bool),
    "max_message_bytes": ("EVOCHI_MAX_MESSAGE_BYTES", _int),
    "transport": ("EVOCHI_TRANSPORT", lambda v, _n: v.strip().lower()),
    "finish_linger": ("EVOCHI_FINISH_LINGER", lambda v, _n: parse_duration(v)),
}


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _env(field: str) -> str:
    return ENVIRONMENT[field][0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evochi-server",
        description=(
            "Evochi server: coordinates distributed Evolution Strategies workers over the "
            "evochi.v1 gRPC protocol. Every flag can also be set by the environment variable "
            "named in its help; flags win over the environment."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Durations are Go-style: 500ms, 10s, 1m30s, 2h (a bare number is seconds).\n"
            "With --state-dir, settings not given again are taken from the stored training.\n"
            "EVOCHI_JWT_SECRET signs the per-worker tokens (HS512 JWT; random if unset)."
        ),
    )
    add = parser.add_argument
    add(
        "--population-size",
        type=int,
        metavar="N",
        help=(
            f"members per epoch (required unless stored in --state-dir) [{_env('population_size')}]"
        ),
    )
    add("--host", metavar="ADDR", help=f"address to listen on (default 0.0.0.0) [{_env('host')}]")
    add("--port", type=int, metavar="PORT", help=f"gRPC port (default 8080) [{_env('port')}]")
    add(
        "--max-epochs",
        type=int,
        metavar="N",
        help=f"stop the training after N epochs; 0 = no limit (default 0) [{_env('max_epochs')}]",
    )
    add(
        "--max-workers",
        type=int,
        metavar="N",
        help=(
            "reject more than N concurrent workers with RESOURCE_EXHAUSTED; 0 = no limit "
            f"(default 0) [{_env('max_workers')}]"
        ),
    )
    add(
        "--worker-timeout",
        type=_duration_arg,
        metavar="DURATION",
        help=(
            "a worker missing a heartbeat or a task deadline for this long is removed (after "
            "a missed deadline, that kind of task gets twice as long, up to 16x); heartbeats "
            f"are due every half of it (default 1m) [{_env('worker_timeout')}]"
        ),
    )
    add(
        "--finish-linger",
        type=_duration_arg,
        metavar="DURATION",
        help=(
            "after the training finished, keep telling workers that join so (hello + stop) "
            "until this long after a worker was last lost or the server restarted, so that "
            "reconnecting workers stop too; 0 = exit once every connected worker has its "
            f"stop (default: 2x --worker-timeout, at least 10s) [{_env('finish_linger')}]"
        ),
    )
    add(
        "--max-slices-per-eval",
        type=int,
        metavar="N",
        help=(
            "at most N slices in one evaluate task; 0 = no limit (default 0) "
            f"[{_env('max_slices_per_eval')}]"
        ),
    )
    add(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        help=f"logging verbosity (default info) [{_env('log_level')}]",
    )
    add(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help=(
            "serve Prometheus metrics on http://HOST:PORT/metrics and the health status on "
            "/healthz (200 SERVING, 503 NOT_SERVING) (default off) "
            f"[{_env('metrics_port')}]"
        ),
    )
    add(
        "--state-dir",
        metavar="DIR",
        help=(
            "keep the training (epoch, start state, configuration) in DIR, written "
            "atomically after every epoch; a restarted server continues from it (default off) "
            f"[{_env('state_dir')}]"
        ),
    )
    add(
        "--initial-state",
        dest="initial_state_file",
        metavar="FILE",
        help=(
            "resume a training: FILE holds the encoded state (as the workers' codec wrote "
            "it, e.g. an epoch's state) that --start-epoch starts from; no initialize task "
            "is issued, the first worker receives it in hello. A checkpoint in --state-dir "
            f"wins over it (default off) [{_env('initial_state_file')}]"
        ),
    )
    add(
        "--start-epoch",
        type=int,
        metavar="N",
        help=(
            "the epoch --initial-state starts (epochs are numbered on from it; default 1) "
            f"[{_env('start_epoch')}]"
        ),
    )
    add(
        "--join-token",
        metavar="TOKEN",
        help=(
            "workers must send 'authorization: Bearer TOKEN' with Subscribe, else "
            f"UNAUTHENTICATED (default: anyone may join) [{_env('join_token')}]"
        ),
    )
    add(
        "--tls-cert",
        metavar="FILE",
        help=f"PEM certificate chain; enables TLS [{_env('tls_cert')}]",
    )
    add("--tls-key", metavar="FILE", help=f"PEM private key for --tls-cert [{_env('tls_key')}]")
    add(
        "--no-straggler-reissue",
        dest="straggler_reissue",
        action="store_const",
        const=False,
        help=(
            "do not copy late evaluate tasks to idle workers (re-issue is on by default) "
            f"[{_env('straggler_reissue')}=false]"
        ),
    )
    add(
        "--no-heartbeat-before-work",
        dest="heartbeat_before_work",
        action="store_const",
        const=False,
        help=(
            "give work to a worker as soon as it joins, not after its first heartbeat "
            "(default: after it, so that a peer that never reads its stream holds no work; "
            "clients send heartbeat 1 right after hello) "
            f"[{_env('heartbeat_before_work')}=false]"
        ),
    )
    add(
        "--max-message-bytes",
        type=int,
        metavar="BYTES",
        help=(
            "largest gRPC message in either direction (default 1 GiB) "
            f"[{_env('max_message_bytes')}]"
        ),
    )
    add(
        "--transport",
        choices=TRANSPORTS,
        type=str.lower,
        help=(
            "gRPC implementation serving the protocol: http2 = evochi's own on asyncio, "
            "several times cheaper per call; grpcio = grpc.aio's server, for ruling the "
            f"transport out when chasing an interop problem (default http2) [{_env('transport')}]"
        ),
    )
    return parser


def explicit_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Settings given by flags or environment (flags win); defaults are left out."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for field, (var, parse) in ENVIRONMENT.items():
        raw = environ.get(var)
        if raw is not None and raw != "":
            values[field] = parse(raw, var)
    for field, value in vars(args).items():
        if value is not None:
            values[field] = value
    return values


def resolve_config(
    settings: Mapping[str, Any], stored: Mapping[str, Any] | None = None
) -> ServerConfig:
    """The effective configuration: ``settings`` over ``stored`` over defaults."""
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    merged: dict[str, Any] = {k: v for k, v in (stored or {}).items() if k in known}
    merged.update(settings)
    if "population_size" not in merged:
        raise ConfigError(
            "the population size is required: --population-size N or EVOCHI_POPULATION_SIZE=N"
        )
    return ServerConfig(**merged)
