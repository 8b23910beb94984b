"""The grpcio transport: the service behind a ``grpc.aio`` server.

Slower per call than the default HTTP/2 transport (gRPC-Python hands every completion
from its poller thread to the event loop) but it is gRPC's own implementation: choose it
with ``--transport grpcio`` to rule the transport out when chasing an interop problem.

Hostile peers: gRPC's C core has its own defences (Rapid Reset, ping and settings floods).
It checks ``max_receive_message_length`` against the *decompressed* size of a message, but
that limit must let whole training states through (1 GiB by default), so a small gzip
request could still inflate to a gigabyte: compressed requests are refused (UNIMPLEMENTED,
"Compression algorithm 'gzip' is disabled"); evochi's clients never compress at the gRPC
level. Subscribe calls (joins) per connection are capped as on the HTTP/2 transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from evochi.server import core
from evochi.server.config import ServerConfig
from evochi.server.health import SERVICES, SERVING, Health
from evochi.server.limits import JOIN_BUDGET, OUR_MAX_STREAMS, Budget
from evochi.server.service import SERVICE_NAME, UNARY_METHODS, EvochiService, parse_bearer

__all__ = ["GrpcioTransport"]


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return parse_bearer(value)
    return None


class _QueueStream:
    """A WorkerStream feeding the Subscribe generator through an asyncio queue."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | tuple[str, str]] = asyncio.Queue()

    def send(self, message: bytes) -> None:
        self.queue.put_nowait(message)

    def close(self, code: str, message: str) -> None:
        self.queue.put_nowait((code, message))


class GrpcioTransport:
    def __init__(self, service: EvochiService, config: ServerConfig) -> None:
        self.service = service
        self.config = config
        self._server: grpc.aio.Server | None = None
        self.health = Health()
        self._health_servicer = health_aio.HealthServicer()
        # Joins per connection (peer address) without a join token, as on the HTTP/2 transport.
        self._open_joins = not config.join_token
        self._joins: dict[str, Budget] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _options(self) -> list[tuple[str, Any]]:
        limit = self.config.max_message_bytes
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Detect dead peers on idle connections, and tolerate clients' keepalive pings.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0),
            # Only identity: a compressed message inflates to up to the limit above.
            ("grpc.compression_enabled_algorithms_bitset", 1),
            ("grpc.max_concurrent_streams", OUR_MAX_STREAMS),
        ]

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        service = self.service

        async def subscribe(
            request: bytes, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            stream = _QueueStream()
            if self._open_joins and not self._join_allowed(context.peer()):
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "too many Subscribe calls on this connection; retry later",
                )
            try:
                worker_id = service.subscribe(request, _bearer(context), stream)
            except core.CoreError as err:
                await context.abort(grpc.StatusCode[err.code], err.message)
            try:
                while True:
                    item = await stream.queue.get()
                    if type(item) is tuple:
                        code, message = item
                        if code != "OK":
                            await context.abort(grpc.StatusCode[code], message)
                        return
                    yield item
            finally:
                service.stream_ended(worker_id)

        def unary(method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
            async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                try:
                    return service.unary(method, request, _bearer(context))
                except core.CoreError as err:
                    await context.abort(grpc.StatusCode[err.code], err.message)
                    raise AssertionError("context.abort returned") from err

            return handle

        handlers = {"Subscribe": grpc.unary_stream_rpc_method_handler(subscribe)}
        for method in UNARY_METHODS:
            handlers[method] = grpc.unary_unary_rpc_method_handler(unary(method))
        return handlers

    def _join_allowed(self, peer: str) -> bool:
        now = time.monotonic()
        joins = self._joins
        if len(joins) > 4096:  # forget peers whose budget has drained
            for key in [k for k, b in joins.items() if b.drained(now)]:
                del joins[key]
        budget = joins.get(peer)
        if budget is None:
            budget = joins[peer] = Budget(*JOIN_BUDGET, now)
        return budget.spend(now)

    def _health_changed(self, status: int) -> None:
        servicer = self._health_servicer
        for name in SERVICES:
            task = asyncio.get_running_loop().create_task(servicer.set(name, status))  # type: ignore[arg-type]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0 = a free port) and returns the port."""
        server = grpc.aio.server(options=self._options())
        health_pb2_grpc.add_HealthServicer_to_server(self._health_servicer, server)
        for name in SERVICES:
            await self._health_servicer.set(name, SERVING)
        self.health.watch(self._health_changed)
        handlers = self._handlers()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = self.config
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
            )
            bound = server.add_secure_port(target, credentials)
        else:
            bound = server.add_insecure_port(target)
        if bound == 0:
            raise OSError(f"could not listen on {target}")
        await server.start()
        self._server = server
        self.health.follow(self.service)
        self.service.metrics.health = self.health
        return bound

    async def stop(self, grace: float | None) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            self.health.stop()
            await self._health_servicer.enter_graceful_shutdown()
            await server.stop(grace)
