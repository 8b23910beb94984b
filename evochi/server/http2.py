"""The default transport: gRPC over HTTP/2, served straight from asyncio.

Why not grpc.aio: gRPC-Python's server hands every completion-queue event from its poller
thread to the event loop (a socket write, a wake-up, a GIL hand-over), about 250 µs of CPU
per unary call on the development machine; the ``h2`` library costs about 105 µs, this
module about 25 µs (``python -m benchmarks.transport``). An epoch of a 16-worker training is
~33 calls, so the transport decided the orchestration throughput. This module implements
only what a gRPC server needs, RFC 9113 frame by frame; header compression (HPACK, with its
Huffman code and dynamic table) is left to the well-kept ``hpack`` library.

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
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import hpack

from evochi.server import core
from evochi.server.grpc_framing import (
    PREFIX,
    CallError,
    decode_request,
    frame_message,
    percent_encode,
    status_code,
)
from evochi.server.health import HEALTH_SERVICE, SERVICE_UNKNOWN, Health
from evochi.server.limits import (
    BYTES_PER_TURN,
    CLOSE_LINGER,
    CONTROL_BUDGET,
    COSTS,
    FRAMES_PER_TURN,
    HEADER_CACHE_BLOCK,
    HEADER_CACHE_SIZE,
    HEADER_CACHE_TOTAL,
    JOIN_BUDGET,
    KEEPALIVE_IDLE,
    KEEPALIVE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_HEADER_BLOCK,
    MAX_SETTINGS_ENTRIES,
    MAX_SUBSCRIBE_REQUEST,
    OUR_MAX_FRAME,
    OUR_MAX_HEADER_LIST,
    OUR_MAX_STREAMS,
    RESET_BUDGET,
    Budget,
)
from evochi.server.service import SERVICE_NAME, UNARY_METHODS, EvochiService, parse_bearer

__all__ = ["Http2Transport"]

log = logging.getLogger("evochi.server.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
# Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 6, 7, 8, 9
ENHANCE_YOUR_CALM = 0xB

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
_FRAME_HEADER = struct.Struct(">BHBBI")
_PATHS = {f"/{SERVICE_NAME}/{m}".encode(): m for m in ("Subscribe", *UNARY_METHODS)}
# Calls that need a worker's token, checked from the headers: only these may upload much.
_AUTHENTICATED = frozenset(UNARY_METHODS)
_HEALTH_CHECK, _HEALTH_WATCH = "health.Check", "health.Watch"
_PATHS[f"/{HEALTH_SERVICE}/Check".encode()] = _HEALTH_CHECK
_PATHS[f"/{HEALTH_SERVICE}/Watch".encode()] = _HEALTH_WATCH


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME_HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as "literal without indexing, new name": never touches the peer's dynamic
    table, so the encoding of a header is the same bytes on every connection, every time."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# :status 200 is static-table entry 8; content-type is static name 31.
_STATUS_200 = b"\x88"
_CONTENT_TYPE = b"\x0f\x10" + _hpack_int(16, 7) + b"application/grpc"
RESPONSE_HEADERS = _STATUS_200 + _CONTENT_TYPE
TRAILERS_OK = _literal(b"grpc-status", b"0")


def _trailers(code: str, message: str) -> bytes:
    block = _literal(b"grpc-status", str(status_code(code)).encode())
    if message:
        block += _literal(b"grpc-message", percent_encode(message))
    return block


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    """One call. As a Subscribe stream it is also the service's WorkerStream."""

    __slots__ = (
        "bearer",
        "conn",
        "credit",
        "data",
        "encoding",
        "headers_sent",
        "id",
        "local_closed",
        "method",
        "pending",
        "remote_closed",
        "send_window",
        "trailers",
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
        self.remote_closed = False
        self.local_closed = False
        self.headers_sent = False
        self.pending: deque[memoryview] = deque()
        self.trailers: bytes | None = None
        # The stream's send window is the peer's INITIAL_WINDOW_SIZE plus this credit (its
        # WINDOW_UPDATEs less what we sent): a new INITIAL_WINDOW_SIZE costs O(1), not O(streams).
        self.credit = 0
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
            asyncio.get_running_loop().call_soon(conn.service.stream_ended, worker_id)


class _Connection(asyncio.Protocol):
    def __init__(self, transport_owner: Http2Transport) -> None:
        self.owner = transport_owner
        self.service = transport_owner.service
        self.max_message = transport_owner.max_message_bytes
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface = False
        self.decoder = hpack.Decoder(max_header_list_size=OUR_MAX_HEADER_LIST)
        # gRPC clients repeat the same header block call after call once its fields are in
        # the HPACK table: decode each distinct block once while the table stays the same.
        self.header_cache: dict[bytes, dict[bytes, bytes]] = {}
        self.streams: dict[int, _Stream] = {}
        # Streams with output waiting: for the connection's window (blocked) or their own.
        self.blocked: dict[int, _Stream] = {}
        self.stalled: dict[int, _Stream] = {}
        self.send_window = DEFAULT_WINDOW
        self.peer_window = DEFAULT_WINDOW
        self.peer_frame = DEFAULT_FRAME
        self.received = 0  # connection-level bytes since our last WINDOW_UPDATE
        self.continuation: tuple[int, int, bytearray] | None = None
        self.last_stream = 0
        self.out: list[bytes] | None = None
        self.closed = False
        self.going_away = False
        self.last_seen = time.monotonic()
        self.ping_sent: float | None = None
        self.write_paused = False
        self.write_backlog = 0  # write-buffer size at the last keepalive check
        self.buffered = 0  # request bytes held in streams' buffers
        self.subscribe_buffered = 0  # ... of which in Subscribe calls (no token needed)
        self.now = time.monotonic()
        self.control = Budget(*CONTROL_BUDGET)
        self.resets = Budget(*RESET_BUDGET)
        self.joins = Budget(*JOIN_BUDGET)
        self.turn_pending = False  # frames left in buf for the next event-loop turn

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.owner.connections) >= MAX_CONNECTIONS:
            log.warning("refusing a connection: %d connections open", MAX_CONNECTIONS)
            self.goaway(ENHANCE_YOUR_CALM, "too many connections")
            return
        self.owner.connections.add(self)
        settings = struct.pack(
            ">HIHIHIHI",
            S_MAX_CONCURRENT_STREAMS, OUR_MAX_STREAMS,
            S_INITIAL_WINDOW_SIZE, MAX_WINDOW,
            S_MAX_FRAME_SIZE, OUR_MAX_FRAME,
            S_MAX_HEADER_LIST_SIZE, OUR_MAX_HEADER_LIST,
        )  # fmt: skip
        # Streams get the largest window, so only the connection's needs refilling.
        self.write(
            _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.connections.discard(self)
        self.owner.header_cache_entries -= len(self.header_cache)
        self.header_cache.clear()
        self.buf = bytearray()
        self._drop_streams()

    def _drop_streams(self) -> None:
        """The connection is over: its streams' workers leave the training now."""
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        self.stalled.clear()
        for stream in streams.values():
            try:
                self._forget_worker(stream)
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
        self.last_seen = time.monotonic()
        if self.transport is not None and not self.closed:
            if len(self.buf) >= 9:
                self._schedule_turn()  # frames were left unparsed while the peer was not reading
            else:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buf += data
        self.ping_sent = None
        self.last_seen = time.monotonic()
        if not self.turn_pending:
            self._turn()

    def _schedule_turn(self) -> None:
        if not self.turn_pending and self.transport is not None:
            self.turn_pending = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.turn_pending = False
        if self.closed or self.transport is None:
            return
        if self.write_paused:
            return  # resume_writing schedules the next turn
        self._turn()
        if not self.turn_pending and not self.write_paused and not self.closed:
            self.transport.resume_reading()

    def _turn(self) -> None:
        """Serve one turn's worth of the frames received (see FRAMES_PER_TURN)."""
        self.now = time.monotonic()
        self.out = []
        more = False
        try:
            more = self._receive()
        except _ConnectionError as err:
            if err.code == ENHANCE_YOUR_CALM:
                log.info("closing a connection: %s", err)
            else:
                log.debug("connection error %d: %s", err.code, err)
            self.goaway(err.code, str(err))
        except Exception:
            log.exception("unexpected error on an HTTP/2 connection; closing it")
            self.goaway(INTERNAL_ERROR, "internal error")
        finally:
            out, self.out = self.out, None
            if out and self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(out))
        if more and not self.closed:
            # Let the other connections' frames be served first.
            self._schedule_turn()

    # ------------------------------------------------------------------ output

    def write(self, data: bytes) -> None:
        if self.out is not None:
            self.out.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def goaway(self, code: int = NO_ERROR, message: str = "", close: bool = True) -> None:
        if self.closed:
            return
        payload = struct.pack(">II", self.last_stream, code) + message.encode()[:256]
        self.write(_frame(GOAWAY, 0, 0, payload))
        self.going_away = True
        if close:
            self.close()

    def close(self) -> None:
        if self.closed or self.transport is None:
            return
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out = []
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
            self._drop_streams()  # not at connection_lost, which waits for the peer
        else:
            self.transport.close()
        # close() waits for the output to drain; a peer that does not read never lets it.
        asyncio.get_running_loop().call_later(CLOSE_LINGER, self.transport.abort)

    def _calm(self, what: str) -> _ConnectionError:
        return _ConnectionError(ENHANCE_YOUR_CALM, what)

    def _control(self, cost: float) -> None:
        """A frame that does no useful work: spend from the connection's budget."""
        if not self.control.spend(self.now, cost):
            raise self._calm("too many control frames")

    def send_message(self, stream: _Stream, message: bytes) -> None:
        if stream.local_closed or stream.trailers is not None or self.closed:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self.write(_frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        framed = frame_message(message)
        n = len(framed)
        self.control.earn(COSTS.message_credit)
        if (
            not stream.pending
            and n <= self.send_window
            and n <= self.peer_window + stream.credit
            and (n <= self.peer_frame)
        ):
            self.send_window -= n
            stream.credit -= n
            self.write(_frame(DATA, 0, stream.id, framed))
            return
        stream.pending.append(memoryview(framed))
        self._flush(stream)

    def send_trailers(self, stream: _Stream, code: str, message: str) -> None:
        if stream.local_closed or stream.trailers is not None or self.closed:
            return
        if not stream.headers_sent:  # trailers-only response
            stream.headers_sent = True
            stream.local_closed = True
            block = RESPONSE_HEADERS + _trailers(code, message)
            self.write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block))
            self._closed_locally(stream)
            return
        stream.trailers = TRAILERS_OK if code == "OK" and not message else _trailers(code, message)
        self._flush(stream)

    def _flush(self, stream: _Stream) -> None:
        pending = stream.pending
        while pending:
            allowed = min(self.send_window, self.peer_window + stream.credit, self.peer_frame)
            if allowed <= 0:
                if self.send_window <= 0:
                    self.blocked[stream.id] = stream
                    self.stalled.pop(stream.id, None)
                else:
                    self.stalled[stream.id] = stream
                    self.blocked.pop(stream.id, None)
                return
            chunk = pending[0]
            if len(chunk) <= allowed:
                pending.popleft()
                part = chunk
            else:
                part = chunk[:allowed]
                pending[0] = chunk[allowed:]
            self.send_window -= len(part)
            stream.credit -= len(part)
            self.write(_frame(DATA, 0, stream.id, bytes(part)))
        self.blocked.pop(stream.id, None)
        self.stalled.pop(stream.id, None)
        if stream.trailers is not None and not stream.local_closed:
            stream.local_closed = True
            self.write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            self._closed_locally(stream)

    def _closed_locally(self, stream: _Stream) -> None:
        if not stream.remote_closed:
            # We answered before the request ended (an early error): stop the upload.
            self.write(_frame(RST_STREAM, 0, stream.id, struct.pack(">I", NO_ERROR)))
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        self.stalled.pop(stream.id, None)
        if stream.unwatch is not None:
            stream.unwatch()
            stream.unwatch = None
        if self.going_away and not self.streams:
            self.close()

    def _forget_worker(self, stream: _Stream) -> None:
        if stream.unwatch is not None:
            stream.unwatch()
            stream.unwatch = None
        worker_id, stream.worker_id = stream.worker_id, None
        if worker_id is not None:
            self.service.stream_ended(worker_id)

    # ------------------------------------------------------------------ input

    def _receive(self) -> bool:
        """Parse and serve the frames in buf, at most one turn's worth; True if more remain."""
        buf = self.buf
        if not self.preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (no preface)")
                return False
            if buf[: len(PREFACE)] != PREFACE:
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (no preface)")
            del buf[: len(PREFACE)]
            self.preface = True
        pos, end = 0, len(buf)
        unpack = _FRAME_HEADER.unpack_from
        frames = 0
        more = False
        try:
            while end - pos >= 9:
                if frames >= FRAMES_PER_TURN or pos >= BYTES_PER_TURN:
                    more = True
                    break
                frames += 1
                high, low, kind, flags, stream_id = unpack(buf, pos)
                length = (high << 16) | low
                if length > OUR_MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
                if self.closed:
                    return False
        finally:
            del buf[:pos]
        if self.received > MAX_WINDOW // 2:
            self.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
        return more

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0 or stream_id % 2 == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on an invalid stream id")
            block = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                block = block[5:]
            if len(block) > MAX_HEADER_BLOCK:
                raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
            if not flags & END_HEADERS:
                self._control(COSTS.unfinished_headers)
            if flags & END_HEADERS:
                self._headers(stream_id, flags, block)
            else:
                self.continuation = (stream_id, flags, bytearray(block))
        elif kind == CONTINUATION:
            if self.continuation is None or self.continuation[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._control(COSTS.continuation)
            block_buf = self.continuation[2]
            block_buf += payload
            if len(block_buf) > MAX_HEADER_BLOCK:
                raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                first_flags = self.continuation[1]
                self.continuation = None
                self._headers(stream_id, first_flags, bytes(block_buf))
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8 or stream_id != 0:
                raise _ConnectionError(PROTOCOL_ERROR, "malformed PING")
            self._control(COSTS.ping)
            if not flags & ACK:
                self.write(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if len(payload) != 4 or stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "malformed RST_STREAM")
            self._control(COSTS.rst_stream)
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                if not self.resets.spend(self.now):
                    raise self._calm("too many streams reset")
                self._release(stream)
                stream.local_closed = stream.remote_closed = True
                self._forget_worker(stream)
                if self.going_away and not self.streams:
                    self.close()
        elif kind == GOAWAY:
            self._control(COSTS.goaway)
            self.going_away = True
            if not self.streams:
                self.close()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "clients cannot push")
        else:
            # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.
            self._control(COSTS.ignored_frame)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
        return payload[1 : len(payload) - payload[0]]

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        self._control(COSTS.settings)
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "malformed SETTINGS")
        if len(payload) > 6 * MAX_SETTINGS_ENTRIES:
            raise self._calm(f"more than {MAX_SETTINGS_ENTRIES} entries in one SETTINGS frame")
        window = None
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "window too large")
                window = value
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 2**24 - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_frame = value
            # Our HPACK encoder never uses the dynamic table: HEADER_TABLE_SIZE is moot.
        self.write(_frame(SETTINGS, ACK, 0))
        if window is not None and window != self.peer_window:
            grew = window > self.peer_window
            self.peer_window = window  # every stream's window moves with it (see credit)
            if grew:
                # Once per frame, over the streams waiting for their own window only.
                for stream in list(self.stalled.values()):
                    if self.send_window <= 0:
                        break
                    self._flush(stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        self._control(COSTS.window_update)
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "window overflow")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is not None and increment:
            stream.credit += increment
            if self.peer_window + stream.credit > MAX_WINDOW:
                self._reset(stream, FLOW_CONTROL_ERROR)
                return
            if stream.pending or stream.trailers is not None:
                self._flush(stream)

    def _flush_blocked(self) -> None:
        # Each stream visited either sends, or moves to `stalled` (its own window is empty),
        # or the connection's window runs out: the work is bounded by the progress made.
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._flush(stream)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        self.received += len(payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            self._control(COSTS.late_frame)
            return  # a stream we already answered (or reset): drop the rest of its upload
        body = self._unpad(flags, payload)
        if not body and not flags & END_STREAM:
            self._control(COSTS.empty_data)
        if stream.local_closed:
            self._control(COSTS.late_frame)
            return
        stream.data += body
        self.buffered += len(body)
        open_call = stream.method not in _AUTHENTICATED
        limit = MAX_SUBSCRIBE_REQUEST if open_call else self.max_message
        if open_call:
            self.subscribe_buffered += len(body)
            if self.subscribe_buffered > MAX_SUBSCRIBE_REQUEST:
                # Calls anyone may make (Subscribe, health) hold little each, and little per
                # connection in all: only authenticated calls may upload large messages.
                self._release(stream)
                message = "too many unfinished Subscribe requests on this connection"
                self.send_trailers(stream, "RESOURCE_EXHAUSTED", message)
                return
        if len(stream.data) > limit + PREFIX:
            self._release(stream)
            self.send_trailers(
                stream, "RESOURCE_EXHAUSTED", f"request larger than the limit of {limit} bytes"
            )
            return
        if self.buffered > self.max_message + MAX_SUBSCRIBE_REQUEST:
            # One connection holds at most one largest message's worth of unfinished uploads.
            self._release(stream)
            self.send_trailers(
                stream,
                "RESOURCE_EXHAUSTED",
                "too many unfinished uploads on this connection; send large messages one at a time",
            )
            return
        if flags & END_STREAM:
            stream.remote_closed = True
            self._dispatch(stream)

    def _release(self, stream: _Stream) -> None:
        """Forget the stream's buffered request bytes and its queued output."""
        n = len(stream.data)
        self.buffered -= n
        if stream.method not in _AUTHENTICATED:
            self.subscribe_buffered -= n
        stream.data = bytearray()
        self.blocked.pop(stream.id, None)
        self.stalled.pop(stream.id, None)

    def _reset(self, stream: _Stream, code: int) -> None:
        """End one stream with RST_STREAM (a stream error; the connection lives on)."""
        self.streams.pop(stream.id, None)
        self._release(stream)
        stream.pending.clear()
        stream.local_closed = stream.remote_closed = True
        self.write(_frame(RST_STREAM, 0, stream.id, struct.pack(">I", code)))
        self._forget_worker(stream)

    def _decode_headers(self, block: bytes) -> dict[bytes, bytes]:
        cached = self.header_cache.get(block)
        if cached is not None:
            return cached
        # Decoding from scratch costs CPU in proportion to the block (indexed references to
        # a large table entry inflate up to OUR_MAX_HEADER_LIST): charge it to the budget.
        self._control(COSTS.header_block(len(block)))
        table = self.decoder.header_table
        entries = table.dynamic_entries
        before = (len(entries), entries[0] if entries else None, table.maxsize)
        try:
            fields = self.decoder.decode(block, raw=True)
        except hpack.HPACKError as err:
            raise _ConnectionError(COMPRESSION_ERROR, f"bad header block: {err}") from None
        headers = {bytes(name): bytes(value) for name, value in fields}
        after = (len(entries), entries[0] if entries else None, table.maxsize)
        if after[0] == before[0] and after[1] is before[1] and after[2] == before[2]:
            # The block left the HPACK table as it was (indexed fields and literals without
            # indexing, e.g. gRPC's authorization): the same bytes will mean the same headers.
            owner = self.owner
            if (
                len(block) <= HEADER_CACHE_BLOCK
                and len(self.header_cache) < HEADER_CACHE_SIZE
                and owner.header_cache_entries < HEADER_CACHE_TOTAL
            ):
                self.header_cache[block] = headers
                owner.header_cache_entries += 1
        else:
            self.owner.header_cache_entries -= len(self.header_cache)
            self.header_cache.clear()
        return headers

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decode_headers(block)  # always: it keeps the HPACK table in step
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client end its request
            if flags & END_STREAM and not stream.remote_closed:
                stream.remote_closed = True
                self._dispatch(stream)
            else:
                self._control(COSTS.late_frame)
            return
        if stream_id <= self.last_stream:
            self._control(COSTS.late_frame)
            return  # a stream we already answered or reset: what follows is moot
        self.last_stream = stream_id
        if self.going_away or len(self.streams) >= OUR_MAX_STREAMS:
            if not self.resets.spend(self.now):
                raise self._calm("too many refused streams")
            self.write(_frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        path = headers.get(b":path", b"")
        method = _PATHS.get(path, "")
        bearer = None
        authorization = headers.get(b"authorization")
        if authorization is not None:
            bearer = parse_bearer(authorization.decode("latin-1"))
        stream = _Stream(self, stream_id, method, bearer, headers.get(b"grpc-encoding"))
        self.streams[stream_id] = stream
        stream.remote_closed = bool(flags & END_STREAM)
        if headers.get(b":method") != b"POST":
            self._control(COSTS.refused_call)
            self._http_error(stream, b"405")
            return
        content_type = headers.get(b"content-type", b"")
        if not (content_type == b"application/grpc" or content_type.startswith(
            (b"application/grpc+", b"application/grpc;")
        )):  # fmt: skip
            self._control(COSTS.refused_call)
            self._http_error(stream, b"415")
            return
        if not method:
            self._control(COSTS.refused_call)
            self.send_trailers(stream, "UNIMPLEMENTED", f"unknown method {path.decode('latin-1')}")
            return
        if method is _HEALTH_CHECK or method is _HEALTH_WATCH:
            self._control(COSTS.health_call)
        else:
            try:
                # Refuse a call whose token is wrong now, before buffering any of its request.
                self.service.admit(method, bearer)
            except core.CoreError as err:
                self._control(COSTS.refused_call)
                self.send_trailers(stream, err.code, err.message)
                return
            if method == "Subscribe" and self.owner.open_joins and not self.joins.spend(self.now):
                self._control(COSTS.refused_call)
                message = "too many Subscribe calls on this connection; retry later"
                self.send_trailers(stream, "UNAVAILABLE", message)
                return
        if stream.remote_closed:
            self._dispatch(stream)

    def _http_error(self, stream: _Stream, status: bytes) -> None:
        """A plain HTTP answer (not a gRPC call at all): :status, nothing else."""
        stream.headers_sent = stream.local_closed = True
        block = b"\x08" + _hpack_int(len(status), 7) + status  # :status is static name 8
        self.write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block))
        self._closed_locally(stream)

    # ------------------------------------------------------------------ calls

    def _request(self, stream: _Stream) -> bytes:
        body = stream.data
        self._release(stream)
        # Unauthenticated calls (Subscribe, health) are small; the rest is bounded by
        # max_message_bytes, also once inflated.
        limit = self.max_message if stream.method in _AUTHENTICATED else MAX_SUBSCRIBE_REQUEST
        return decode_request(body, stream.encoding, limit)

    def _dispatch(self, stream: _Stream) -> None:
        if stream.local_closed:
            return
        self.control.earn(COSTS.call_credit)
        try:
            message = self._request(stream)
            if stream.method is _HEALTH_CHECK or stream.method is _HEALTH_WATCH:
                self._health(stream, message)
                return
            if stream.method == "Subscribe":
                worker_id = self.service.subscribe(message, stream.bearer, stream)
                if stream.local_closed or stream.trailers is not None:
                    # Closed already while joining (a training that has finished): the
                    # service must still hear that the stream is over, once.
                    asyncio.get_running_loop().call_soon(self.service.stream_ended, worker_id)
                else:
                    stream.worker_id = worker_id
                return
            response = self.service.unary(stream.method, message, stream.bearer)
        except (CallError, core.CoreError) as err:
            self.send_trailers(stream, err.code, err.message)
            return
        except Exception:
            log.exception("%s failed", stream.method)
            self.send_trailers(stream, "INTERNAL", "internal server error")
            return
        self.send_message(stream, response)
        self.send_trailers(stream, "OK", "")

    def _health(self, stream: _Stream, message: bytes) -> None:
        health = self.owner.health
        try:
            name = health.check_request(message)
        except ValueError as err:
            raise CallError("INVALID_ARGUMENT", str(err)) from None
        status = health.status(name)
        if stream.method is _HEALTH_CHECK:
            if status is None:
                raise CallError("NOT_FOUND", f"unknown service {name!r}")
            self.send_message(stream, health.response(status))
            self.send_trailers(stream, "OK", "")
            return
        # Watch: the status now, then every change, until the client cancels.
        self.send_message(stream, health.response(SERVICE_UNKNOWN if status is None else status))
        if status is not None:

            def changed(new: int) -> None:
                self.send_message(stream, health.response(new))

            stream.unwatch = health.watch(changed)

    # ------------------------------------------------------------------ keepalive

    def check_alive(self, now: float) -> None:
        if self.closed or self.transport is None:
            return
        if self.write_paused:
            # Reading is paused (see pause_writing): a peer still draining a large state is
            # alive; one whose backlog does not shrink is not.
            backlog = self.transport.get_write_buffer_size()
            if backlog < self.write_backlog:
                self.last_seen = now
                self.ping_sent = None
            self.write_backlog = backlog
            if now - self.last_seen > KEEPALIVE_IDLE + KEEPALIVE_TIMEOUT:
                log.info("closing a connection whose peer stopped reading")
                self.closed = True
                self.transport.abort()
            return
        if self.ping_sent is not None:
            if now - self.ping_sent > KEEPALIVE_TIMEOUT:
                log.info("closing a connection that stopped answering pings")
                self.closed = True
                if self.transport is not None:
                    self.transport.abort()
            return
        if now - self.last_seen > KEEPALIVE_IDLE:
            self.ping_sent = now
            self.write(_frame(PING, 0, 0, b"keepaliv"))


class Http2Transport:
    """Serves an :class:`EvochiService` over gRPC/HTTP/2 on the running event loop."""

    def __init__(self, service: EvochiService, *, max_message_bytes: int,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:  # fmt: skip
        self.service = service
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self.header_cache_entries = 0  # over all connections (HEADER_CACHE_TOTAL)
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
        while True:
            await asyncio.sleep(KEEPALIVE_TIMEOUT / 4)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_alive(now)

    async def stop(self, grace: float | None) -> None:
        """Refuses new calls (GOAWAY), waits up to ``grace`` seconds for calls in flight."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.health.stop()
        for conn in list(self.connections):
            # Health Watch calls last as long as the client wants: end them now.
            for stream in [s for s in conn.streams.values() if s.unwatch is not None]:
                conn.send_trailers(stream, "UNAVAILABLE", "server stopping")
            conn.goaway(NO_ERROR, "server stopping", close=not conn.streams)
        deadline = time.monotonic() + (grace or 0.0)
        while any(c.streams for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        # close() lets buffered output drain; a peer that does not read never lets it.
        deadline = time.monotonic() + 1.0
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run
