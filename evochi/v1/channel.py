"""Channels fit for Evochi: large messages and keepalive.

gRPC's default 4 MiB message limit breaks as soon as a state holds a policy of about a
million parameters, so every channel made here raises it on both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

#: Default message limit. gRPC caps messages just under 2 GiB; 1 GiB leaves room for
#: framing and is far above any policy an ES run ships.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

# Servers built on gRPC C-core answer pings more often than every 5 minutes with
# GOAWAY(too_many_pings) by default, so the keepalive stays at that bound; the worker's
# heartbeats already detect a dead server much sooner.
_KEEPALIVE_TIME_MS = 300_000
_KEEPALIVE_TIMEOUT_MS = 20_000


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """gRPC channel options with raised message limits and keepalive."""
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": _KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": _KEEPALIVE_TIMEOUT_MS,
    }
    options.update(dict(extra))
    return list(options.items())


def insecure_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A plaintext channel to `target` ("host:port") with limits fit for real states."""
    return grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes, options))


def secure_channel(
    target: str,
    *,
    root_certificates: bytes | None = None,
    server_name_override: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A TLS channel to `target`.

    `root_certificates` is the PEM of the CA (or self-signed certificate) that signed the
    server's certificate; None uses the system trust store. `server_name_override` lets a
    certificate issued for a name be used through an IP address (tests, tunnels).
    """
    extra = list(options)
    if server_name_override is not None:
        extra.append(("grpc.ssl_target_name_override", server_name_override))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.aio.secure_channel(
        target, credentials, options=channel_options(max_message_bytes, extra)
    )
