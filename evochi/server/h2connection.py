"""One server-side HTTP/2 connection as a state machine without I/O (RFC 9113).

:class:`H2Connection` follows the design of the ``h2`` library: the caller hands it the
bytes the peer sent together with the time (:meth:`~H2Connection.receive`), handles the
events that come back, calls ``send_*`` to answer, and writes what
:meth:`~H2Connection.data_to_send` returns. It never reads a socket, a clock or an event
loop, so every frame sequence and every timeout can be tested with bytes and numbers.

It owns what HTTP/2 owns: framing, flow control in both directions, HPACK (decoding is the
``hpack`` library's, with a cache of decoded blocks; our headers are encoded without the
dynamic table), PING, GOAWAY, keepalive of idle peers (:meth:`~H2Connection.tick`), and the
budgets against hostile peers (limits.py): frames that do no useful work spend from the
control budget, streams the peer resets from the reset budget, and past either the
connection ends with GOAWAY(ENHANCE_YOUR_CALM). What a request means (gRPC paths, tokens,
message framing, per-call upload limits) is the caller's: see http2.py.

Frames are parsed lazily (:meth:`~H2Connection.receive_events`): a frame is served only
once the caller has handled the event of the one before, so a call answered and closed
from inside an event is already out of the stream count when the next HEADERS arrives,
exactly as if each frame had its own ``receive``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import hpack

from evochi.server.limits import (
    BYTES_PER_TURN,
    CONTROL_BUDGET,
    COSTS,
    FRAMES_PER_TURN,
    HEADER_CACHE_BLOCK,
    HEADER_CACHE_SIZE,
    HEADER_CACHE_TOTAL,
    JOIN_BUDGET,
    KEEPALIVE_IDLE,
    KEEPALIVE_TIMEOUT,
    MAX_HEADER_BLOCK,
    MAX_SETTINGS_ENTRIES,
    OUR_MAX_FRAME,
    OUR_MAX_HEADER_LIST,
    OUR_MAX_STREAMS,
    RESET_BUDGET,
    Budget,
)

__all__ = [
    "ACK",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONTINUATION",
    "DATA",
    "DEFAULT_FRAME",
    "DEFAULT_WINDOW",
    "END_HEADERS",
    "END_STREAM",
    "ENHANCE_YOUR_CALM",
    "FLOW_CONTROL_ERROR",
    "FRAME_SIZE_ERROR",
    "GOAWAY",
    "HEADERS",
    "INTERNAL_ERROR",
    "KEEPALIVE_PING",
    "MAX_WINDOW",
    "NO_ERROR",
    "PADDED",
    "PING",
    "PREFACE",
    "PRIORITY",
    "PRIORITY_FLAG",
    "PROTOCOL_ERROR",
    "PUSH_PROMISE",
    "REFUSED_STREAM",
    "RST_STREAM",
    "SETTINGS",
    "WINDOW_UPDATE",
    "ConnectionTerminated",
    "ConnectionTimedOut",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "H2Connection",
    "HeaderCacheQuota",
    "PingAcked",
    "RequestReceived",
    "StreamEnded",
    "StreamReset",
    "encode_headers",
    "hpack_integer",
    "hpack_literal",
]

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
KEEPALIVE_PING = b"keepaliv"
_FRAME_HEADER = struct.Struct(">BHBBI")
_CODE = struct.Struct(">I")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME_HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 section 5.1) in a ``prefix_bits`` prefix of ``first``."""
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


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header as "literal without indexing, new name": it never touches the peer's
    dynamic table, so the encoding of a header is the same bytes on every connection, and a
    block can be built once and sent forever."""
    return b"\x00" + hpack_integer(len(name), 7) + name + hpack_integer(len(value), 7) + value


def encode_headers(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An HPACK block for :meth:`H2Connection.send_headers`, of literals only (see
    :func:`hpack_literal`)."""
    return b"".join(hpack_literal(name, value) for name, value in fields)


# --------------------------------------------------------------------------- events


class Event:
    """Something the peer did that the caller has to know about."""

    __slots__ = ()


@dataclass(slots=True)
class RequestReceived(Event):
    """A new stream's header block. ``end_stream``: the request has no body."""

    stream_id: int
    headers: dict[bytes, bytes]
    end_stream: bool


