"""The sans-IO HTTP/2 connection, driven with bytes and a clock of plain numbers: no socket,
no event loop, no waiting. Every check reads the frames it sends back or the events it
returns."""

from __future__ import annotations

import struct

import hpack
import pytest

from evochi.server import h2connection as h2
from evochi.server.h2connection import (
    ConnectionTerminated,
    ConnectionTimedOut,
    DataReceived,
    GoAwayReceived,
    H2Connection,
    HeaderCacheQuota,
    PingAcked,
    RequestReceived,
    StreamEnded,
    StreamReset,
    encode_headers,
)
from evochi.server.limits import (
    CONTROL_BUDGET,
    FRAMES_PER_TURN,
    KEEPALIVE_IDLE,
    KEEPALIVE_TIMEOUT,
    OUR_MAX_FRAME,
    OUR_MAX_HEADER_LIST,
    OUR_MAX_STREAMS,
    RESET_BUDGET,
)
from tests.server.h2raw import frame

Frame = tuple[int, int, int, bytes]  # kind, flags, stream id, payload
REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/evochi.v1.EvochiService/Heartbeat"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
]


def parse(data: bytes) -> list[Frame]:
    frames, pos = [], 0
    while pos < len(data):
        high, low, kind, flags, stream_id = struct.unpack_from(">BHBBI", data, pos)
        length = (high << 16) | low
        frames.append((kind, flags, stream_id, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    assert pos == len(data), "a partial frame was sent"
    return frames


def goaway(frames: list[Frame]) -> tuple[int, int]:
    """(last stream id, error code) of the one GOAWAY, which must be the last frame."""
    assert [f[0] for f in frames].count(h2.GOAWAY) == 1, frames
    kind, _, _, payload = frames[-1]
    assert kind == h2.GOAWAY
    return struct.unpack_from(">II", payload)


class Peer:
    """A client: its connection preface, header blocks from its own HPACK encoder."""

    def __init__(self, settings: bytes = b"", now: float = 0.0) -> None:
        self.encoder = hpack.Encoder()
        self.conn = H2Connection(now)
        self.conn.initiate_connection()
        self.conn.data_to_send()
        assert self.conn.receive(h2.PREFACE + frame(h2.SETTINGS, 0, 0, settings), now) == []
        assert parse(self.conn.data_to_send()) == [(h2.SETTINGS, h2.ACK, 0, b"")]

    def headers(self, stream_id: int, flags: int = h2.END_HEADERS, fields=REQUEST) -> bytes:
        return frame(h2.HEADERS, flags, stream_id, self.encoder.encode(fields))

    def request(self, stream_id: int, body: bytes) -> bytes:
        return self.headers(stream_id) + frame(h2.DATA, h2.END_STREAM, stream_id, body)


def test_handshake_sends_our_settings_and_acknowledges_the_peers() -> None:
    conn = H2Connection(0.0)
    conn.initiate_connection()
    (settings, update) = parse(conn.data_to_send())
    assert settings[:3] == (h2.SETTINGS, 0, 0)
    advertised = dict(struct.iter_unpack(">HI", settings[3]))
    assert advertised == {
        3: OUR_MAX_STREAMS,
        4: h2.MAX_WINDOW,
        5: OUR_MAX_FRAME,
        6: OUR_MAX_HEADER_LIST,
    }
    assert update == (h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", h2.MAX_WINDOW - 65_535))
    assert conn.data_to_send() == b""
    # The preface may arrive a byte at a time.
    hello = h2.PREFACE + frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 5, 20_000))
    for i in range(len(hello)):
        assert conn.receive(hello[i : i + 1], 0.0) == []
    assert parse(conn.data_to_send()) == [(h2.SETTINGS, h2.ACK, 0, b"")]
    assert conn.peer_frame == 20_000 and not conn.closed


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"])
def test_a_client_without_the_preface_gets_goaway(junk: bytes) -> None:
    conn = H2Connection(0.0)
    (event,) = conn.receive(junk, 0.0)
    assert isinstance(event, ConnectionTerminated) and event.error_code == h2.PROTOCOL_ERROR
    assert goaway(parse(conn.data_to_send())) == (0, h2.PROTOCOL_ERROR)
    assert conn.closed
    assert conn.receive(h2.PREFACE, 0.0) == [] and conn.data_to_send() == b""


def test_a_unary_call_gives_request_and_data_events_and_its_response_goes_out() -> None:
    peer = Peer()
    conn = peer.conn
    events = conn.receive(peer.request(1, b"\x00\x00\x00\x00\x02hi"), 1.0)
    assert [type(e) for e in events] == [RequestReceived, DataReceived]
    request, data = events
    assert request.stream_id == 1 and not request.end_stream
    assert request.headers[b":path"] == b"/evochi.v1.EvochiService/Heartbeat"
    assert request.headers[b":method"] == b"POST"
    assert data == DataReceived(1, b"\x00\x00\x00\x00\x02hi", True)
    assert conn.data_to_send() == b""  # nothing to say until the caller answers
    conn.send_headers(1, encode_headers([(b":status", b"200")]))
    conn.send_data(1, b"\x00\x00\x00\x00\x02ok")
    conn.send_trailers(1, encode_headers([(b"grpc-status", b"0")]))
    frames = parse(conn.data_to_send())
    assert [(k, f, s) for k, f, s, _ in frames] == [
        (h2.HEADERS, h2.END_HEADERS, 1),
        (h2.DATA, 0, 1),
        (h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1),
    ]
    decoder = hpack.Decoder()
    assert decoder.decode(frames[0][3]) == [(":status", "200")]
    assert frames[1][3] == b"\x00\x00\x00\x00\x02ok"
    assert decoder.decode(frames[2][3]) == [("grpc-status", "0")]
    assert conn.streams == {} and conn.send_window == 65_535 - 7
    # The stream is over: more of it is dropped, sending on it does nothing.
    assert conn.receive(frame(h2.DATA, h2.END_STREAM, 1, b"x"), 1.0) == []
    conn.send_data(1, b"late")
    assert conn.data_to_send() == b"" and conn.received == 8


def test_request_trailers_end_the_stream_and_an_early_answer_stops_the_upload() -> None:
    peer = Peer()
    conn = peer.conn
    events = conn.receive(peer.headers(1) + frame(h2.DATA, 0, 1, b"abc"), 0.0)
    assert events[1] == DataReceived(1, b"abc", False)
    trailers = peer.headers(1, h2.END_HEADERS | h2.END_STREAM, [("x-trailer", "1")])
    assert conn.receive(trailers, 0.0) == [StreamEnded(1)]
    # Stream 3 is answered (trailers-only) before its request ends: RST_STREAM(NO_ERROR).
    conn.receive(peer.headers(3), 0.0)
    conn.send_headers(3, encode_headers([(b":status", b"200")]), end_stream=True)
    frames = parse(conn.data_to_send())
    assert [(k, f, s) for k, f, s, _ in frames] == [
        (h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 3),
        (h2.RST_STREAM, 0, 3),
    ]
    assert frames[1][3] == struct.pack(">I", h2.NO_ERROR) and 3 not in conn.streams


def test_output_waits_for_the_stream_and_connection_windows() -> None:
    peer = Peer(settings=struct.pack(">HI", 4, 10))  # 10 bytes per stream
    conn = peer.conn
    conn.receive(peer.headers(1, h2.END_HEADERS | h2.END_STREAM), 0.0)
    conn.send_headers(1, b"\x88")
    conn.send_data(1, b"a" * 25)
    conn.send_trailers(1, b"\x00")
    frames = parse(conn.data_to_send())
    assert [(k, len(p)) for k, _, _, p in frames] == [(h2.HEADERS, 1), (h2.DATA, 10)]
    assert list(conn.stalled) == [1] and not conn.blocked
    conn.receive(frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 10)), 0.0)
    assert [(k, p) for k, _, _, p in parse(conn.data_to_send())] == [(h2.DATA, b"a" * 10)]
    conn.receive(frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)), 0.0)
    frames = parse(conn.data_to_send())
    assert [(k, f, p) for k, f, _, p in frames] == [
        (h2.DATA, 0, b"a" * 5),
        (h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, b"\x00"),
    ]
    assert conn.send_window == 65_535 - 25 and not conn.stalled and conn.streams == {}

    # The connection's window (65,535) in frames of at most 16,384 bytes, then blocked.
    peer = Peer(settings=struct.pack(">HI", 4, 1 << 20))
    conn = peer.conn
    conn.receive(peer.headers(1, h2.END_HEADERS | h2.END_STREAM), 0.0)
    conn.send_data(1, b"b" * 70_000)
    sizes = [len(p) for k, _, _, p in parse(conn.data_to_send())]
    assert sizes == [16_384] * 3 + [65_535 - 3 * 16_384]
    assert conn.send_window == 0 and list(conn.blocked) == [1]
    conn.receive(frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 10_000)), 0.0)
    sizes = [len(p) for k, _, _, p in parse(conn.data_to_send())]
    assert sizes == [70_000 - 65_535] and not conn.blocked
    assert conn.send_window == 10_000 - (70_000 - 65_535)


