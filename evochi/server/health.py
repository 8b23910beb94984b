"""Serving status for the standard gRPC health service and ``/healthz``.

Load balancers and Kubernetes probes ask ``grpc.health.v1.Health`` (``Check``, ``Watch``) or
``GET /healthz``. The server is SERVING from the moment it listens until its training has
finished or it is stopping; then NOT_SERVING. Two service names are known: ``""`` (the whole
server, what probes ask by default) and ``evochi.v1.EvochiService``; any other name is
unknown (``Check``: NOT_FOUND; ``Watch``: SERVICE_UNKNOWN, as the health protocol says).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from evochi.server.service import SERVICE_NAME, EvochiService

__all__ = ["HEALTH_SERVICE", "SERVICES", "Health"]

log = logging.getLogger("evochi.server")

HEALTH_SERVICE = "grpc.health.v1.Health"
SERVICES = ("", SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

Watcher = Callable[[int], None]


class Health:
    """The server's status, and the watchers to tell when it changes."""

    def __init__(self) -> None:
        self.serving = True
        self._watchers: set[Watcher] = set()
        self._follow: asyncio.Task[None] | None = None

    def status(self, service: str) -> int | None:
        """The status of ``service`` (a HealthCheckResponse.ServingStatus), None if unknown."""
        if service not in SERVICES:
            return None
        return SERVING if self.serving else NOT_SERVING

    def set_serving(self, serving: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        status = SERVING if serving else NOT_SERVING
        for watcher in list(self._watchers):
            try:
                watcher(status)
            except Exception:
                log.exception("a health watcher failed")

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Calls ``watcher(status)`` on every change; returns the function that stops it."""
        self._watchers.add(watcher)
        return lambda: self._watchers.discard(watcher)

    def follow(self, service: EvochiService) -> None:
        """NOT_SERVING once the service's training has finished (on the running loop)."""

        async def wait() -> None:
            await service.finished.wait()
            self.set_serving(False)

        self._follow = asyncio.get_running_loop().create_task(wait())

    def stop(self) -> None:
        """The server is stopping: NOT_SERVING, and no more following."""
        self.set_serving(False)
        if self._follow is not None:
            self._follow.cancel()
            self._follow = None

    @staticmethod
    def check_request(data: bytes) -> str:
        """The service name of a serialized HealthCheckRequest (ValueError if malformed)."""
        try:
            return health_pb2.HealthCheckRequest.FromString(data).service
        except Exception as err:
            raise ValueError(f"malformed HealthCheckRequest: {err}") from None

    @staticmethod
    def response(status: int) -> bytes:
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()  # type: ignore[arg-type]
