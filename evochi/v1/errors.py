"""Exceptions raised by the Evochi client.

Every failure that ends `Worker.start()` is one of these, so callers can tell an
unreachable server from a rejected subscription from a stream that broke mid-training. All
derive from :class:`evochi.errors.EvochiError`, the root of the project's exceptions.
"""

from __future__ import annotations

import grpc

from evochi.errors import EvochiError

__all__ = [
    "EvochiError",
    "ProtocolError",
    "ServerGoneError",
    "ServerUnavailableError",
    "StateDecodeError",
    "StreamBrokenError",
    "SubscriptionRejectedError",
]


class ServerUnavailableError(EvochiError, ConnectionError):
    """The server could not be reached (wrong address, not started, network down)."""


class ServerGoneError(ServerUnavailableError):
    """A reconnecting worker gave up: no server for longer than its ``give_up_after``, and
    the training had not finished when it last saw it."""


class SubscriptionRejectedError(EvochiError):
    """The server refused the subscription (bad join token, too many workers, bad cores...)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"server rejected the subscription: {code.name}: {details}")
        self.code = code
        self.details = details


class StreamBrokenError(EvochiError):
    """The event stream or a call on it failed after the worker had joined."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(EvochiError):
    """The server sent something the protocol does not allow (e.g. no hello first)."""


class StateDecodeError(EvochiError, ValueError):
    """A state blob could not be decoded (corrupt, truncated, or refused by the allow-list)."""
