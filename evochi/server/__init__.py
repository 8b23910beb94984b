"""The Evochi server: the reference server's protocol and rules, without its weak points.

Run it standalone (``evochi-server`` / ``python -m evochi.server``) or embed it::

    from evochi.server import EmbeddedServer, ServerConfig

    async with EmbeddedServer(ServerConfig(population_size=100, max_epochs=10)) as server:
        ...  # workers connect to server.address
        await server.wait_finished()
"""

from typing import TYPE_CHECKING, Any

from evochi.server.config import ConfigError, ServerConfig, parse_duration
from evochi.server.core import EpochSummary
from evochi.server.store import CheckpointError

if TYPE_CHECKING:
    from evochi.server.embedded import EmbeddedServer
    from evochi.server.metrics import ServerMetrics


def __getattr__(name: str) -> Any:
    # The transports (grpc) and Prometheus load on first use, so that the pure core, the
    # configuration and the store import without them.
    if name == "EmbeddedServer":
        from evochi.server.embedded import EmbeddedServer

        return EmbeddedServer
    if name == "ServerMetrics":
        from evochi.server.metrics import ServerMetrics

        return ServerMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "EmbeddedServer",
    "EpochSummary",
    "ServerConfig",
    "ServerMetrics",
    "parse_duration",
]
