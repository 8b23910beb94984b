"""The Evochi server: the reference server's protocol and rules, without its weak points.

Run it standalone (``evochi-server`` / ``python -m evochi.server``) or embed it::

    from evochi.server import EmbeddedServer, ServerConfig

    async with EmbeddedServer(ServerConfig(population_size=100, max_epochs=10)) as server:
        ...  # workers connect to server.address
        await server.wait_finished()
"""

from evochi.server.config import ConfigError, ServerConfig, parse_duration
from evochi.server.core import EpochSummary
from evochi.server.embedded import EmbeddedServer
from evochi.server.metrics import ServerMetrics
from evochi.server.store import CheckpointError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EmbeddedServer",
    "EpochSummary",
    "ServerConfig",
    "ServerMetrics",
    "parse_duration",
]
