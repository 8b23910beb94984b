"""The root of every exception evochi and evochi_torch raise.

It lives outside `evochi.v1` so that the server's gRPC-free parts (the core state machine,
the configuration, the checkpoint store) can derive from it without importing grpc. A
subclass of a built-in error keeps that base too (``ConfigError`` is also a
``ValueError``), so ``except EvochiError`` catches everything the project raises and an
existing ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["EvochiError"]


class EvochiError(Exception):
    """Base class of every error raised by evochi (client, server) and evochi_torch."""
