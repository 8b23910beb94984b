"""The default transport: gRPC over HTTP/2, served straight from asyncio.

Why not grpc.aio: gRPC-Python's server hands every completion-queue event from its poller
thread to the event loop (a socket write, a wake-up, a GIL hand-over), about 250 µs of CPU
per unary call on the development machine; the ``h2`` library costs about 105 µs, this
transport about 25 µs (``python -m benchmarks.transport``). An epoch of a 16-worker training
is ~33 calls, so the transport decided the orchestration throughput.

Two layers, as with the ``h2`` library. HTTP/2 itself (framing, flow control, HPACK,
PING, GOAWAY, keepalive, the budgets against hostile peers) is h2connection.py's
:class:`H2Connection`, a state machine without I/O or clock. This module is the thin
asyncio side: a :class:`asyncio.Protocol` per socket feeds the connection the bytes and
``loop.time()``, turns its events into gRPC calls of the service, and writes what it has to
send. Header compression (HPACK decoding, with its Huffman code and dynamic table) is left to
the well-kept ``hpack`` library.

What it serves: unary and server-streaming calls, the gRPC length-prefixed framing
(grpc_framing.py: gzip and deflate request compression; responses are never compressed),
flow control in both directions, PING (answered, and sent to idle connections to find dead
peers), GOAWAY on shutdown, TLS with ALPN ``h2``, the standard ``grpc.health.v1.Health``
service. Malformed frames end the connection with GOAWAY; a bad call ends with a gRPC
status. Nothing a peer sends can raise out of this module.

Hostile peers (docs/server.md#limits; the values, and the price of each frame kind, are in
limits.py): every connection has budgets, leaky buckets drained at a fixed rate, for frames
that do no useful work (SETTINGS, PING, PRIORITY, WINDOW_UPDATE, empty DATA, unknown types,
CONTINUATION, refused or failed calls, header blocks decoded from scratch), for streams the
peer resets, and for joins; past one the connection gets GOAWAY(ENHANCE_YOUR_CALM). The work
per frame is bounded (no loop over every stream per SETTINGS entry or WINDOW_UPDATE), a
connection is served at most FRAMES_PER_TURN frames per event-loop turn (then its reading
pauses until the other connections had their turn), a peer that does not read its answers
stops being read, and unfinished streams, buffered request bytes, partial frames and decoded
header blocks are capped per connection and in total.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path

from evochi.server import core
from evochi.server.grpc_framing import (
    PREFIX,
    CallError,
    decode_request,
    frame_message,
    percent_encode,
    status_code,
)
from evochi.server.h2connection import (
    CANCEL,
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    ConnectionTerminated,
    ConnectionTimedOut,
    DataReceived,
    H2Connection,
    HeaderCacheQuota,
    RequestReceived,
    StreamEnded,
    StreamReset,
    hpack_integer,
    hpack_literal,
)
from evochi.server.health import HEALTH_SERVICE, SERVICE_UNKNOWN, Health
from evochi.server.limits import (
    CLOSE_LINGER,
    CONTROL_BUDGET,
    COSTS,
    HEADER_CACHE_SIZE,
    HEADER_CACHE_TOTAL,
    JOIN_BUDGET,
    KEEPALIVE_IDLE,
    KEEPALIVE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_SETTINGS_ENTRIES,
    MAX_SUBSCRIBE_REQUEST,
    OUR_MAX_STREAMS,
)
from evochi.server.service import SERVICE_NAME, UNARY_METHODS, EvochiService, parse_bearer

# The error codes and limits are re-exported for the tests and tools that probe this transport.
__all__ = [
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONTROL_BUDGET",
    "ENHANCE_YOUR_CALM",
    "FLOW_CONTROL_ERROR",
    "FRAME_SIZE_ERROR",
    "HEADER_CACHE_SIZE",
    "HEADER_CACHE_TOTAL",
    "JOIN_BUDGET",
    "MAX_SETTINGS_ENTRIES",
    "OUR_MAX_STREAMS",
    "PROTOCOL_ERROR",
    "REFUSED_STREAM",
    "Http2Transport",
]

log = logging.getLogger("evochi.server.http2")

_PATHS = {f"/{SERVICE_NAME}/{m}".encode(): m for m in ("Subscribe", *UNARY_METHODS)}
# Calls that need a worker's token, checked from the headers: only these may upload much.
_AUTHENTICATED = frozenset(UNARY_METHODS)
_HEALTH_CHECK, _HEALTH_WATCH = "health.Check", "health.Watch"
_PATHS[f"/{HEALTH_SERVICE}/Check".encode()] = _HEALTH_CHECK
_PATHS[f"/{HEALTH_SERVICE}/Watch".encode()] = _HEALTH_WATCH

# :status 200 is static-table entry 8; content-type is static name 31.
_STATUS_200 = b"\x88"
_CONTENT_TYPE = b"\x0f\x10" + hpack_integer(16, 7) + b"application/grpc"
RESPONSE_HEADERS = _STATUS_200 + _CONTENT_TYPE
TRAILERS_OK = hpack_literal(b"grpc-status", b"0")


def _trailers(code: str, message: str) -> bytes:
    block = hpack_literal(b"grpc-status", str(status_code(code)).encode())
    if message:
        block += hpack_literal(b"grpc-message", percent_encode(message))
    return block


class _Call:
    """One call. As a Subscribe stream it is also the service's WorkerStream."""

    __slots__ = (
        "bearer",
        "conn",
        "data",
        "done",
        "encoding",
        "headers_sent",
        "id",
        "method",
        "unwatch",
        "worker_id",
    )

    def __init__(self, conn: _Connection, stream_id: int, method: str, bearer: str | None,
                 encoding: bytes | None) -> None:  # fmt: skip
        self.conn = conn
        self.id = stream_id
        self.method = method
        self.bearer = bearer
        self.encoding = encoding
        self.data = bytearray()
        self.headers_sent = False
        self.done = False  # trailers sent (or queued), or the stream is gone
        self.worker_id: str | None = None
        self.unwatch: Callable[[], None] | None = None  # a health Watch: stops watching

    # WorkerStream
    def send(self, message: bytes) -> None:
        self.conn.send_message(self, message)

    def close(self, code: str, message: str) -> None:
        conn = self.conn
        conn.send_trailers(self, code, message)
        worker_id, self.worker_id = self.worker_id, None
        if worker_id is not None:
            # Not from inside the service's command loop that is closing us.
            conn.loop.call_soon(conn.service.stream_ended, worker_id)