def test_a_whole_response_in_one_call_goes_out_as_far_as_the_window_allows() -> None:
    peer = Peer(settings=struct.pack(">HI", 4, 4))
    conn = peer.conn
    for stream_id in (1, 3):
        conn.receive(peer.headers(stream_id, h2.END_HEADERS | h2.END_STREAM), 0.0)
    conn.send_response(1, b"\x88", b"ok", b"\x00")  # fits the 4-byte window: in one piece
    conn.send_response(3, b"\x88", b"hello", b"\x00")  # does not: trailers wait
    frames = parse(conn.data_to_send())
    ends = h2.END_HEADERS | h2.END_STREAM
    assert [(k, f, s, p) for k, f, s, p in frames] == [
        (h2.HEADERS, h2.END_HEADERS, 1, b"\x88"),
        (h2.DATA, 0, 1, b"ok"),
        (h2.HEADERS, ends, 1, b"\x00"),
        (h2.HEADERS, h2.END_HEADERS, 3, b"\x88"),
        (h2.DATA, 0, 3, b"hell"),
    ]
    assert list(conn.streams) == [3]
    conn.receive(frame(h2.WINDOW_UPDATE, 0, 3, struct.pack(">I", 1)), 0.0)
    assert parse(conn.data_to_send()) == [(h2.DATA, 0, 3, b"o"), (h2.HEADERS, ends, 3, b"\x00")]
    assert conn.streams == {}