@dataclass(slots=True)
class DataReceived(Event):
    """Request body bytes (padding removed). ``end_stream``: the request is complete."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class StreamEnded(Event):
    """Trailers ended the request of a stream (its header block is not reported)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """A stream is gone: reset by the peer (``remote``) or by us for breaking a stream
    rule (a flow-control window overflow). Nothing more is sent on it."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class PingAcked(Event):
    payload: bytes


@dataclass(slots=True)
class GoAwayReceived(Event):
    """The peer starts no more streams; the connection closes once the open ones end."""

    error_code: int
    last_stream_id: int


@dataclass(slots=True)
class ConnectionTerminated(Event):
    """The peer broke the protocol or a budget: GOAWAY with ``error_code`` is queued in
    :meth:`H2Connection.data_to_send` and the connection is closed."""

    error_code: int
    message: str


@dataclass(slots=True)
class ConnectionTimedOut(Event):
    """A dead peer (see :meth:`H2Connection.tick`): close the socket without a word."""

    reason: str


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class HeaderCacheQuota:
    """Decoded header blocks cached over all the connections sharing this quota."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = HEADER_CACHE_TOTAL) -> None:
        self.limit = limit
        self.used = 0


class _Stream:
    __slots__ = ("credit", "headers_sent", "id", "pending", "remote_closed", "trailers")

    def __init__(self, stream_id: int, remote_closed: bool) -> None:
        self.id = stream_id
        self.remote_closed = remote_closed
        self.headers_sent = False
        self.pending: deque[memoryview] = deque()
        self.trailers: bytes | None = None
        # The stream's send window is the peer's INITIAL_WINDOW_SIZE plus this credit (its
        # WINDOW_UPDATEs less what we sent): a new INITIAL_WINDOW_SIZE costs O(1), not O(streams).
        self.credit = 0