class _Connection(asyncio.Protocol):
    def __init__(self, transport_owner: Http2Transport) -> None:
        self.owner = transport_owner
        self.service = transport_owner.service
        self.max_message = transport_owner.max_message_bytes
        self.loop = asyncio.get_running_loop()
        # Read here, not imported into h2connection: tests shorten them on this module.
        self.h2 = H2Connection(
            self.loop.time(),
            header_cache=transport_owner.header_quota,
            keepalive_idle=KEEPALIVE_IDLE,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
        )
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.closed = False
        self.in_turn = False  # output is written once, at the end of the turn
        self.write_paused = False
        self.write_backlog = 0  # write-buffer size at the last keepalive check
        self.buffered = 0  # request bytes held in calls' buffers
        self.subscribe_buffered = 0  # ... of which in Subscribe calls (no token needed)
        self.turn_pending = False  # frames left for the next event-loop turn

    # The HTTP/2 state, for the transport's shutdown and for tests.
    @property
    def streams(self) -> Mapping[int, object]:
        return self.h2.streams

    @property
    def blocked(self) -> Mapping[int, object]:
        return self.h2.blocked

    @property
    def stalled(self) -> Mapping[int, object]:
        return self.h2.stalled

    @property
    def header_cache(self) -> dict[bytes, dict[bytes, bytes]]:
        return self.h2.header_cache

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.owner.connections) >= MAX_CONNECTIONS:
            log.warning("refusing a connection: %d connections open", MAX_CONNECTIONS)
            self.goaway(ENHANCE_YOUR_CALM, "too many connections")
            return
        self.owner.connections.add(self)
        self.h2.initiate_connection()
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.connections.discard(self)
        self.h2.release()
        self._drop_calls()

    def _drop_calls(self) -> None:
        """The connection is over: its streams' workers leave the training now."""
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.done = True
            try:
                self._forget_worker(call)
            except Exception:
                log.exception("releasing the worker of a lost connection failed")

    def pause_writing(self) -> None:
        # The peer does not read: stop reading its requests (PINGs, calls) until it does, so
        # that nothing it sends can make us queue answers without bound.
        self.write_paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.h2.peer_active(self.loop.time())
        if self.transport is not None and not self.closed:
            if self.h2.buffered_input >= 9:
                self._schedule_turn()  # frames were left unparsed while the peer was not reading
            else:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.turn_pending:
            # Buffered only (the iterator is dropped unstarted): the scheduled turn serves it.
            self.h2.receive_events(data, self.loop.time())
            return
        self._turn(data)

    def _schedule_turn(self) -> None:
        if not self.turn_pending and self.transport is not None:
            self.turn_pending = True
            self.transport.pause_reading()
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.turn_pending = False
        if self.closed or self.transport is None:
            return
        if self.write_paused:
            return  # resume_writing schedules the next turn
        self._turn(b"")
        if not self.turn_pending and not self.write_paused and not self.closed:
            self.transport.resume_reading()

    def _turn(self, data: bytes) -> None:
        """Serve one turn's worth of the frames received (see FRAMES_PER_TURN)."""
        h2 = self.h2
        self.in_turn = True
        try:
            for event in h2.receive_events(data, self.loop.time()):
                if isinstance(event, DataReceived):
                    self._on_data(event)
                elif isinstance(event, RequestReceived):
                    self._on_request(event)
                elif isinstance(event, StreamEnded):
                    call = self.calls.get(event.stream_id)
                    if call is not None:
                        self._dispatch(call)
                elif isinstance(event, StreamReset):
                    self._on_reset(event.stream_id)
                elif isinstance(event, ConnectionTerminated):
                    self._log_termination(event)
        except Exception:
            log.exception("unexpected error on an HTTP/2 connection; closing it")
            h2.close_connection(INTERNAL_ERROR, "internal error")
        finally:
            self.in_turn = False
        # What _send does, inline: this runs once per turn.
        out = h2.data_to_send()
        transport = self.transport
        if out and not self.closed and transport is not None and not transport.is_closing():
            transport.write(out)
        if h2.closed:
            self.close()
        elif h2.more_frames and not self.closed:
            # Let the other connections' frames be served first.
            self._schedule_turn()

    @staticmethod
    def _log_termination(event: ConnectionTerminated) -> None:
        if event.error_code == ENHANCE_YOUR_CALM:
            log.info("closing a connection: %s", event.message)
        elif event.error_code == INTERNAL_ERROR:
            log.error("closing a connection: %s", event.message)
        else:
            log.debug("connection error %d: %s", event.error_code, event.message)

    # ------------------------------------------------------------------ output

    def _send(self) -> None:
        """Write what the connection has queued; close the socket once it is closed."""
        if self.in_turn or self.closed:
            return
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        if self.h2.closed:
            self.close()

    def goaway(self, code: int = NO_ERROR, message: str = "", close: bool = True) -> None:
        self.h2.close_connection(code, message, drain=not close)
        self._send()

    def close(self) -> None:
        if self.closed or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
        self.closed = True
        lingering = False
        if self.transport.can_write_eof() and not self.transport.is_closing():
            # Lingering close: send FIN after the last bytes (GOAWAY) and keep reading (and
            # dropping) what the peer still sends until it closes. Closing a socket with
            # unread input sends a TCP RST, which can destroy the GOAWAY before the peer
            # reads it.
            try:
                self.transport.write_eof()
                self.transport.resume_reading()
                lingering = True
            except OSError:  # the peer is gone already
                pass
        if lingering:
            self._drop_calls()  # not at connection_lost, which waits for the peer
        else:
            self.transport.close()
        # close() waits for the output to drain; a peer that does not read never lets it.
        self.loop.call_later(CLOSE_LINGER, self.transport.abort)

    def _charge(self, cost: float) -> bool:
        if self.h2.charge(cost):
            return True
        log.info("closing a connection: too many control frames")
        return False

    def send_message(self, call: _Call, message: bytes) -> None:
        if call.done or self.closed:
            return
        h2 = self.h2
        if not call.headers_sent:
            call.headers_sent = True
            h2.send_headers(call.id, RESPONSE_HEADERS)
        h2.send_data(call.id, frame_message(message))
        if not self.in_turn:
            self._send()

    def send_trailers(self, call: _Call, code: str, message: str) -> None:
        if call.done or self.closed:
            return
        call.done = True
        self.calls.pop(call.id, None)
        if call.data:
            self._release(call)
        if call.unwatch is not None:
            call.unwatch()
            call.unwatch = None
        if not call.headers_sent:  # trailers-only response
            call.headers_sent = True
            block = RESPONSE_HEADERS + _trailers(code, message)
            self.h2.send_headers(call.id, block, end_stream=True)
        else:
            block = TRAILERS_OK if code == "OK" and not message else _trailers(code, message)
            self.h2.send_trailers(call.id, block)
        if not self.in_turn:
            self._send()

    def _http_error(self, call: _Call, status: bytes) -> None:
        """A plain HTTP answer (not a gRPC call at all): :status, nothing else."""
        call.headers_sent = call.done = True
        self.calls.pop(call.id, None)
        block = b"\x08" + hpack_integer(len(status), 7) + status  # :status is static name 8
        self.h2.send_headers(call.id, block, end_stream=True)

    def _forget_worker(self, call: _Call) -> None:
        if call.unwatch is not None:
            call.unwatch()
            call.unwatch = None
        worker_id, call.worker_id = call.worker_id, None
        if worker_id is not None:
            self.service.stream_ended(worker_id)

    # ------------------------------------------------------------------ input

    def _on_request(self, event: RequestReceived) -> None:
        headers = event.headers
        path = headers.get(b":path", b"")
        method = _PATHS.get(path, "")
        bearer = None
        authorization = headers.get(b"authorization")
        if authorization is not None:
            bearer = parse_bearer(authorization.decode("latin-1"))
        call = _Call(self, event.stream_id, method, bearer, headers.get(b"grpc-encoding"))
        self.calls[event.stream_id] = call
        if headers.get(b":method") != b"POST":
            if self._charge(COSTS.refused_call):
                self._http_error(call, b"405")
            return
        content_type = headers.get(b"content-type", b"")
        if not (content_type == b"application/grpc" or content_type.startswith(
            (b"application/grpc+", b"application/grpc;")
        )):  # fmt: skip
            if self._charge(COSTS.refused_call):
                self._http_error(call, b"415")
            return
        if not method:
            if self._charge(COSTS.refused_call):
                self.send_trailers(
                    call, "UNIMPLEMENTED", f"unknown method {path.decode('latin-1')}"
                )
            return
        if method is _HEALTH_CHECK or method is _HEALTH_WATCH:
            if not self._charge(COSTS.health_call):
                return
        else:
            try:
                # Refuse a call whose token is wrong now, before buffering any of its request.
                self.service.admit(method, bearer)
            except core.CoreError as err:
                if self._charge(COSTS.refused_call):
                    self.send_trailers(call, err.code, err.message)
                return
            if method == "Subscribe" and self.owner.open_joins and not self.h2.admit_join():
                if self._charge(COSTS.refused_call):
                    message = "too many Subscribe calls on this connection; retry later"
                    self.send_trailers(call, "UNAVAILABLE", message)
                return
        if event.end_stream:
            self._dispatch(call)

    def _on_data(self, event: DataReceived) -> None:
        call = self.calls.get(event.stream_id)
        if call is None:
            # Answered already, its trailers still waiting for the peer's window.
            self._charge(COSTS.late_frame)
            return
        body = event.data
        n = len(body)
        open_call = call.method not in _AUTHENTICATED
        limit = MAX_SUBSCRIBE_REQUEST if open_call else self.max_message
        if open_call and self.subscribe_buffered + n > MAX_SUBSCRIBE_REQUEST:
            # Calls anyone may make (Subscribe, health) hold little each, and little per
            # connection in all: only authenticated calls may upload large messages.
            message = "too many unfinished Subscribe requests on this connection"
            self.send_trailers(call, "RESOURCE_EXHAUSTED", message)
            return
        if len(call.data) + n > limit + PREFIX:
            self.send_trailers(
                call, "RESOURCE_EXHAUSTED", f"request larger than the limit of {limit} bytes"
            )
            return
        if self.buffered + n > self.max_message + MAX_SUBSCRIBE_REQUEST:
            # One connection holds at most one largest message's worth of unfinished uploads.
            self.send_trailers(
                call,
                "RESOURCE_EXHAUSTED",
                "too many unfinished uploads on this connection; send large messages one at a time",
            )
            return
        if event.end_stream and not call.data:
            self._dispatch(call, body)  # the whole request in one frame: nothing to buffer
            return
        call.data += body
        self.buffered += n
        if open_call:
            self.subscribe_buffered += n
        if event.end_stream:
            self._dispatch(call)

    def _on_reset(self, stream_id: int) -> None:
        call = self.calls.pop(stream_id, None)
        if call is None:
            return
        call.done = True
        self._release(call)
        self._forget_worker(call)

    def _release(self, call: _Call) -> None:
        """Forget the call's buffered request bytes."""
        n = len(call.data)
        self.buffered -= n
        if call.method not in _AUTHENTICATED:
            self.subscribe_buffered -= n
        call.data = bytearray()

    # ------------------------------------------------------------------ calls

    def _request(self, call: _Call, body: bytes | None) -> bytes:
        request: bytes | bytearray = body if body is not None else call.data
        if body is None:
            self._release(call)
        # Unauthenticated calls (Subscribe, health) are small; the rest is bounded by
        # max_message_bytes, also once inflated.
        limit = self.max_message if call.method in _AUTHENTICATED else MAX_SUBSCRIBE_REQUEST
        return decode_request(request, call.encoding, limit)

    def _dispatch(self, call: _Call, body: bytes | None = None) -> None:
        """Serve the call; its request is ``body``, or else what was buffered."""
        if call.done:
            return
        self.h2.earn(COSTS.call_credit)
        try:
            message = self._request(call, body)
            if call.method is _HEALTH_CHECK or call.method is _HEALTH_WATCH:
                self._health(call, message)
                return
            if call.method == "Subscribe":
                worker_id = self.service.subscribe(message, call.bearer, call)
                if call.done:
                    # Closed already while joining (a training that has finished): the
                    # service must still hear that the stream is over, once.
                    self.loop.call_soon(self.service.stream_ended, worker_id)
                else:
                    call.worker_id = worker_id
                return
            response = self.service.unary(call.method, message, call.bearer)
        except (CallError, core.CoreError) as err:
            self.send_trailers(call, err.code, err.message)
            return
        except Exception:
            log.exception("%s failed", call.method)
            self.send_trailers(call, "INTERNAL", "internal server error")
            return
        if call.done or self.closed:
            return
        call.headers_sent = call.done = True
        self.calls.pop(call.id, None)
        self.h2.send_response(call.id, RESPONSE_HEADERS, frame_message(response), TRAILERS_OK)
        if not self.in_turn:
            self._send()

    def _health(self, call: _Call, message: bytes) -> None:
        health = self.owner.health
        try:
            name = health.check_request(message)
        except ValueError as err:
            raise CallError("INVALID_ARGUMENT", str(err)) from None
        status = health.status(name)
        if call.method is _HEALTH_CHECK:
            if status is None:
                raise CallError("NOT_FOUND", f"unknown service {name!r}")
            self.send_message(call, health.response(status))
            self.send_trailers(call, "OK", "")
            return
        # Watch: the status now, then every change, until the client cancels.
        self.send_message(call, health.response(SERVICE_UNKNOWN if status is None else status))
        if status is not None:

            def changed(new: int) -> None:
                self.send_message(call, health.response(new))

            call.unwatch = health.watch(changed)

    # ------------------------------------------------------------------ keepalive

    def check_alive(self, now: float) -> None:
        if self.closed or self.transport is None:
            return
        if self.write_paused:
            # Reading is paused (see pause_writing): a peer still draining a large state is
            # alive; one whose backlog does not shrink is not.
            backlog = self.transport.get_write_buffer_size()
            if backlog < self.write_backlog:
                self.h2.peer_active(now)
            self.write_backlog = backlog
        for event in self.h2.tick(now, peer_reading=not self.write_paused):
            if isinstance(event, ConnectionTimedOut):
                log.info("closing a connection: %s", event.reason)
                self.closed = True
                self.transport.abort()
                return
        self._send()