def test_a_larger_initial_window_releases_stalled_streams_in_one_frame() -> None:
    peer = Peer(settings=struct.pack(">HI", 4, 0))
    conn = peer.conn
    for stream_id in (1, 3, 5):
        conn.receive(peer.headers(stream_id, h2.END_HEADERS | h2.END_STREAM), 0.0)
        conn.send_data(stream_id, b"xyz")
    assert parse(conn.data_to_send()) == [] and sorted(conn.stalled) == [1, 3, 5]
    conn.receive(frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 4, 100)), 0.0)
    frames = parse(conn.data_to_send())
    assert frames[0] == (h2.SETTINGS, h2.ACK, 0, b"")
    assert sorted((s, p) for _, _, s, p in frames[1:]) == [(1, b"xyz"), (3, b"xyz"), (5, b"xyz")]
    assert not conn.stalled


def test_window_overflows_reset_the_stream_or_end_the_connection() -> None:
    peer = Peer()
    conn = peer.conn
    conn.receive(peer.headers(1, h2.END_HEADERS | h2.END_STREAM), 0.0)
    events = conn.receive(frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", h2.MAX_WINDOW)), 0.0)
    assert events == [StreamReset(1, h2.FLOW_CONTROL_ERROR, remote=False)]
    assert parse(conn.data_to_send()) == [
        (h2.RST_STREAM, 0, 1, struct.pack(">I", h2.FLOW_CONTROL_ERROR))
    ]
    assert not conn.closed and conn.streams == {}
    events = conn.receive(frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", h2.MAX_WINDOW)), 0.0)
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert goaway(parse(conn.data_to_send())) == (1, h2.FLOW_CONTROL_ERROR)


def test_a_ping_flood_is_answered_up_to_the_budget_then_goaway_enhance_your_calm() -> None:
    _, burst = CONTROL_BUDGET
    peer = Peer()
    conn = peer.conn
    ping = frame(h2.PING, 0, 0, b"12345678")
    n = int(burst)  # at 5 s the client's SETTINGS (at 0 s) has drained
    # One turn serves at most FRAMES_PER_TURN frames; the rest waits for the next turn.
    assert conn.receive(ping * n, 5.0) == []
    acks = len(parse(conn.data_to_send()))
    assert acks == FRAMES_PER_TURN and conn.more_frames
    while conn.more_frames:
        assert conn.receive(b"", 5.0) == []
        acks += len(parse(conn.data_to_send()))
    assert acks == n and not conn.closed
    # The budget is full at the same instant: one more is one too many.
    (event,) = conn.receive(ping, 5.0)
    assert event == ConnectionTerminated(h2.ENHANCE_YOUR_CALM, "too many control frames")
    assert goaway(parse(conn.data_to_send())) == (0, h2.ENHANCE_YOUR_CALM)


def test_the_control_budget_drains_with_time_and_refills_with_useful_work() -> None:
    rate, burst = CONTROL_BUDGET
    peer = Peer()
    conn = peer.conn
    assert conn.charge(burst - 1)  # with the client's SETTINGS: full
    one_second = int(rate)
    ping = frame(h2.PING, 0, 0, b"12345678")
    for _ in range(one_second // FRAMES_PER_TURN):
        assert conn.receive(ping * FRAMES_PER_TURN, 1.0) == []
    assert len(parse(conn.data_to_send())) == one_second
    conn.earn(10.0)  # a call dispatched
    assert conn.receive(ping * 10, 1.0) == [] and len(parse(conn.data_to_send())) == 10
    assert not conn.charge(1.0)
    assert goaway(parse(conn.data_to_send())) == (0, h2.ENHANCE_YOUR_CALM)
    assert conn.closed and conn.receive(ping, 100.0) == []


def test_rapid_reset_ends_with_enhance_your_calm() -> None:
    _, burst = RESET_BUDGET
    peer = Peer()
    conn = peer.conn
    data, resets = b"", 0
    for i in range(int(burst) + 1):
        stream_id = 2 * i + 1
        data += peer.headers(stream_id) + frame(h2.RST_STREAM, 0, stream_id, b"\x00\x00\x00\x08")
    for _ in range(10):
        for event in conn.receive(data, 0.0):
            if isinstance(event, StreamReset):
                assert event.remote and event.error_code == h2.CANCEL
                resets += 1
            elif isinstance(event, ConnectionTerminated):
                assert event.error_code == h2.ENHANCE_YOUR_CALM
        data = b""
        if not conn.more_frames:
            break
    assert resets == int(burst)
    last_stream, code = goaway(parse(conn.data_to_send()))
    assert code == h2.ENHANCE_YOUR_CALM and last_stream == 2 * int(burst) + 1


def test_streams_answered_between_frames_do_not_count_against_the_stream_limit() -> None:
    peer = Peer()
    conn = peer.conn
    ends = h2.END_HEADERS | h2.END_STREAM
    burst = b"".join(peer.headers(2 * i + 1, ends) for i in range(FRAMES_PER_TURN))
    assert FRAMES_PER_TURN > OUR_MAX_STREAMS  # one turn holds more calls than the limit
    answered = 0
    for event in conn.receive_events(burst, 0.0):
        assert isinstance(event, RequestReceived) and event.end_stream
        conn.send_headers(event.stream_id, b"\x88", end_stream=True)
        answered += 1
    frames = parse(conn.data_to_send())
    assert answered == FRAMES_PER_TURN and not conn.more_frames
    assert [f[0] for f in frames] == [h2.HEADERS] * FRAMES_PER_TURN  # none refused
    # Unanswered, the streams past the limit are refused.
    peer = Peer()
    conn = peer.conn
    events = conn.receive(
        b"".join(peer.headers(2 * i + 1) for i in range(OUR_MAX_STREAMS + 1)), 0.0
    )
    assert len(events) == OUR_MAX_STREAMS
    assert parse(conn.data_to_send()) == [
        (h2.RST_STREAM, 0, 2 * OUR_MAX_STREAMS + 1, struct.pack(">I", h2.REFUSED_STREAM))
    ]


def test_goaway_with_drain_lets_open_streams_finish_and_refuses_new_ones() -> None:
    peer = Peer()
    conn = peer.conn
    conn.receive(peer.headers(1, h2.END_HEADERS | h2.END_STREAM), 0.0)
    conn.close_connection(h2.NO_ERROR, "stopping", drain=True)
    assert goaway(parse(conn.data_to_send())) == (1, h2.NO_ERROR) and not conn.closed
    assert conn.receive(peer.headers(3), 0.0) == []
    assert parse(conn.data_to_send()) == [
        (h2.RST_STREAM, 0, 3, struct.pack(">I", h2.REFUSED_STREAM))
    ]
    conn.send_headers(1, b"\x88", end_stream=True)
    assert parse(conn.data_to_send())[0][:3] == (h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1)
    assert conn.closed
    # The peer's GOAWAY: reported; with no stream open the connection is over.
    peer = Peer()
    events = peer.conn.receive(frame(h2.GOAWAY, 0, 0, struct.pack(">II", 0, h2.NO_ERROR)), 0.0)
    assert events == [GoAwayReceived(h2.NO_ERROR, 0)] and peer.conn.closed


def test_keepalive_is_driven_by_the_now_argument_alone() -> None:
    peer = Peer(now=100.0)
    conn = peer.conn
    assert conn.next_deadline() == 100.0 + KEEPALIVE_IDLE
    assert conn.tick(100.0 + KEEPALIVE_IDLE) == [] and conn.data_to_send() == b""
    pinged = 100.0 + KEEPALIVE_IDLE + 1
    assert conn.tick(pinged) == []
    assert parse(conn.data_to_send()) == [(h2.PING, 0, 0, h2.KEEPALIVE_PING)]
    assert conn.next_deadline() == pinged + KEEPALIVE_TIMEOUT
    assert conn.tick(pinged + KEEPALIVE_TIMEOUT) == [] and conn.data_to_send() == b""
    # The answer (any bytes would do) makes the peer alive: the next PING is an idle period on.
    answered = pinged + 5
    ack = frame(h2.PING, h2.ACK, 0, h2.KEEPALIVE_PING)
    assert conn.receive(ack, answered) == [PingAcked(h2.KEEPALIVE_PING)]
    assert conn.next_deadline() == answered + KEEPALIVE_IDLE
    # Silence after the next PING: timed out, nothing sent.
    conn.tick(answered + KEEPALIVE_IDLE + 1)
    conn.data_to_send()
    late = answered + KEEPALIVE_IDLE + 1 + KEEPALIVE_TIMEOUT + 0.5
    assert conn.tick(late) == [ConnectionTimedOut("the peer stopped answering pings")]
    assert conn.closed and conn.data_to_send() == b"" and conn.next_deadline() is None


def test_a_peer_that_stops_reading_times_out_unless_its_backlog_shrinks() -> None:
    conn = H2Connection(0.0, keepalive_idle=3.0, keepalive_timeout=2.0)
    assert conn.next_deadline(peer_reading=False) == 5.0
    assert conn.tick(4.0, peer_reading=False) == []
    conn.peer_active(4.0)  # it read some of our output
    assert conn.tick(8.5, peer_reading=False) == [] and conn.data_to_send() == b""  # no PING
    assert conn.tick(9.5, peer_reading=False) == [ConnectionTimedOut("the peer stopped reading")]


MALFORMED = {
    "frame over our maximum": (b"\x01\x00\x01\x00\x00\x00\x00\x00\x00", h2.FRAME_SIZE_ERROR),
    "bad HPACK": (frame(h2.HEADERS, 5, 1, b"\xff\xff\xff\xff\xff\xff"), h2.COMPRESSION_ERROR),
    "DATA on stream 0": (frame(h2.DATA, 0, 0, b"x"), h2.PROTOCOL_ERROR),
    "DATA on an idle stream": (frame(h2.DATA, 0, 7, b"x"), h2.PROTOCOL_ERROR),
    "HEADERS on an even stream": (frame(h2.HEADERS, 5, 2, b"\x82"), h2.PROTOCOL_ERROR),
    "short PING": (frame(h2.PING, 0, 0, b"short"), h2.PROTOCOL_ERROR),
    "PING on a stream": (frame(h2.PING, 0, 1, b"12345678"), h2.PROTOCOL_ERROR),
    "SETTINGS on a stream": (frame(h2.SETTINGS, 0, 1), h2.PROTOCOL_ERROR),
    "SETTINGS of 5 bytes": (frame(h2.SETTINGS, 0, 0, b"\x00" * 5), h2.FRAME_SIZE_ERROR),
    "window too large": (
        frame(h2.SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff"),
        h2.FLOW_CONTROL_ERROR,
    ),
    "bad MAX_FRAME_SIZE": (frame(h2.SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"), 1),
    "too many SETTINGS": (frame(h2.SETTINGS, 0, 0, b"\x00\x04\x00\x00\x00\x01" * 33), 0xB),
    "zero WINDOW_UPDATE": (frame(h2.WINDOW_UPDATE, 0, 0, b"\x00" * 4), h2.PROTOCOL_ERROR),
    "short WINDOW_UPDATE": (frame(h2.WINDOW_UPDATE, 0, 0, b"\x00"), h2.FRAME_SIZE_ERROR),
    "RST_STREAM on 0": (frame(h2.RST_STREAM, 0, 0, b"\x00" * 4), h2.PROTOCOL_ERROR),
    "PUSH_PROMISE": (frame(h2.PUSH_PROMISE, 4, 1, b"\x00\x00\x00\x02\x82"), h2.PROTOCOL_ERROR),
    "stray CONTINUATION": (frame(h2.CONTINUATION, 4, 1, b"\x82"), h2.PROTOCOL_ERROR),
    "interrupted header block": (
        frame(h2.HEADERS, 0, 1, b"\x83") + frame(h2.PING, 0, 0, b"12345678"),
        h2.PROTOCOL_ERROR,
    ),
    "bad padding": (frame(h2.HEADERS, 4 | h2.PADDED, 1, b"\x05\x82"), h2.PROTOCOL_ERROR),
    "header block too large": (frame(h2.HEADERS, 4, 1, b"\x20" * 40_000), h2.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_end_the_connection_with_goaway(name: str) -> None:
    sent, code = MALFORMED[name]
    peer = Peer()
    conn = peer.conn
    events = conn.receive(sent, 0.0)
    assert len(events) == 1 and isinstance(events[0], ConnectionTerminated), events
    assert events[0].error_code == code
    assert goaway(parse(conn.data_to_send()))[1] == code
    assert conn.closed
    # A closed connection ignores what follows and sends nothing more.
    assert conn.receive(frame(h2.PING, 0, 0, b"12345678"), 0.0) == []
    conn.ping()
    assert conn.data_to_send() == b""


def test_the_header_cache_is_shared_under_one_quota_and_cleared_when_the_table_changes() -> None:
    quota = HeaderCacheQuota(limit=1)
    conns = [H2Connection(0.0, header_cache=quota) for _ in range(2)]
    indexed = b"\x83"  # :method POST, static entry 3: leaves the HPACK table as it was
    for i, conn in enumerate(conns):
        (event,) = conn.receive(h2.PREFACE + frame(h2.HEADERS, 5, 1, indexed), 0.0)
        assert event.headers == {b":method": b"POST"}
        assert len(conn.header_cache) == (1 if i == 0 else 0)
    assert quota.used == 1
    # A literal with incremental indexing changes the table: cached blocks may mean other
    # headers now.
    indexing = hpack.Encoder().encode([("x-a", "b")])
    (event,) = conns[0].receive(frame(h2.HEADERS, 5, 3, indexing), 0.0)
    assert event.headers == {b"x-a": b"b"} and conns[0].header_cache == {} and quota.used == 0
    (event,) = conns[1].receive(frame(h2.HEADERS, 5, 3, indexed), 0.0)
    assert len(conns[1].header_cache) == 1 and quota.used == 1
    conns[1].release()
    assert quota.used == 0 and conns[1].closed