class H2Connection:
    """The server side of one HTTP/2 connection, fed bytes and the time by its caller.

    ``now`` is the caller's clock in seconds (any monotonic clock, the same for every call).
    Streams are those the peer opened and we have not ended yet: ``send_*`` on any other
    stream id is ignored, as is everything after the connection closed (:attr:`closed`:
    write what :meth:`data_to_send` still returns, then close the socket).
    """

    def __init__(
        self,
        now: float,
        *,
        header_cache: HeaderCacheQuota | None = None,
        keepalive_idle: float = KEEPALIVE_IDLE,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    ) -> None:
        self.now = now
        self.keepalive_idle = keepalive_idle
        self.keepalive_timeout = keepalive_timeout
        self.quota = HeaderCacheQuota() if header_cache is None else header_cache
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._preface = False
        # The last receive stopped at its turn's quota (FRAMES_PER_TURN, BYTES_PER_TURN) with
        # whole frames left: serve them with ``receive(b"", now)`` once other connections had
        # their turn. (An attribute, not a property: it is read after every turn.)
        self.more_frames = False
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
        self.closed = False
        self.going_away = False
        self.last_seen = now
        self.ping_sent: float | None = None
        self.control = Budget(*CONTROL_BUDGET, now=now)
        self.resets = Budget(*RESET_BUDGET, now=now)
        self.joins = Budget(*JOIN_BUDGET, now=now)

    # ------------------------------------------------------------------ connection

    def initiate_connection(self) -> None:
        """Queue our SETTINGS: the first bytes a server sends."""
        settings = struct.pack(
            ">HIHIHIHI",
            S_MAX_CONCURRENT_STREAMS, OUR_MAX_STREAMS,
            S_INITIAL_WINDOW_SIZE, MAX_WINDOW,
            S_MAX_FRAME_SIZE, OUR_MAX_FRAME,
            S_MAX_HEADER_LIST_SIZE, OUR_MAX_HEADER_LIST,
        )  # fmt: skip
        # Streams get the largest window, so only the connection's needs refilling.
        self._out.append(
            _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, _CODE.pack(MAX_WINDOW - DEFAULT_WINDOW))
        )

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def close_connection(
        self, error_code: int = NO_ERROR, message: str = "", *, drain: bool = False
    ) -> None:
        """Queue GOAWAY. ``drain``: the streams open now may still finish (new ones are
        refused), and the connection closes after the last; otherwise it closes now."""
        if self.closed:
            return
        payload = struct.pack(">II", self.last_stream, error_code) + message.encode()[:256]
        self._out.append(_frame(GOAWAY, 0, 0, payload))
        self.going_away = True
        if not drain or not self.streams:
            self.closed = True

    def ping(self, payload: bytes = KEEPALIVE_PING) -> None:
        if not self.closed:
            self._out.append(_frame(PING, 0, 0, payload))

    def charge(self, cost: float) -> bool:
        """Spend ``cost`` from the control budget for a request that does no useful work
        (limits.COSTS). False: the budget is spent, GOAWAY(ENHANCE_YOUR_CALM) is queued and
        the connection is closed."""
        if self.control.spend(self.now, cost):
            return True
        self._fail(ENHANCE_YOUR_CALM, "too many control frames")
        return False

    def earn(self, credit: float) -> None:
        """Useful work done for the peer (a call dispatched) refills its control budget."""
        self.control.earn(credit)

    def admit_join(self) -> bool:
        """Spend one from the join budget; False: over it (the connection lives on)."""
        return self.joins.spend(self.now)

    def release(self) -> None:
        """The socket is gone: return the header cache to the shared quota, drop buffers."""
        self.closed = True
        self.quota.used -= len(self.header_cache)
        self.header_cache.clear()
        self._buf = bytearray()
        self._out = []
        self.streams.clear()
        self.blocked.clear()
        self.stalled.clear()

    def _fail(self, code: int, message: str) -> None:
        self.close_connection(code, message)

    # ------------------------------------------------------------------ keepalive

    def peer_active(self, now: float) -> None:
        """The peer showed it is alive without sending (it read some of our output)."""
        self.last_seen = now
        self.ping_sent = None

    def next_deadline(self, peer_reading: bool = True) -> float | None:
        """When :meth:`tick` has something to do next (None: never, the connection is closed)."""
        if self.closed:
            return None
        if not peer_reading:
            return self.last_seen + self.keepalive_idle + self.keepalive_timeout
        if self.ping_sent is not None:
            return self.ping_sent + self.keepalive_timeout
        return self.last_seen + self.keepalive_idle

    def tick(self, now: float, peer_reading: bool = True) -> list[Event]:
        """Keepalive: a peer silent for ``keepalive_idle`` seconds is pinged; one that does
        not answer (sends nothing) within ``keepalive_timeout`` has timed out. While the peer
        does not read (``peer_reading`` False: our writes are backed up), no PING could reach
        it: it times out after both periods without reading."""
        if self.closed:
            return []
        if not peer_reading:
            if now - self.last_seen > self.keepalive_idle + self.keepalive_timeout:
                self.closed = True
                return [ConnectionTimedOut("the peer stopped reading")]
            return []
        if self.ping_sent is not None:
            if now - self.ping_sent > self.keepalive_timeout:
                self.closed = True
                return [ConnectionTimedOut("the peer stopped answering pings")]
            return []
        if now - self.last_seen > self.keepalive_idle:
            self.ping_sent = now
            self.ping()
        return []

    # ------------------------------------------------------------------ output

    def send_headers(self, stream_id: int, block: bytes, end_stream: bool = False) -> None:
        """A response's header block (an HPACK block such as :func:`encode_headers` makes).
        With ``end_stream`` it is the whole response (e.g. gRPC's trailers-only answer)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.trailers is not None or self.closed:
            return
        stream.headers_sent = True
        if end_stream:
            self._out.append(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block))
            self._closed_locally(stream)
        else:
            self._out.append(_frame(HEADERS, END_HEADERS, stream_id, block))

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Body bytes (one gRPC message), sent as far as the flow-control windows allow and
        queued past them; each call earns the peer's control budget COSTS.message_credit."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.trailers is not None or self.closed:
            return
        n = len(data)
        self.control.earn(COSTS.message_credit)
        if (
            not stream.pending
            and n <= self.send_window
            and n <= self.peer_window + stream.credit
            and (n <= self.peer_frame)
        ):
            self.send_window -= n
            stream.credit -= n
            self._out.append(_frame(DATA, 0, stream_id, data))
            return
        stream.pending.append(memoryview(data))
        self._flush(stream)

    def send_response(self, stream_id: int, headers: bytes, data: bytes, trailers: bytes) -> None:
        """A whole response in one call: :meth:`send_headers`, :meth:`send_data` and
        :meth:`send_trailers`, with one stream lookup (a unary gRPC call's answer)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.trailers is not None or stream.headers_sent or self.closed:
            return
        stream.headers_sent = True
        n = len(data)
        self.control.earn(COSTS.message_credit)
        if n <= self.send_window and n <= self.peer_window + stream.credit and n <= self.peer_frame:
            self.send_window -= n
            stream.credit -= n
            self._out.append(
                _frame(HEADERS, END_HEADERS, stream_id, headers)
                + _frame(DATA, 0, stream_id, data)
                + _frame(HEADERS, END_HEADERS | END_STREAM, stream_id, trailers)
            )
            self._closed_locally(stream)
            return
        self._out.append(_frame(HEADERS, END_HEADERS, stream_id, headers))
        stream.pending.append(memoryview(data))
        stream.trailers = trailers
        self._flush(stream)

    def send_trailers(self, stream_id: int, block: bytes) -> None:
        """End the stream with a header block, after the data still queued for it."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.trailers is not None or self.closed:
            return
        stream.headers_sent = True
        stream.trailers = block
        self._flush(stream)

    def reset_stream(self, stream_id: int, error_code: int = CANCEL) -> None:
        """End one stream with RST_STREAM (a stream error; the connection lives on)."""
        stream = self.streams.pop(stream_id, None)
        if stream is None or self.closed:
            return
        self._forget(stream)
        self._out.append(_frame(RST_STREAM, 0, stream_id, _CODE.pack(error_code)))
        if self.going_away and not self.streams:
            self.closed = True

    def _forget(self, stream: _Stream) -> None:
        stream.pending.clear()
        stream.remote_closed = True
        self.blocked.pop(stream.id, None)
        self.stalled.pop(stream.id, None)

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
            self._out.append(_frame(DATA, 0, stream.id, bytes(part)))
        self.blocked.pop(stream.id, None)
        self.stalled.pop(stream.id, None)
        if stream.trailers is not None:
            self._out.append(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            self._closed_locally(stream)

    def _closed_locally(self, stream: _Stream) -> None:
        if not stream.remote_closed:
            # We answered before the request ended (an early error): stop the upload.
            self._out.append(_frame(RST_STREAM, 0, stream.id, _CODE.pack(NO_ERROR)))
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        self.stalled.pop(stream.id, None)
        if self.going_away and not self.streams:
            self.closed = True

    # ------------------------------------------------------------------ input

    @property
    def buffered_input(self) -> int:
        """Bytes received and not parsed yet."""
        return len(self._buf)

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Take what the peer sent and serve at most one turn's worth of frames (see
        ``more_frames``): the events, in order. Connection errors queue GOAWAY and end
        the list with :class:`ConnectionTerminated`; nothing a peer sends raises."""
        return list(self.receive_events(data, now))

    def receive_events(self, data: bytes, now: float) -> Iterator[Event]:
        """:meth:`receive`, lazily: ``data`` is buffered at once, each frame is parsed as
        the iterator advances, after the caller handled the event before it. An iterator
        dropped unstarted leaves the frames buffered for the next call."""
        if data and not self.closed:
            self._buf += data
            self.last_seen = now
            self.ping_sent = None
        self.now = now
        return self._events()

    def _events(self) -> Iterator[Event]:
        # One generator, not a wrapper around another: it is made once per turn, and a turn
        # is often a single call.
        self.more_frames = False
        if self.closed:
            return
        buf = self._buf
        pos = 0
        try:
            if not self._preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (no preface)")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (no preface)")
                pos = len(PREFACE)
                self._preface = True
            end = len(buf)
            unpack = _FRAME_HEADER.unpack_from
            frames = 0
            handle = self._frame
            while end - pos >= 9:
                if frames >= FRAMES_PER_TURN or pos >= BYTES_PER_TURN:
                    self.more_frames = True
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
                event = handle(kind, flags, stream_id & 0x7FFFFFFF, payload)
                if event is not None:
                    yield event
                if self.closed:
                    return
            if self.received > MAX_WINDOW // 2:
                self._out.append(_frame(WINDOW_UPDATE, 0, 0, _CODE.pack(self.received)))
                self.received = 0
        except _ConnectionError as err:
            self._fail(err.code, str(err))
            yield ConnectionTerminated(err.code, str(err))
        except Exception as err:  # a bug of ours, not the peer's: the peer still gets GOAWAY
            self._fail(INTERNAL_ERROR, "internal error")
            yield ConnectionTerminated(INTERNAL_ERROR, f"internal error: {err!r}")
        finally:
            del buf[:pos]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> Event | None:
        if self.continuation is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            return self._data(flags, stream_id, payload)
        if kind == HEADERS:
            if stream_id == 0 or stream_id % 2 == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on an invalid stream id")
            block = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                block = block[5:]
            if len(block) > MAX_HEADER_BLOCK:
                raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                return self._headers(stream_id, flags, block)
            self._control(COSTS.unfinished_headers)
            self.continuation = (stream_id, flags, bytearray(block))
            return None
        if kind == CONTINUATION:
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
                return self._headers(stream_id, first_flags, bytes(block_buf))
            return None
        if kind == SETTINGS:
            self._settings(flags, stream_id, payload)
            return None
        if kind == WINDOW_UPDATE:
            return self._window_update(stream_id, payload)
        if kind == PING:
            if len(payload) != 8 or stream_id != 0:
                raise _ConnectionError(PROTOCOL_ERROR, "malformed PING")
            self._control(COSTS.ping)
            if flags & ACK:
                return PingAcked(payload)
            self._out.append(_frame(PING, ACK, 0, payload))
            return None
        if kind == RST_STREAM:
            if len(payload) != 4 or stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "malformed RST_STREAM")
            self._control(COSTS.rst_stream)
            stream = self.streams.get(stream_id)
            if stream is None:
                return None
            if not self.resets.spend(self.now):
                raise _ConnectionError(ENHANCE_YOUR_CALM, "too many streams reset")
            del self.streams[stream_id]
            self._forget(stream)
            if self.going_away and not self.streams:
                self.closed = True
            return StreamReset(stream_id, _CODE.unpack(payload)[0], True)
        if kind == GOAWAY:
            self._control(COSTS.goaway)
            self.going_away = True
            if not self.streams:
                self.closed = True
            last, code = struct.unpack_from(">II", payload) if len(payload) >= 8 else (0, 0)
            return GoAwayReceived(code, last & 0x7FFFFFFF)
        if kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "clients cannot push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.
        self._control(COSTS.ignored_frame)
        return None

    def _control(self, cost: float) -> None:
        if not self.control.spend(self.now, cost):
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many control frames")

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
            raise _ConnectionError(
                ENHANCE_YOUR_CALM, f"more than {MAX_SETTINGS_ENTRIES} entries in one SETTINGS frame"
            )
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
        self._out.append(_frame(SETTINGS, ACK, 0))
        if window is not None and window != self.peer_window:
            grew = window > self.peer_window
            self.peer_window = window  # every stream's window moves with it (see credit)
            if grew:
                # Once per frame, over the streams waiting for their own window only.
                for stream in list(self.stalled.values()):
                    if self.send_window <= 0:
                        break
                    self._flush(stream)

    def _window_update(self, stream_id: int, payload: bytes) -> Event | None:
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
            # Each stream visited either sends, or moves to `stalled` (its own window is
            # empty), or the connection's window runs out: the work is bounded by the
            # progress made.
            for stream in list(self.blocked.values()):
                if self.send_window <= 0:
                    break
                self._flush(stream)
            return None
        stream = self.streams.get(stream_id)
        if stream is not None and increment:
            stream.credit += increment
            if self.peer_window + stream.credit > MAX_WINDOW:
                self.reset_stream(stream_id, FLOW_CONTROL_ERROR)
                return StreamReset(stream_id, FLOW_CONTROL_ERROR, False)
            if stream.pending or stream.trailers is not None:
                self._flush(stream)
        return None

    def _data(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        self.received += len(payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            self._control(COSTS.late_frame)
            return None  # a stream we already answered (or reset): drop the rest of its upload
        body = self._unpad(flags, payload)
        end_stream = bool(flags & END_STREAM)
        if end_stream:
            stream.remote_closed = True
        elif not body:
            self._control(COSTS.empty_data)
            return None
        return DataReceived(stream_id, body, end_stream)

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
            quota = self.quota
            if (
                len(block) <= HEADER_CACHE_BLOCK
                and len(self.header_cache) < HEADER_CACHE_SIZE
                and quota.used < quota.limit
            ):
                self.header_cache[block] = headers
                quota.used += 1
        else:
            self.quota.used -= len(self.header_cache)
            self.header_cache.clear()
        return headers

    def _headers(self, stream_id: int, flags: int, block: bytes) -> Event | None:
        headers = self._decode_headers(block)  # always: it keeps the HPACK table in step
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client end its request
            if flags & END_STREAM and not stream.remote_closed:
                stream.remote_closed = True
                return StreamEnded(stream_id)
            self._control(COSTS.late_frame)
            return None
        if stream_id <= self.last_stream:
            self._control(COSTS.late_frame)
            return None  # a stream we already answered or reset: what follows is moot
        self.last_stream = stream_id
        if self.going_away or len(self.streams) >= OUR_MAX_STREAMS:
            if not self.resets.spend(self.now):
                raise _ConnectionError(ENHANCE_YOUR_CALM, "too many refused streams")
            self._out.append(_frame(RST_STREAM, 0, stream_id, _CODE.pack(REFUSED_STREAM)))
            return None
        end_stream = bool(flags & END_STREAM)
        self.streams[stream_id] = _Stream(stream_id, end_stream)
        return RequestReceived(stream_id, headers, end_stream)