class Http2Transport:
    """Serves an :class:`EvochiService` over gRPC/HTTP/2 on the running event loop."""

    def __init__(self, service: EvochiService, *, max_message_bytes: int,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:  # fmt: skip
        self.service = service
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self.header_quota = HeaderCacheQuota(HEADER_CACHE_TOTAL)
        # Without a join token anyone may Subscribe: joins per connection are then capped.
        self.open_joins = not service.config.join_token
        self.health = Health()
        self._ssl: ssl.SSLContext | None = None
        if tls_cert is not None and tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(Path(tls_cert), Path(tls_key))
            context.set_alpn_protocols(["h2"])
            self._ssl = context
        self._server: asyncio.Server | None = None
        self._keepalive: asyncio.Task[None] | None = None

    @property
    def header_cache_entries(self) -> int:
        """Decoded header blocks cached over all connections (at most HEADER_CACHE_TOTAL)."""
        return self.header_quota.used

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0 = a free port) and returns the port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=self._ssl, reuse_address=True
        )
        self._server = server
        self._keepalive = loop.create_task(self._run_keepalive())
        self.health.follow(self.service)
        self.service.metrics.health = self.health
        return int(server.sockets[0].getsockname()[1])

    async def _run_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(KEEPALIVE_TIMEOUT / 4)
            now = loop.time()
            for conn in list(self.connections):
                conn.check_alive(now)

    async def stop(self, grace: float | None) -> None:
        """Refuses new calls (GOAWAY), waits up to ``grace`` seconds for calls in flight."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        loop = asyncio.get_running_loop()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.health.stop()
        for conn in list(self.connections):
            # Health Watch calls last as long as the client wants: end them now.
            for call in [c for c in conn.calls.values() if c.unwatch is not None]:
                conn.send_trailers(call, "UNAVAILABLE", "server stopping")
            conn.goaway(NO_ERROR, "server stopping", close=not conn.streams)
        deadline = loop.time() + (grace or 0.0)
        while any(c.streams for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        # close() lets buffered output drain; a peer that does not read never lets it.
        deadline = loop.time() + 1.0
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run
