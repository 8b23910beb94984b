"""The default transport: gRPC over HTTP/2, served straight from asyncio.

Why not grpc.aio: gRPC-Python's server hands every completion-queue event from its poller
thread to the event loop (a socket write, a wake-up, a GIL hand-over), about 250 µs of CPU
per unary call on the development machine; the ``h2`` library costs about 105 µs, this
module about 25 µs (``python -m benchmarks.transport``). An epoch of a 16-worker training is
~33 calls, so the transport decided the orchestration throughput. This module implements
only what a gRPC server needs, RFC 9113 frame by frame; header compression (HPACK, with its
Huffman code and dynamic table) is left to the well-kept ``hpack`` library.

What it serves: unary and server-streaming calls, the gRPC length-prefixed framing (gzip and
deflate request compression; responses are never compressed), flow control in both
directions, PING (answered, and sent to idle connections to find dead peers), GOAWAY on
shutdown, TLS with ALPN ``h2``. Malformed frames end the connection with GOAWAY; a bad call
ends with a gRPC status. Nothing a peer sends can raise out of this module.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
import zlib
from collections import deque
from pathlib import Path

import grpc
import hpack

from evochi.server import core
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

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
# What we accept: big frames mean few frames for a large state; streams are cheap.
OUR_MAX_FRAME = 1 << 20
OUR_MAX_STREAMS = 1000
OUR_MAX_HEADER_LIST = 64 * 1024
MAX_HEADER_BLOCK = 32 * 1024  # compressed; decoding a hostile block costs CPU in proportion
HEADER_CACHE_SIZE = 1024  # distinct blocks per connection: (method x worker) pairs
HEADER_CACHE_BLOCK = 2048  # larger blocks are decoded every time, never kept
MAX_SUBSCRIBE_REQUEST = 64 * 1024  # a SubscribeRequest is one int32
# Dead peers: a connection silent this long is pinged, and dropped without an answer.
KEEPALIVE_IDLE = 60.0
KEEPALIVE_TIMEOUT = 20.0

_FRAME_HEADER = struct.Struct(">BHBBI")
_PATHS = {f"/{SERVICE_NAME}/{m}".encode(): m for m in ("Subscribe", *UNARY_METHODS)}


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


def _status_code(name: str) -> int:
    return grpc.StatusCode[name].value[0]


def _percent_encode(message: str) -> bytes:
    """grpc-message: UTF-8, percent-encoding everything outside printable ASCII and '%'."""
    out = bytearray()
    for byte in message.encode("utf-8", "replace")[:4096]:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def _trailers(code: str, message: str) -> bytes:
    block = _literal(b"grpc-status", str(_status_code(code)).encode())
    if message:
        block += _literal(b"grpc-message", _percent_encode(message))
    return block


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _CallError(Exception):
    """Ends one call with a gRPC status (the connection lives on)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Stream:
    """One call. As a Subscribe stream it is also the service's WorkerStream."""

    __slots__ = (
        "bearer",
        "conn",
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
        "worker_id",
    )

    def __init__(self, conn: _Connection, stream_id: int, method: str, bearer: str | None,
                 encoding: bytes | None, send_window: int) -> None:  # fmt: skip
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
        self.send_window = send_window
        self.worker_id: str | None = None

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
        self.blocked: dict[int, _Stream] = {}
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

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
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
        streams, self.streams = self.streams, {}
        self.blocked.clear()
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
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_seen = time.monotonic()
        self.ping_sent = None
        self.out = []
        try:
            self._receive(data)
        except _ConnectionError as err:
            log.debug("connection error %d: %s", err.code, err)
            self.goaway(err.code, str(err))
        except Exception:
            log.exception("unexpected error on an HTTP/2 connection; closing it")
            self.goaway(INTERNAL_ERROR, "internal error")
        finally:
            out, self.out = self.out, None
            if out and self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(out))

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
        self.transport.close()

    def send_message(self, stream: _Stream, message: bytes) -> None:
        if stream.local_closed or stream.trailers is not None or self.closed:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self.write(_frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        n = len(framed)
        if (
            not stream.pending
            and n <= self.send_window
            and n <= stream.send_window
            and (n <= self.peer_frame)
        ):
            self.send_window -= n
            stream.send_window -= n
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
            allowed = min(self.send_window, stream.send_window, self.peer_frame)
            if allowed <= 0:
                self.blocked[stream.id] = stream
                return
            chunk = pending[0]
            if len(chunk) <= allowed:
                pending.popleft()
                part = chunk
            else:
                part = chunk[:allowed]
                pending[0] = chunk[allowed:]
            self.send_window -= len(part)
            stream.send_window -= len(part)
            self.write(_frame(DATA, 0, stream.id, bytes(part)))
        self.blocked.pop(stream.id, None)
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
        if self.going_away and not self.streams:
            self.close()

    def _forget_worker(self, stream: _Stream) -> None:
        worker_id, stream.worker_id = stream.worker_id, None
        if worker_id is not None:
            self.service.stream_ended(worker_id)

    # ------------------------------------------------------------------ input

    def _receive(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (no preface)")
                return
            if buf[: len(PREFACE)] != PREFACE:
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (no preface)")
            del buf[: len(PREFACE)]
            self.preface = True
        pos, end = 0, len(buf)
        unpack = _FRAME_HEADER.unpack_from
        try:
            while end - pos >= 9:
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
                    return
        finally:
            del buf[:pos]
        if self.received > MAX_WINDOW // 2:
            self.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0

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
            if flags & END_HEADERS:
                self._headers(stream_id, flags, block)
            else:
                self.continuation = (stream_id, flags, bytearray(block))
        elif kind == CONTINUATION:
            if self.continuation is None or self.continuation[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
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
            if not flags & ACK:
                self.write(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if len(payload) != 4 or stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "malformed RST_STREAM")
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._release(stream)
                stream.local_closed = stream.remote_closed = True
                self._forget_worker(stream)
                if self.going_away and not self.streams:
                    self.close()
        elif kind == GOAWAY:
            self.going_away = True
            if not self.streams:
                self.close()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "clients cannot push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.

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
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "malformed SETTINGS")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "window too large")
                delta = value - self.peer_window
                self.peer_window = value
                for stream in list(self.streams.values()):
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window overflow")
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 2**24 - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_frame = value
            # Our HPACK encoder never uses the dynamic table: HEADER_TABLE_SIZE is moot.
        self.write(_frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
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
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self._reset(stream, FLOW_CONTROL_ERROR)
                return
            if stream.pending or stream.trailers is not None:
                self._flush(stream)

    def _flush_blocked(self) -> None:
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
            return  # a stream we already answered (or reset): drop the rest of its upload
        body = self._unpad(flags, payload)
        if stream.local_closed:
            return
        stream.data += body
        self.buffered += len(body)
        limit = MAX_SUBSCRIBE_REQUEST if stream.method == "Subscribe" else self.max_message
        if len(stream.data) > limit + 5:
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
        self.buffered -= len(stream.data)
        stream.data = bytearray()
        self.blocked.pop(stream.id, None)

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
            if len(block) <= HEADER_CACHE_BLOCK and len(self.header_cache) < HEADER_CACHE_SIZE:
                self.header_cache[block] = headers
        else:
            self.header_cache.clear()
        return headers

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decode_headers(block)  # always: it keeps the HPACK table in step
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client end its request
            if flags & END_STREAM and not stream.remote_closed:
                stream.remote_closed = True
                self._dispatch(stream)
            return
        if stream_id <= self.last_stream:
            return  # a stream we already answered or reset: what follows is moot
        self.last_stream = stream_id
        if self.going_away or len(self.streams) >= OUR_MAX_STREAMS:
            self.write(_frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        path = headers.get(b":path", b"")
        method = _PATHS.get(path, "")
        bearer = None
        authorization = headers.get(b"authorization")
        if authorization is not None:
            bearer = parse_bearer(authorization.decode("latin-1"))
        stream = _Stream(self, stream_id, method, bearer, headers.get(b"grpc-encoding"),
                         self.peer_window)  # fmt: skip
        self.streams[stream_id] = stream
        stream.remote_closed = bool(flags & END_STREAM)
        if headers.get(b":method") != b"POST":
            self._http_error(stream, b"405")
            return
        content_type = headers.get(b"content-type", b"")
        if not (content_type == b"application/grpc" or content_type.startswith(
            (b"application/grpc+", b"application/grpc;")
        )):  # fmt: skip
            self._http_error(stream, b"415")
            return
        if not method:
            self.send_trailers(stream, "UNIMPLEMENTED", f"unknown method {path.decode('latin-1')}")
            return
        try:
            # Refuse a call whose token is wrong now, before buffering any of its request.
            self.service.admit(method, bearer)
        except core.CoreError as err:
            self.send_trailers(stream, err.code, err.message)
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
        if len(body) < 5:
            raise _CallError("INVALID_ARGUMENT", "expected one request message, got none")
        length = int.from_bytes(body[1:5], "big")
        if len(body) != 5 + length:
            raise _CallError("INVALID_ARGUMENT", "expected exactly one request message")
        message = bytes(body[5:])
        flag = body[0]
        if flag == 0:
            return message
        if flag != 1:
            raise _CallError("INTERNAL", f"invalid compressed-flag byte {flag}")
        encoding = (stream.encoding or b"identity").decode("latin-1")
        if encoding in ("gzip", "deflate"):
            inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
            try:
                plain = inflater.decompress(message, self.max_message + 1)
            except zlib.error as err:
                raise _CallError("INTERNAL", f"cannot decompress the request: {err}") from None
            if len(plain) > self.max_message:
                raise _CallError("RESOURCE_EXHAUSTED", "decompressed request over the limit")
            if not inflater.eof or inflater.unused_data:
                raise _CallError("INTERNAL", f"truncated or trailing {encoding} data")
            return plain
        if encoding == "identity":
            raise _CallError("INTERNAL", "compressed message without grpc-encoding")
        raise _CallError("UNIMPLEMENTED", f"unsupported grpc-encoding {encoding}")

    def _dispatch(self, stream: _Stream) -> None:
        if stream.local_closed:
            return
        try:
            message = self._request(stream)
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
        except (_CallError, core.CoreError) as err:
            self.send_trailers(stream, err.code, err.message)
            return
        except Exception:
            log.exception("%s failed", stream.method)
            self.send_trailers(stream, "INTERNAL", "internal server error")
            return
        self.send_message(stream, response)
        self.send_trailers(stream, "OK", "")

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
        for conn in list(self.connections):
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
